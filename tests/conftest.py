"""Poisons every output (the root conftest.py has already chosen the interpreter without a GPU)."""
import os

import pytest
import torch

import csra_triton.ops as ops

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
    if call.when == "call" and call.excinfo is not None:
        for k, v in item.user_properties:
            if k == "seed":
                print(f"\n[{item.nodeid}] torch seed was {v}")
