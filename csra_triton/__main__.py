"""``python -m csra_triton [verify]``: see :mod:`csra_triton.tools.cli`."""
import os
import sys


def _ensure_interpreter() -> None:
    """For ``verify`` without CUDA, re-run this command with TRITON_INTERPRET=1 so that the Triton
    kernels run in the interpreter (the variable must be set before triton is first imported).
    The other commands run the PyTorch fallback on CPU and need no interpreter."""
    if len(sys.argv) > 1 and sys.argv[1] in ("bench", "maps", "tune", "inspect"):
        return
    if os.environ.get("TRITON_INTERPRET") or os.environ.get("CSRA_TRITON_NO_REEXEC"):
        return
    import torch

    if not torch.cuda.is_available():
        env = dict(os.environ, TRITON_INTERPRET="1")
        os.execve(sys.executable, [sys.executable, "-m", "csra_triton", *sys.argv[1:]], env)


if __name__ == "__main__":
    _ensure_interpreter()
    from csra_triton.tools.cli import main

    sys.exit(main())
