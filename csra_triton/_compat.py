"""Differences between the supported Triton versions, handled here and nowhere else.

Tested stacks: torch 2.13 + triton 3.9 (CI, CPU interpreter) and torch 2.11/2.13 + triton 3.6 (the
GPU machines' stack; CI runs the interpreter suite and the compile report with it too).

* triton 3.6's interpreter turns a scalar kernel argument (held as a 1-element array) into a
  Python int with ``int(array)``, which NumPy >= 2.4 refuses for arrays that are not 0-d
  ("only 0-dimensional arrays can be converted to Python scalars"): every ``range(0, D, BD)``
  over a runtime bound failed. triton 3.9 squeezes first; :func:`patch_interpreter` makes 3.6 do
  the same.
* triton 3.6's ``tl.dot`` asserts that an accumulator argument has the dot's ``out_dtype``
  (default fp32): fp64 scores (the gradcheck path) failed to trace and compile. 3.9 infers it.
  The kernels pass ``out_dtype`` explicitly (``kernels._score_tiles``), which both accept.
* Whether the kernels run in Triton's interpreter is Triton's own decision, made when
  ``@triton.jit`` decorates them, from its own reading of ``TRITON_INTERPRET`` (1, true, on,
  yes, y; any case; no padding): :func:`interpreted` asks the decorated function rather than
  parse the variable a second way.
"""
from __future__ import annotations

import triton

TRITON_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])


def interpreted(fn) -> bool:
    """Whether ``fn`` (a ``@triton.jit`` function) is one of Triton's interpreter functions."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(fn, InterpretedFunction)


def patch_interpreter() -> None:
    """Applied once when the kernels run in the interpreter (TRITON_INTERPRET=1)."""
    if TRITON_VERSION >= (3, 7):
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_csra_patched", False):
        return

    def patched(tensor, scope):  # triton 3.6: int(data) -> int(data.squeeze())
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._csra_patched = True
    interpreter._patch_lang_tensor = patched

