"""Launch configurations: the config space, pruning, a persisted cache of tuned choices.

A config is ``(BC, BN, BD, num_warps, num_stages)``: BC classes per program (all heads of them:
HP*BC rows of the tile, HP = next power of two of H), BN positions and BD channels per tile step.

The forward and the backward's dS kernel must use the same *tiles* (BC, BN, BD): the backward
recomputes the scores and needs them bit for bit equal to the forward's (see kernels.py). So the
forward's tuning chooses the tiles and its warps/stages, and the backward's tuning chooses only
its warps/stages for those tiles. (Warps split rows/positions and stages pipeline loads; neither
changes the order in which a score sums over channels.)

Choice order for a key (kernel, H, C, D, N, dtype): this process' memory, then the JSON cache
(``CSRA_TRITON_TUNE_CACHE``, else ``~/.cache/csra_triton/tune.json``, entries from another GPU,
torch or triton version are ignored), then autotuning if ``CSRA_TRITON_AUTOTUNE=1`` (on CUDA
only), else the default heuristic. Without a GPU, or under TRITON_INTERPRET=1, exactly one config
(the default) is used and nothing is benchmarked. No kernel accumulates into its outputs (no
atomics), so trials need no resets. Tuning runs on the host when a launch plan is first built
(``triton_impl.plan``), never while torch.compile traces (a traced plan takes the cached or
default config).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from . import archs, settings
from .reference import csra_reference
from .common import BoundedCache, pow2

#: Autotuning's notes (configs dropped and why): ``logging.getLogger("csra_triton.tuning")``.
_log = logging.getLogger(__name__)

try:                                      # POSIX: processes merge their writes under a file lock
    import fcntl
except ImportError:                       # Windows: atomic replace only
    fcntl = None

#: The kernels that tuning chooses a config for, by the names the launches and the compile report
#: give them: the forward and the backward's dS' (whose tiles are the forward's).
KERNELS = ("fwd", "ds")


@dataclass(frozen=True)
class Config:
    BC: int
    BN: int
    BD: int
    num_warps: int = 4
    num_stages: int = 2

    def tiles(self) -> tuple[int, int, int]:
        return self.BC, self.BN, self.BD

    def label(self) -> str:
        return (f"BC={self.BC} BN={self.BN} BD={self.BD} warps={self.num_warps} "
                f"stages={self.num_stages}")




def arch_name(arch: str | int) -> str:
    """An arch of ``archs.ARCHS`` from its name, or from a CUDA capability major (9: Hopper)."""
    if isinstance(arch, str):
        if arch not in archs.ARCHS:
            raise ValueError(f"arch: expected one of {', '.join(archs.ARCHS)}, got {arch!r}")
        return arch
    return archs.from_capability(int(arch))


def default_config(H: int, C: int, D: int, N: int, itemsize: int = 2,
                   arch: str | int = archs.DEFAULT) -> Config:
    """The untuned choice; each benchmark shape's is spill-free on every arch of ``archs.ARCHS``,
    within its shared memory and on its tensor cores (the ``inspect`` command and
    tests/test_compiled.py check it). ``arch``: a name of ``archs.ARCHS`` (or a CUDA capability
    major).

    * rows (HP*BC, all heads of BC classes): on Hopper 128 when the heads' classes fill more
      than 64 rows, else 64 (the smallest wgmma tile, so H=1 with 20 classes still runs on
      wgmma); before Hopper 64 (128-row tiles spill there);
    * positions: every position of a batch element in one tile (BN = next power of two of N, at
      least 32) up to 256, so that the softmax is a single exact pass; beyond 256, tiles of 128
      with an online softmax (256-position tiles spill in its loop);
    * channels per step: 64 for 16-bit operands, 32 for fp32 (TF32; shared memory), 16 for fp64;
    * 8 warps (two warpgroups) for tiles of 64 x 128 and more, else 4; 3 pipeline stages (2
      where shared memory is 64 KB: AMD CDNA2/3);
    * Turing (sm_75, no tensor cores in Triton): 32 x 64 tiles, 32 channels, 8 warps, 2 stages.

    fp64 (gradcheck only) uses small tiles: 16 rows, 32 positions, 16 channels."""
    info = archs.ARCHS[arch_name(arch)]
    hp = pow2(H)
    if itemsize >= 8:
        return Config(max(1, 16 // hp), 32, 16, 4, 1)
    if info.mma == "none":
        # Turing: Triton's products run on FMA units, with the accumulators and both operands
        # in registers: 32 rows x 64 positions x 16 channels, 8 warps is spill-free (larger
        # tiles and 32-channel steps spill: the compile report, bench/NOTES.md).
        bc = max(1, 32 // hp)
        bn = max(32, pow2(N)) if N <= 64 else 64
        return Config(bc, bn, 16, 8, 2)
    rows = 128 if hp * C > 64 and info.big_tiles else 64
    if info.mma == "tcgen05" and N > 256:
        # Blackwell with the online softmax (N > 256): 128-row tiles fail Triton's lowering
        # (ConvertTritonGPUToLLVM); 64-row tiles compile spill-free on tcgen05.
        rows = 64
    bc = max(1, rows // hp)
    bn = max(32, pow2(N)) if N <= 256 else 128
    bd = min(64 if itemsize <= 2 else 32, max(16, pow2(D)))
    if info.mma == "mma":
        # mma.sync archs (A100, A10/L4/L40S, RTX 30-50): 64-channel steps spill at some
        # benchmark shapes, 32 are spill-free; fp32 (TF32) takes 16 (32 spill in the dS kernel
        # for channels-last x under triton 3.6)
        bd = min(bd, 32 if itemsize <= 2 else 16)
    # 64 KB of LDS (MI250X, MI300X): two stages of 64-channel operand tiles, not three
    stages = 2 if info.smem_kb <= 64 else 3
    return Config(bc, bn, bd, default_warps(hp * bc, bn), stages)


def default_warps(rows: int, bn: int) -> int:
    return 8 if rows * bn >= 64 * 128 else 4


def is_valid(cfg: Config, H: int, C: int, D: int, N: int, itemsize: int = 2,
             arch: str | int = archs.DEFAULT) -> bool:
    """The pruning rules: tl.dot needs >= 16 rows, channels and positions per half-tile (BN/2);
    no tile dimension much larger than the problem needs; register and shared-memory budgets of
    a Hopper SM. (Spilling configs are dropped on top of this by the compile report's cache and
    by the sweep itself, see :func:`sweep`.)"""
    hp = pow2(H)
    rows = hp * cfg.BC
    checks = [
        all(v & (v - 1) == 0 for v in (cfg.BC, cfg.BN, cfg.BD)),
        rows >= 16 and cfg.BN >= 32 and cfg.BD >= 16,
        rows <= 128 or cfg.BC == 1,                       # more rows only where H itself needs them
        cfg.BC <= max(pow2(C), 64 // hp, 1),              # no class block beyond what is needed
        cfg.BN <= max(32, pow2(N)),                       # no position block beyond pow2(N)
        cfg.BN <= 256,
        cfg.BD <= max(16, pow2(D)),
        rows * cfg.BN <= 128 * 256,                       # fp32 accumulators in registers
        # operand tiles in shared memory, within the arch's per-block limit
        (rows + cfg.BN) * cfg.BD * itemsize * cfg.num_stages
        <= archs.ARCHS[arch_name(arch)].smem_kb * 1024 * 0.9,
        cfg.num_warps in (4, 8) and cfg.num_stages in (1, 2, 3, 4),
    ]
    return all(checks)


def config_space(kernel: str, H: int, C: int, D: int, N: int, itemsize: int = 2,
                 tiles: tuple[int, int, int] | None = None,
                 arch: str | int = archs.DEFAULT) -> list[Config]:
    """Every valid config for the shape, the default (for ``arch``) first.
    For ``ds`` the tiles are fixed (``tiles``: the forward's) and only warps and stages vary."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    default = default_config(H, C, D, N, itemsize, arch)
    hp = pow2(H)
    if kernel == "ds":
        bc, bn, bd = tiles or default.tiles()
        grid = [(bc, bn, bd, w, s) for w in (4, 8) for s in (2, 3, 4)]
    else:
        bcs = sorted({max(1, r // hp) for r in (64, 128)})
        grid = itertools.product(bcs, (32, 64, 128, 256), (32, 64, 128), (4, 8), (2, 3, 4))
    out = [Config(*g) for g in grid]
    # Largest tiles first: a sweep cut short by its time budget has then timed the candidates
    # that move the fewest bytes (small tiles moved more and lost, bench/NOTES.md).
    out = sorted((c for c in out if is_valid(c, H, C, D, N, itemsize, arch)),
                 key=lambda c: -(hp * c.BC * c.BN))
    base = base_config(kernel, H, C, D, N, itemsize, tiles, arch)
    return [base] + [c for c in out if c != base]


def base_config(kernel: str, H: int, C: int, D: int, N: int, itemsize: int = 2,
                tiles: tuple[int, int, int] | None = None,
                arch: str | int = archs.DEFAULT) -> Config:
    """The untuned config of ``kernel``: the default, or for ``ds`` the forward's ``tiles``
    with the default warps (by tile size) and stages."""
    default = default_config(H, C, D, N, itemsize, arch)
    if kernel == "fwd" or tiles is None:
        return default
    bc, bn, bd = tiles
    return Config(bc, bn, bd, default_warps(pow2(H) * bc, bn), default.num_stages)


# --------------------------------------------------------------------------- the cache


def cache_path() -> Path:
    env = settings.ENV.tune_cache
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "csra_triton" / "tune.json"


def environment(device: torch.device | None, arch: str) -> dict:
    """What a cached choice is valid for: the GPU's name and arch (``arch``: the device's,
    ``archs.device_arch``), the torch and triton versions; "cpu" for both off a GPU."""
    import triton

    cuda = device is not None and device.type == "cuda"
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    arch = arch if cuda else "cpu"
    return {"gpu": gpu, "arch": arch, "torch": torch.__version__, "triton": triton.__version__}


def make_key(kernel: str, H: int, C: int, D: int, N: int, dtype: torch.dtype) -> str:
    """What changes the choice: the kernel, rows (H, C), channels, positions and dtype."""
    return f"{kernel}|H={H}|C={C}|D={D}|N={N}|{str(dtype).replace('torch.', '')}"


#: This process' choices (bounded: a server seeing many resolutions must not grow without end).
_memory = BoundedCache(4096)


def load_cache(env: dict, path: Path | None = None) -> dict[str, Config]:
    """Entries of the cache file that match ``env``; others (another GPU or version) ignored."""
    path = path or cache_path()
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    out = {}
    for e in doc.get("entries", []):
        if all(e.get(k) == v for k, v in env.items()):
            try:
                out[current_key(e["key"])] = Config(**e["config"])
            except (KeyError, TypeError, ValueError):
                continue
    return out


#: Kernel names that earlier versions used (in cache files, on the tune command line): "bwd" is
#: the dS' kernel, "ds".
FORMER_NAMES = {"bwd": "ds"}


def current_key(key: str) -> str:
    """A cache key (:func:`make_key`) with its kernel under today's name; ValueError for a
    string that is no key."""
    kernel, rest = str(key).split("|", 1)
    return f"{FORMER_NAMES.get(kernel, kernel)}|{rest}"


def _read_entries(path: Path) -> list:
    try:
        return list(json.loads(path.read_text()).get("entries", []))
    except (OSError, json.JSONDecodeError, AttributeError):
        return []


def write_atomically(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file of its own in the same folder (a
    unique name: processes writing at once never share one) renamed over ``path``: a reader
    sees the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:        # mkstemp makes the file owner-only: keep the mode the file had (else rw-r--r--)
        mode = path.stat().st_mode & 0o777
    except OSError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _file_lock:
    """An exclusive lock on ``path`` + ".lock" (POSIX ``flock``; nothing elsewhere), so that a
    read-merge-write of the cache by one process never loses another's entries."""

    def __init__(self, path: Path):
        self.path = path.with_name(path.name + ".lock")
        self.f = None

    def __enter__(self):
        if fcntl is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(self.path, "a")
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.f is not None:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_UN)
            self.f.close()


def save_choice(key: str, cfg: Config, ms: float, env: dict, path: Path | None = None) -> Path:
    """Adds or replaces the entry for (key, env) in the cache file. Processes saving at once
    (ranks tuning together) each merge into what the file holds when they write, under a lock,
    and write it atomically: no entry is lost, no reader sees a partial file."""
    path = path or cache_path()
    with _file_lock(path):
        entries = [e for e in _read_entries(path)
                   if not (_same_key(e.get("key"), key)
                           and all(e.get(k) == v for k, v in env.items()))]
        entries.append(dict(key=key, config=asdict(cfg), median_ms=ms, **env))
        write_atomically(path, json.dumps({"entries": entries}, indent=1) + "\n")
    return path


def _same_key(a, b: str) -> bool:
    """Whether the cache entry's key ``a`` is ``b`` once both name their kernel as today."""
    try:
        return current_key(a) == current_key(b)
    except ValueError:
        return False


_loaded_for: dict | None = None


def choose(kernel: str, H: int, C: int, D: int, N: int, x: torch.Tensor, bench=None,
           tiles: tuple[int, int, int] | None = None, source: str | None = None) -> Config:
    """The config to launch with. ``bench()`` makes the timer ``cfg -> ms``; it is called (and
    the timer per candidate) only when autotuning is on (CUDA, ``CSRA_TRITON_AUTOTUNE=1``, no
    interpreter), so that nothing is built on the common path."""
    global _loaded_for
    key = make_key(kernel, H, C, D, N, x.dtype)
    cfg = _memory.get(key)
    if cfg is not None and _fits(cfg, tiles):
        return cfg
    gpu = x.is_cuda and torch.cuda.is_available()      # (fake CUDA tensors trace without one)
    arch = archs.device_arch(x.device) if gpu else archs.DEFAULT
    base = base_config(kernel, H, C, D, N, x.element_size(), tiles, arch)
    if not gpu:
        _memory.set(key, base)      # one valid config; nothing is benchmarked without a GPU
        return base
    env = environment(x.device, arch)
    if _loaded_for != env:
        for k, c in load_cache(env).items():
            _memory.set(k, c)
        _loaded_for = env
    cfg = _memory.get(key)
    if cfg is not None and _fits(cfg, tiles):
        return cfg
    cfg = base
    if bench is not None and settings.ENV.autotune:
        space, known = drop_known_spills(
            config_space(kernel, H, C, D, N, x.element_size(), tiles, arch), kernel,
            Problem(x.shape[0], H, C, D, N), x.dtype, arch, source)
        rejected = [(c, "spills (compile report cache)") for c in known]
        results = sweep(space, bench(), rejected=rejected)
        for bad, why in rejected:
            _log.info("autotune %s: dropped %s: %s", key, bad.label(), why)
        cfg, ms = results[0]
        save_choice(key, cfg, ms, env)
    _memory.set(key, cfg)
    return cfg


def _fits(cfg: Config, tiles: tuple[int, int, int] | None) -> bool:
    """Whether a stored ``cfg`` may serve a launch that must run ``tiles`` (the dS' kernel
    recomputes the forward's scores with the forward's tiles: a dS' config stored for other
    tiles, by an earlier sweep or another forward config, does not serve)."""
    return tiles is None or cfg.tiles() == tuple(tiles)


class Problem(NamedTuple):
    """The sizes that key the compile report's cache (the benchmark shapes have these fields)."""
    B: int
    heads: int
    C: int
    d: int
    N: int


def drop_known_spills(space: list[Config], kernel: str, shape: Problem, dtype: torch.dtype,
                      arch: str | int, source: str | None):
    """(space without the configs that the compile report's cache says spill on this arch,
    those configs); the default config always stays (it is the reference of the sweep).
    ``source``: the kernel's source hash (``JITFunction.cache_key``; None under the
    interpreter, where nothing is compiled)."""
    arch = arch_name(arch)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    known = known_spills(kernel, arch, shape, dtype, space[1:],
                         source)
    return [c for c in space if c not in known], known


def known_spills(kernel: str, arch: str, shape: Problem, dtype, configs,
                 source: str | None) -> list:
    """The configs that the compile report's cache says spill in any launch it compiled them
    for (its keys are :func:`inspect_key` followed by the launch's layout, precision,
    constexprs, warps and stages; configs never compiled are not among them): tuning drops
    them without compiling them again. One read of the cache."""
    if source is None:
        return []
    spilled = [k for k, v in load_inspect_cache().items() if v.get("spill_bytes", 0) > 0]
    prefixes = [(cfg, inspect_key(kernel, arch, shape, dtype, cfg, source) + "|")
                for cfg in configs]
    return [cfg for cfg, prefix in prefixes if any(k.startswith(prefix) for k in spilled)]


# --------------------------------------------------------------------------- the compile report's cache
# (written by tools/compiled.py, read here: results per Triton version, arch, kernel, problem, config)


def triton_version() -> str:
    import triton

    return triton.__version__


def inspect_cache_path() -> Path:
    env = settings.ENV.inspect_cache
    return Path(env) if env else cache_path().with_name("inspect.json")


def inspect_key(kernel, arch, shape: Problem, dtype, cfg, source: str) -> str:
    """Triton version, the kernel's source hash (its own and its callees'), target, problem."""
    return "|".join([triton_version(), source[:16], kernel, arch, make_key(
        kernel, shape.heads, shape.C, shape.d, shape.N, dtype), f"B={shape.B}", cfg.label()])


def load_inspect_cache() -> dict:
    try:
        return json.loads(inspect_cache_path().read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def save_inspect_cache(cache: dict) -> None:
    path = inspect_cache_path()
    try:
        with _file_lock(path):
            merged = {**load_inspect_cache(), **cache}
            write_atomically(path, json.dumps(merged, indent=0, sort_keys=True) + "\n")
    except OSError:
        pass   # a read-only home: the report still prints




# --------------------------------------------------------------------------- the sweep's harness
# (the implementation builds each candidate's launch and its check: triton_impl.fwd_bench,
# ds_bench)

#: A tuning candidate whose output is further than this from float64 is dropped (fp32 under
#: TF32 and bf16 operands land near 1e-3; a wrong tile lands near 1).
TUNE_TOL = {torch.float64: 1e-9, torch.float32: 1e-2, torch.float16: 2e-2, torch.bfloat16: 2e-2}


class ConfigRejected(RuntimeError):
    """A tuning candidate that spills registers or computes something else (see :func:`sweep`)."""


def time_ms(fn) -> float:
    """Median ms of ``fn`` on the GPU (``triton.testing.do_bench``)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20, return_mode="median")


def checked_timer(launch, check):
    """``cfg -> ms`` for :func:`sweep`: ``launch(cfg)`` once (returning the compiled kernel),
    reject it if it spills or if ``check()`` returns an error, then time it."""
    def bench(cfg):
        kernel = launch(cfg)
        spills = getattr(kernel, "n_spills", 0) or 0
        if spills:
            raise ConfigRejected(f"spills {spills} registers")
        err = check()
        if err is not None:
            raise ConfigRejected(f"output differs from its reference by {err:.1e}")
        return time_ms(lambda: launch(cfg))
    return bench


def y_reference(x, w_op, inv_n, params):
    """float64 y on the kernels' own operands (x (B, D, N), the prepared weight (H, C, D),
    inverse norms, the parameter tensor: temperatures (inf = max head), lam), by
    ``reference.csra_reference``: the tuning checks' ground truth."""
    H = w_op.shape[0]
    # (csra_reference reads exactly 99 as the official max flag; for the kernels, a parameter
    # of 99 is a softmax temperature: the next double up keeps it one)
    temps = [math.nextafter(t, math.inf) if t == 99 else t
             for t in params[:H].double().tolist()]
    w = w_op.double() * inv_n.double()[..., None]
    return csra_reference(x.double(), w, temps, float(params[H]), normalize=False)


def sweep(configs: list[Config], bench, budget_s: float | None = None,
          rejected: list | None = None) -> list[tuple]:
    """[(config, median ms)] fastest first. ``bench(cfg)`` launches a candidate once, checks
    its output against float64 and its compiled form for register spills (:func:`checked_timer`),
    then times it; a candidate that fails any of this is dropped and, with ``rejected`` given,
    appended there as ``(config, reason)``: a fast config that computes something else never
    wins. With ``budget_s`` the sweep stops starting new configs once the budget is spent."""
    import time

    t0 = time.monotonic()
    results = []
    for cfg in configs:
        if budget_s is not None and results and time.monotonic() - t0 > budget_s:
            break
        try:
            results.append((cfg, float(bench(cfg))))
        except Exception as exc:  # noqa: BLE001 - out of shared memory, spills, wrong output
            if rejected is not None:
                rejected.append((cfg, f"{type(exc).__name__}: {exc}"[:200]))
    if not results:
        raise RuntimeError(f"no config passed: {rejected}")
    return sorted(results, key=lambda r: r[1])
