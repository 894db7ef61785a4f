"""Shared test set-up.

Triton's interpreter must be switched on before any @triton.jit function is defined, so it is set
here, before test modules import the kernels, whenever no GPU is present.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # GPU tests check the kernels, not the tuning: no per-shape benchmarking of candidate configs
    # (the tuned table or the first-ranked config runs), which keeps the GPU test run short
    os.environ.setdefault("APM_FAST_AUTOTUNE", "0")

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
# the tests must not write text-embedding caches into the user's home (apm_fast.teachers.base)
os.environ.setdefault("APM_FAST_CACHE", "off")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on the CPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One torch thread: two cores shared with other jobs stall under OpenMP oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def config_path(tmp_path_factory):
    """The tiny open_clip model config of the teacher tests (tests/tiny_clip.py), written once."""
    from tiny_clip import write_config

    return write_config(tmp_path_factory.mktemp("tiny_clip"))
