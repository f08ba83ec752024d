"""Every setting the package reads from the environment, parsed and validated in one place
(the lowest layer: it imports nothing of the package).

The package reads the environment once, when it is imported (:data:`ENV`); every module takes its
values from there (tests replace :data:`ENV` or a module's copy of a value, never the environment). A malformed value raises ``ValueError`` naming the variable and the values it
accepts, at import, so that no setting is silently ignored. Unset or empty means the default.
The README's "Settings" table lists them.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Mapping

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_BOOL_WORDS = "1, true, yes, on / 0, false, no, off"


def parse_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    """A flag: 1/true/yes/on or 0/false/no/off (any case); unset or empty: ``default``."""
    raw = env.get(name, "")
    v = raw.strip().lower()
    if v == "":
        return default
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{name}: expected one of {_BOOL_WORDS} (or unset), got {raw!r}")


def parse_auto_bool(env: Mapping[str, str], name: str) -> bool | None:
    """A flag that may also be ``auto`` (or unset / empty): None."""
    raw = env.get(name, "")
    if raw.strip().lower() == "auto":
        return None
    try:
        return parse_bool(env, name, None)
    except ValueError:
        raise ValueError(f"{name}: expected auto or one of {_BOOL_WORDS} (or unset), "
                         f"got {raw!r}") from None


def parse_int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    """An integer >= ``minimum`` (underscores allowed: 1_000_000); unset or empty: ``default``."""
    raw = env.get(name, "")
    if raw.strip() == "":
        return default
    try:
        v = int(raw.strip(), 10)
    except ValueError:
        v = None
    if v is None or v < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {raw!r}")
    return v


def parse_float(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    """A finite number >= ``minimum``; unset or empty: ``default``."""
    raw = env.get(name, "")
    if raw.strip() == "":
        return default
    try:
        v = float(raw)
    except ValueError:
        v = math.nan
    if not (v >= minimum and math.isfinite(v)):
        raise ValueError(f"{name}: expected a finite number >= {minimum:g}, got {raw!r}")
    return v


@dataclass(frozen=True)
class Settings:
    """The package's settings, one field per environment variable (``CSRA_TRITON_<FIELD>``
    upper-cased). (``TRITON_INTERPRET`` is Triton's own: Triton reads it, and the package asks
    Triton what it made of it, ``_compat.interpreted``.)"""

    #: Eager calls take the plain autograd.Function (else the custom ops).
    eager: bool = True
    #: Fill every output and workspace with NaN on allocation (the tests).
    poison: bool = False
    #: fp32 CPU products through oneDNN's matmul where it is built.
    onednn_fp32: bool = True
    #: bf16 GEMMs for bf16 x in the CPU fallback: None follows the CPU.
    cpu_bf16_gemm: bool | None = None
    #: Score products a CPU training forward may keep, in multiples of x's elements.
    cpu_keep_ratio: float = 64.0
    #: Repeat Triton launches run the compiled kernel directly.
    direct_launch: bool = False
    #: Largest number of dS' elements alive at once in the Triton backward.
    ds_elems: int = 1 << 25
    #: Prepared weights up to this many bytes are handed from the forward to the backward.
    keep_weight_bytes: int = 32 << 20
    #: A Triton training forward writes its raw scores for the backward (when small enough).
    keep_scores: bool = True
    #: Weights above this many bytes launch class-block-major.
    cb_major_bytes: int = 8 << 20
    #: Tune launch configs on first use of a problem (CUDA).
    autotune: bool = False
    #: Where tuned configs are kept (a file path; default under the user's cache folder).
    tune_cache: str | None = None
    #: Where the compile report keeps compiled-kernel facts (a folder path).
    inspect_cache: str | None = None


def from_environ(env: Mapping[str, str]) -> Settings:
    """Parses every setting from ``env`` (a mapping like ``os.environ``); raises ValueError
    naming the first malformed variable."""
    p = "CSRA_TRITON_"
    d = Settings()
    return Settings(
        eager=parse_bool(env, p + "EAGER", d.eager),
        poison=parse_bool(env, p + "POISON", d.poison),
        onednn_fp32=parse_bool(env, p + "ONEDNN_FP32", d.onednn_fp32),
        cpu_bf16_gemm=parse_auto_bool(env, p + "CPU_BF16_GEMM"),
        cpu_keep_ratio=parse_float(env, p + "CPU_KEEP_RATIO", d.cpu_keep_ratio, 0.0),
        direct_launch=parse_bool(env, p + "DIRECT_LAUNCH", d.direct_launch),
        ds_elems=parse_int(env, p + "DS_ELEMS", d.ds_elems, 1),
        keep_weight_bytes=parse_int(env, p + "KEEP_WEIGHT_BYTES", d.keep_weight_bytes, 0),
        keep_scores=parse_bool(env, p + "KEEP_SCORES", d.keep_scores),
        cb_major_bytes=parse_int(env, p + "CB_MAJOR_BYTES", d.cb_major_bytes, 0),
        autotune=parse_bool(env, p + "AUTOTUNE", d.autotune),
        tune_cache=env.get(p + "TUNE_CACHE") or None,
        inspect_cache=env.get(p + "INSPECT_CACHE") or None,
    )


def variables() -> list[str]:
    """The environment variables :func:`from_environ` reads."""
    return ["CSRA_TRITON_" + f.name.upper() for f in fields(Settings)]


#: The settings of this process, read when the package was imported.
ENV = from_environ(os.environ)
