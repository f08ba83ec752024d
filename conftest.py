"""Root conftest: without a GPU, the Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it happens here, before any test
module (tests/ or bench/) imports csra_triton.
"""
import os
from pathlib import Path

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


@pytest.hookimpl(tryfirst=True)      # (before pytest-xdist reads the xdist_group marks)
def pytest_collection_modifyitems(config, items):
    """Marks ``no_triton`` the tests parametrized onto the PyTorch fallback (the ``backend``
    fixture's "torch" params, a ``backend_name`` of "torch"); modules and tests that run no
    Triton code at all carry the marker themselves. Puts the long tests first (``_FIRST``)."""
    import pytest

    for item in items:
        path = str(getattr(item, "path", ""))
        if path.endswith(".md"):        # a document's blocks: one worker, in order; no Triton
            item.add_marker(pytest.mark.xdist_group(f"doc-{Path(path).name}"))
            item.add_marker(pytest.mark.no_triton)
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        if (params.get("backend") in ("torch", "torch-fp32gemm")
                or params.get("backend_name") == "torch"):
            item.add_marker(pytest.mark.no_triton)

    def rank(item):
        path = item.nodeid.split("::")[0]
        return _FIRST.index(path) if path in _FIRST else len(_FIRST)

    items.sort(key=rank)        # (stable: the order within each rank is kept)


# --------------------------------------------------------------------------- the docs' code
# Every ```python block of README.md and docs/*.md runs as a test (Sybil), each document's blocks
# in one namespace, in order, on the PyTorch fallback (what a CPU runs; the interpreter would
# take minutes); a block that needs an optional package says so in a `skip: next if(...)`
# comment naming one of the flags below.
def _doc_setup(namespace):
    import importlib.util

    from csra_triton import ops

    def have(*mods):
        try:
            return all(importlib.util.find_spec(m) is not None for m in mods) and \
                all(__import__(m) for m in mods)
        except Exception:  # noqa: BLE001 - torchvision fails to import beside some wheels
            return False
    namespace.update(HAVE_TORCHVISION=have("torchvision"), HAVE_TIMM=have("timm"),
                     HAVE_ONNX=have("onnx", "onnxscript", "onnxruntime"))
    namespace["_old_backend"] = getattr(ops._forced, "name", "auto")
    ops._forced.name = "torch"


def _doc_teardown(namespace):
    from csra_triton import ops

    ops._forced.name = namespace.get("_old_backend", "auto")


try:
    from sybil import Sybil
    from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser
except ImportError:        # (the test extra installs it; without it the docs are not collected)
    pass
else:
    pytest_collect_file = Sybil(parsers=[PythonCodeBlockParser(), SkipParser()],
                                patterns=["README.md", "docs/*.md"], setup=_doc_setup,
                                teardown=_doc_teardown).pytest()
