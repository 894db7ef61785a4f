"""apm-fast: fused GPU kernels for the Asynchronous Perception Machine (APM, NeurIPS 2024)."""
from .backends import BackendUnavailable, available_backends, get_backend
from .config import PRESETS, APMConfig, preset
from .model import APM, APMOutput
from .posenc import position_code
from .ttt import TestTimeTrainer, TTTResult

__version__ = "0.1.0"

__all__ = ["APM", "APMConfig", "APMOutput", "PRESETS", "preset", "position_code", "TestTimeTrainer",
           "TTTResult", "available_backends", "get_backend", "BackendUnavailable", "__version__"]
