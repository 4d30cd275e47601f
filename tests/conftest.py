"""Test setup: without a GPU, Triton kernels run on CPU tensors under Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from modkern.backends import triton_available  # noqa: E402

settings.register_profile("default", deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=500,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = triton_available()


@pytest.fixture
def device() -> str:
    """Where tensors live: the GPU when there is one, else the CPU (Triton interpreted)."""
    return DEVICE


@pytest.fixture(params=["torch", "torch-search", "triton"])
def backend(request, monkeypatch) -> str:
    """Every backend, each checked against the reference. "torch-search" is the torch
    backend with its small-tensor shortcut off, so small test tensors take the threshold
    search path that large tensors take."""
    if request.param == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    if request.param == "torch-search":
        from modkern.ops import select_torch
        monkeypatch.setattr(select_torch, "DIRECT_MAX", 0)
        return "torch"
    return request.param
