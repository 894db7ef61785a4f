"""The single-step callable the benchmarks time follows the same trajectory as the trainer."""
import pytest
import torch

from apm_fast import TestTimeTrainer
from apm_fast.engine import make_step
from helpers import images_for, rel_err, tiny_model


def test_make_step_follows_trainer_trajectory_and_resets():
    model = tiny_model()
    x = images_for(model, 1)
    y = torch.randn(1, model.config.dim, dtype=torch.float64)
    step = make_step(model, x, y, backend="torch", lr=1e-3)
    first = torch.stack([step() for _ in range(4)])
    step.reset()
    again = torch.stack([step() for _ in range(4)])
    ref = TestTimeTrainer(model, steps=4, lr=1e-3, backend="reference", engine=False).fit(x, y)
    assert torch.equal(first, again)
    assert rel_err(first, ref.losses[0].double()) < 1e-6   # the trainer stores losses in fp32


def test_make_step_wants_one_image():
    model = tiny_model()
    with pytest.raises(ValueError, match="expected one image"):
        make_step(model, images_for(model, 2), torch.zeros(2, model.config.dim, dtype=torch.float64))
