"""Root conftest: without a GPU, the Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it happens here, before any test
module (tests/ or bench/) imports csra_triton.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
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
