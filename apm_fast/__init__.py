"""apm-fast: fused GPU kernels for the Asynchronous Perception Machine (APM, NeurIPS 2024).

The public face: the model (:class:`APM`, its config and presets), test-time training
(:class:`TestTimeTrainer`), zero-shot classification (:func:`classify`, :func:`iter_classify`),
labelled evaluation beside the baselines (:func:`evaluate`) and the backend switch. Teachers, images, the distributed runners and the kernel authors' ops live in
the subpackages ``apm_fast.teachers``, ``apm_fast.images``, ``apm_fast.distributed`` and
``apm_fast.ops``.
"""
from .backends import BackendUnavailable, available_backends, get_backend
from .classify import Classification, classify, iter_classify
from .config import PRESETS, APMConfig, preset
from .evaluation import EvalSettings, evaluate
from .model import APM, APMOutput
from .posenc import position_code
from .ttt import TestTimeTrainer, TTTResult

__version__ = "0.1.0"

__all__ = ["APM", "APMConfig", "APMOutput", "PRESETS", "preset", "position_code", "TestTimeTrainer",
           "TTTResult", "classify", "iter_classify", "Classification", "evaluate", "EvalSettings",
           "available_backends", "get_backend",
           "BackendUnavailable", "__version__"]
