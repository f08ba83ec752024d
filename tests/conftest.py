"""Poisons every output (the root conftest.py has already chosen the interpreter without a GPU)."""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import csra_triton.ops as ops
from helpers import WORST

settings.register_profile("ci", max_examples=200, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("gpu-check", max_examples=25, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])  # bench/gpu_check.sh
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ops.POISON = True
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=["triton", "torch"])
def backend(request):
    """Runs a test once through the Triton kernels (interpreted on CPU) and once through the
    vectorised PyTorch fallback."""
    with ops.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs on every run, but reproducible from the printed seed on failure.
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if (call.when == "call" and call.excinfo is not None
            and not call.excinfo.errisinstance(pytest.skip.Exception)):
        for k, v in item.user_properties:
            if k == "seed":
                print(f"\n[{item.nodeid}] torch seed was {v}")


def pytest_terminal_summary(terminalreporter):
    if WORST:
        terminalreporter.write_line("property tests, worst relative error vs float64 "
                                    "(examples: fwd / dx / dW):")
        for dtype, (n, fwd, dx, dw) in sorted(WORST.items()):
            terminalreporter.write_line(f"  {dtype}: {n} examples: {fwd:.2e} / {dx:.2e} / {dw:.2e}")
