"""Poisons every output (the root conftest.py has already chosen the interpreter without a GPU)
and fixes the randomness, so that CI gives the same verdict on every run of a commit:

* torch's seed is derived from the test's id (stable across runs and machines); set
  ``CSRA_TRITON_RANDOM=1`` for a fresh seed per test (printed on failure, to reproduce with
  ``CSRA_TRITON_SEED=<seed>``);
* hypothesis runs derandomized in the default ``ci`` profile (200 examples) and in ``gpu-check``;
  ``HYPOTHESIS_PROFILE=long`` draws 5,000 fresh examples.
"""
import os
import zlib

import pytest
import torch
from hypothesis import HealthCheck, settings

import csra_triton.common as common
import csra_triton.fallback as fallback
import csra_triton.ops as ops
from helpers import WORST

RANDOM = os.environ.get("CSRA_TRITON_RANDOM", "0") not in ("", "0")
settings.register_profile("ci", max_examples=200, deadline=None, print_blob=True,
                          derandomize=not RANDOM, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("gpu-check", max_examples=25, deadline=None, print_blob=True,
                          derandomize=not RANDOM,
                          suppress_health_check=[HealthCheck.too_slow])  # bench/gpu_check.sh
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

common.POISON = True
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 scores follow torch.backends.cudnn.allow_tf32 (TF32 by default, like the official conv);
# the fp32 tolerances of the tests are IEEE fp32's, so the suite runs with the flag off and
# tests/test_forward.py::test_tf32_follows_cudnn_flag covers the TF32 path.
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=["triton", "torch", "torch-fp32gemm"])
def backend(request):
    """Runs a test through the Triton kernels (interpreted on CPU) and through the vectorised
    PyTorch fallback with each of its GEMM choices for bf16 inputs: bf16 products (a CPU with
    native bf16) and fp32 ones (without), forced either way so that every CPU runs both."""
    name = request.param
    old = fallback.BF16_GEMM
    fallback.BF16_GEMM = name != "torch-fp32gemm"
    try:
        with ops.use_backend(name.split("-")[0]):
            yield name.split("-")[0]
    finally:
        fallback.BF16_GEMM = old


@pytest.fixture(autouse=True)
def _seed(request):
    """A fixed seed per test (its id's CRC32) unless CSRA_TRITON_RANDOM=1; CSRA_TRITON_SEED
    forces one (to reproduce a printed seed)."""
    if os.environ.get("CSRA_TRITON_SEED"):
        seed = int(os.environ["CSRA_TRITON_SEED"])
    elif RANDOM:
        seed = int.from_bytes(os.urandom(4), "little")
    else:
        seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Dynamo's caches emptied after each test: every compiled call of ``CSRATriton.forward`` in
    a worker shares one code object, whose cache entries count against Dynamo's recompile limit
    (8) whatever test made them, so without this a test's outcome would depend on which tests
    xdist ran before it in the same process."""
    yield
    torch._dynamo.reset()


FAILLOG = os.environ.get("CSRA_TRITON_FAILLOG")


def pytest_runtest_makereport(item, call):
    if (call.when == "call" and call.excinfo is not None
            and not call.excinfo.errisinstance(pytest.skip.Exception)):
        for k, v in item.user_properties:
            if k == "seed":
                print(f"\n[{item.nodeid}] torch seed was {v}")
    if call.when == "call" and WORST and os.environ.get("PYTEST_XDIST_WORKER"):
        # an xdist worker's property-test tally travels to the controller with the report
        item.user_properties.append(("csra_worst", {k: list(v) for k, v in WORST.items()}))


#: the latest tally of each xdist worker (under xdist the controller holds no WORST of its own)
_WORKER_WORST: dict = {}


def pytest_runtest_logreport(report):
    """With CSRA_TRITON_FAILLOG=path, each failure is appended there as it happens (xdist
    workers included), so a run cut short by a time limit still says what failed and why.
    Collects the workers' property-test tallies (see pytest_runtest_makereport)."""
    if FAILLOG and report.failed:
        with open(FAILLOG, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{str(report.longrepr)[-3000:]}\n")
    node = getattr(report, "node", None)
    for k, v in getattr(report, "user_properties", ()):
        if k == "csra_worst" and node is not None:
            _WORKER_WORST[node.gateway.id] = v


def pytest_terminal_summary(terminalreporter):
    worst = {k: list(v) for k, v in WORST.items()}
    for tally in _WORKER_WORST.values():
        for dtype, (n, fwd, dx, dw) in tally.items():
            w = worst.setdefault(dtype, [0, 0.0, 0.0, 0.0])
            w[:] = [w[0] + n, max(w[1], fwd), max(w[2], dx), max(w[3], dw)]
    if worst:
        terminalreporter.write_line("property tests, worst relative error vs float64 "
                                    "(examples: fwd / dx / dW):")
        for dtype, (n, fwd, dx, dw) in sorted(worst.items()):
            terminalreporter.write_line(f"  {dtype}: {n} examples: {fwd:.2e} / {dx:.2e} / {dw:.2e}")
