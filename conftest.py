"""Root conftest: without a GPU, the Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it happens here, before any test
module (tests/ or bench/) imports csra_triton.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (the README's command runs one worker per core), each worker takes its
# share of the cores for torch's intra-op threads, and Inductor compiles in the worker itself
# (its pool of compile processes would start per worker and fight the other worker for cores).
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
else:  # cuBLAS needs it under torch.use_deterministic_algorithms(True) (the determinism test)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# A fresh Inductor cache per run: Inductor's on-disk FX-graph cache was seen to reuse code
# compiled against an earlier schema of our custom ops (torch 2.13), failing with
# "wrong number of dimensions" after the op's outputs changed.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="csra-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


import pytest  # noqa: E402


@pytest.hookimpl(trylast=True)
def pytest_cmdline_main(config):
    """Under pytest-xdist (``-n``), "load" becomes "loadgroup": each test goes to whichever
    worker is free, except the tests of one ``xdist_group`` (a compile-report slice, a module
    whose module-scoped fixture is costly), which share a worker. Set here rather than in
    pyproject's addopts, so that a run without xdist (``pytest --benchmark-only``) needs no
    unknown option."""
    if getattr(config.option, "dist", None) == "load":
        config.option.dist = "loadgroup"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "no_triton: the test runs no Triton code (the PyTorch fallback, pure Python): "
        "its outcome cannot depend on the Triton version (.ci/run's triton 3.6 block skips it)")


#: Run first (xdist hands out work in collection order): the compile report's slices, minutes
#: each, then the real-backbone compiles, so that no long test starts when the other worker has
#: nothing left to do.
_FIRST = ("tests/test_compiled.py", "tests/test_models.py")


def pytest_collection_modifyitems(config, items):
    """Marks ``no_triton`` the tests parametrized onto the PyTorch fallback (the ``backend``
    fixture's "torch" params, a ``backend_name`` of "torch"); modules and tests that run no
    Triton code at all carry the marker themselves. Puts the long tests first (``_FIRST``)."""
    import pytest

    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if (params.get("backend") in ("torch", "torch-fp32gemm")
                or params.get("backend_name") == "torch"):
            item.add_marker(pytest.mark.no_triton)

    def rank(item):
        path = item.nodeid.split("::")[0]
        return _FIRST.index(path) if path in _FIRST else len(_FIRST)

    items.sort(key=rank)        # (stable: the order within each rank is kept)
