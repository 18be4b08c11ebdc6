"""Shared test setup: every available device, exact float comparisons, a deterministic hypothesis profile.

* ``device``: a parametrised fixture over ``cpu`` and ``cuda`` (the CUDA case is skipped where no GPU
  exists), so every test that takes it runs on each available device.
* TF32 is switched off for the whole session, so CUDA results compare with ``nn.Conv2d`` at float32
  precision rather than TF32's 10-bit mantissa.
* One intra-op CPU thread (tiny tensors; avoids thread contention on small shared machines).
* Hypothesis: the ``ci`` profile (default) is deterministic (``derandomize=True``) with a moderate number
  of examples; ``HYPOTHESIS_PROFILE=thorough`` searches further (e.g. before a release).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
# The tests use tiny tensors: one intra-op thread avoids OpenMP spinning, which on a shared 2-core
# machine made each case ~20x slower. Results do not depend on it.
torch.set_num_threads(1)

settings.register_profile(
    "ci", derandomize=True, max_examples=40, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile(
    "thorough", derandomize=False, max_examples=2000, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each available device in turn (CUDA skipped without a GPU); TF32 is off for CUDA comparisons."""
    dev = torch.device(request.param)
    if dev.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return dev



def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: takes tens of seconds (e.g. torch.compile on CPU); "
                                       "deselect with -m 'not slow'")
