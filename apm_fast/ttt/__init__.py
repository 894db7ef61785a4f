"""Test-time training: :class:`TestTimeTrainer` (the one trainer: ``backend="reference"`` trains the
plain model with autograd, any table trains on the engine), the engine and its pieces
(``engine.py``: students side by side; ``program.py``: the captured step; ``store.py``: flat
buffers; ``graph.py``: CUDA graph capture; ``memory.py``: how many students fit)."""
from .trainer import Pending, TestTimeTrainer, Trajectory, TTTResult

__all__ = ["TestTimeTrainer", "TTTResult", "Pending", "Trajectory"]
