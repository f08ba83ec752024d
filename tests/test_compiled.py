"""The compile report (``python -m csra_triton inspect``): every kernel at every benchmark shape's
default config, compiled here without a GPU for every arch of ``archs.ARCHS``: sm_75, sm_80,
sm_86, sm_89, sm_90a, sm_100a, sm_120 and AMD gfx90a, gfx942, gfx950.

It runs in a subprocess: this process imported the kernels for Triton's interpreter (no GPU),
and the report needs Triton's compiler. What CI holds, under triton 3.9 and 3.6 (and 3.8):
for every arch, every benchmark shape in NCHW in its own dtype (fp16 where the arch has no
bf16) and the headline in every layout (NCHW, channels_last, tokens) and dtype (bf16, fp16,
fp32 TF32), plus the training forward that keeps its scores (fwd_keep) and the elementwise
dS' from them (ds_kept) wherever the shape keeps them: 0 spill bytes, shared memory within the
arch's per-block limit, every product on the arch's tensor-core instruction (wgmma, tcgen05,
mma.sync, mfma; FMA on sm_75, where Triton has none). About 400 compilations, a few minutes a
Triton version (Triton's own
compile cache makes repeat runs on one machine take seconds). Also the Hopper
traffic targets of bench/NOTES.md: at most 0.3 GB moved into the SMs by the headline forward
and backward score kernels."""
import json
import os
import subprocess
import sys

import pytest

from csra_triton.tools.benchmark import HEADLINE, SHAPES


def _inspect(tmp_path_factory, *args, **env_over):
    tmp = tmp_path_factory.mktemp("inspect")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_over)
    # one compile cache for this run's reports (fresh per run: nothing from another commit)
    env["CSRA_TRITON_INSPECT_CACHE"] = str(tmp_path_factory.getbasetemp() / "inspect-cache.json")
    path = tmp / "report.json"
    proc = subprocess.run([sys.executable, "-m", "csra_triton", "inspect", *args, "--json",
                           str(path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(path.read_text()), proc.stdout


#: elementwise kernels (over weight rows, or over kept scores): no product
NO_PRODUCT = ("prep", "proj", "ds_kept")
ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120", "gfx90a", "gfx942",
         "gfx950")
#: The ten archs in three slices, each compiled by its own reports: every benchmark shape
#: ("report") and the headline in every layout and dtype ("layouts"). Each (report, slice) is an
#: xdist group of its own, so that the two workers compile slices side by side; a worker builds
#: a report once (``_REPORTS``) for every test of its group.
SLICES = {"nvidia-75-89": ("sm_75", "sm_80", "sm_86", "sm_89"),
          "nvidia-90-120": ("sm_90a", "sm_100a", "sm_120"),
          "amd": ("gfx90a", "gfx942", "gfx950")}
assert sorted(a for archs in SLICES.values() for a in archs) == sorted(ARCHS)
_REPORTS: dict = {}


def _report(tmp_path_factory, slice_: str, kind: str = "report"):
    key = (kind, slice_)
    if key not in _REPORTS:
        archs = ",".join(SLICES[slice_])
        extra = (() if kind == "report" else
                 ("--shapes", HEADLINE, "--layouts", "nchw,channels_last,tokens", "--dtypes",
                  "bf16,fp16,fp32", "--kernels", "fwd,ds"))
        _REPORTS[key] = _inspect(tmp_path_factory, "--arch", archs, *extra)
    return _REPORTS[key]


def _slices(kind: str = "report", only=None):
    """Parametrises a test over the slices (``only``: the slice holding that arch), each in its
    report's xdist group."""
    names = [s for s in SLICES if only is None or only in SLICES[s]]
    return pytest.mark.parametrize("slice_", [
        pytest.param(s, marks=pytest.mark.xdist_group(f"compile-{kind}-{s}")) for s in names])


@_slices()
def test_every_arch_keeps_the_rules(slice_, tmp_path_factory):
    """0 spills, shared memory within the arch's limit, tensor cores for every product: every
    benchmark shape."""
    doc, _ = _report(tmp_path_factory, slice_)
    assert doc["broken"] == [], "\n".join(doc["broken"])
    assert {r["arch"] for r in doc["rows"]} == set(SLICES[slice_])


@_slices("layouts")
def test_every_layout_and_dtype_keeps_the_rules(slice_, tmp_path_factory):
    """The same rules for the headline in NCHW, channels-last and tokens, bf16, fp16 and fp32
    (fp16 and fp32 on sm_75)."""
    doc, _ = _report(tmp_path_factory, slice_, "layouts")
    assert doc["broken"] == [], "\n".join(doc["broken"])
    assert {r["arch"] for r in doc["rows"]} == set(SLICES[slice_])
    layouts = {(r["arch"], r["layout"], r["dtype"]) for r in doc["rows"]}
    for arch in SLICES[slice_]:
        dtypes = ("float16", "float32") if arch == "sm_75" else ("bfloat16", "float16", "float32")
        for layout in ("nchw", "channels_last", "tokens"):
            for dt in dtypes:
                assert (arch, layout, dt) in layouts, (arch, layout, dt)


@_slices()
def test_products_are_counted_per_site(slice_, tmp_path_factory):
    """The MMA column counts each product (tl.dot site after pipelining), so that one product
    off the tensor cores would show as 'mixed'."""
    for r in _report(tmp_path_factory, slice_)[0]["rows"]:
        if r["kernel"] in ("fwd", "fwd_keep", "ds"):
            assert sum(r["mma_sites"].values()) >= 2, r
            assert r["mma"] == r["mma_expected"] or r["dtype"] == "float32", r


#: Where Triton specialises arguments equal to 1 into constants (N=1, B=1, C=1, H=1) and d is
#: not a multiple of any tile: code the interpreter runs fine can fail to compile there (it
#: did: ``N.to(...)`` on a constant int, caught on the first GPU run).
EDGES = "latency-r101-224@B=1@h=1@w=1@C=1@d=3@heads=1,coco-r101-448@B=2@h=1@w=1@d=129"


def test_edge_shapes_compile_for_every_dtype(tmp_path_factory):
    doc, _ = _inspect(tmp_path_factory, "--arch", "sm_90a", "--shapes", EDGES, "--dtypes",
                      "bf16,fp16,fp32,fp64")
    rows = doc["rows"]
    # prep, fwd, ds, proj for both shapes and 4 dtypes; fwd_keep and ds_kept where the scores
    # are kept (the first: 1 row <= 3 channels; not the second: 320 rows > 129)
    assert len(rows) == 2 * 4 * 4 + 4 * 2
    assert {r["kernel"] for r in rows if r["shape"].startswith("latency")} >= {"fwd_keep",
                                                                                "ds_kept"}
    for r in rows:
        assert r["regs"] > 0
        if r["dtype"] != "float64":
            assert r["spill_bytes"] == 0, r


def test_class_block_major_order_compiles_spill_free(tmp_path_factory):
    """The launch order of weights > 8 MB (9,605 classes), forced at the headline and at the
    edge shapes: the same spill-free tensor-core kernels."""
    doc, _ = _inspect(tmp_path_factory, "--arch", "sm_90a", "--shapes", f"{HEADLINE},{EDGES}",
                      "--kernels", "fwd,ds", CSRA_TRITON_CB_MAJOR_BYTES="0")
    assert len(doc["rows"]) == 3 * 2
    for r in doc["rows"]:
        assert r["spill_bytes"] == 0, r
        if r["shape"] == HEADLINE:
            assert r["mma"] == "wgmma", r


@_slices()
def test_every_kernel_of_every_shape_is_reported(slice_, tmp_path_factory):
    doc, table = _report(tmp_path_factory, slice_)
    rows = doc["rows"]
    assert doc["triton"] and "| kernel | arch |" in table
    for arch in SLICES[slice_]:
        for name, shape in SHAPES.items():
            got = {r["kernel"] for r in rows if r["arch"] == arch and r["shape"] == name}
            # the training forward that keeps its scores and dS' from them: where they have no
            # more elements than x (every shape but openimages' 38,420 rows), and not yet on
            # Blackwell (triton_impl.keeps_scores)
            kept = ({"fwd_keep", "ds_kept"} if shape.heads * shape.C <= shape.d
                    and arch != "sm_100a" else set())
            assert got == {"prep", "fwd", "ds", "proj"} | kept, (arch, name, got)
    for r in rows:
        assert r["default"] and r["regs"] > 0 and r["model"]["hbm_bytes"] > 0


@_slices(only="sm_90a")
def test_hopper_defaults_spill_free_on_wgmma(slice_, tmp_path_factory):
    for r in _report(tmp_path_factory, slice_)[0]["rows"]:
        if r["arch"] != "sm_90a":
            continue
        assert r["spill_bytes"] == 0, r
        if r["kernel"] not in NO_PRODUCT:
            assert r["mma"] == "wgmma", r


@_slices(only="sm_80")
def test_ampere_defaults_use_tensor_cores(slice_, tmp_path_factory):
    for r in _report(tmp_path_factory, slice_)[0]["rows"]:
        if r["arch"] == "sm_80" and r["kernel"] not in NO_PRODUCT:
            assert r["mma"] == "mma", r


@_slices(only="sm_90a")
def test_headline_traffic_model(slice_, tmp_path_factory):
    rows = {r["kernel"]: r for r in _report(tmp_path_factory, slice_)[0]["rows"]
            if r["arch"] == "sm_90a" and r["shape"] == HEADLINE}
    for kernel in ("fwd", "ds"):
        assert rows[kernel]["model"]["sm_bytes"] <= 0.3e9, rows[kernel]
    # The floor the model gives is at least the floor of docs/performance.md (16.4 GFLOP, 51 MB of x).
    assert rows["fwd"]["model"]["floor_us"] >= 16.4e9 / 798e12 * 1e6


@_slices(only="sm_90a")
def test_model_v2_is_calibrated_on_the_h200(slice_, tmp_path_factory):
    """Model v2 (CTAs per SM, waves, per-SM rates, pipelined or serial loads) against the H200
    measurements of the v1 kernels: each headline kernel within +-25%, and the other measured
    rows (kernel sums: openimages forward 2.90 ms, vitl16 forward 0.21 ms). The forward and dS
    kernels are v1's today (the training forward's score stores and the elementwise dS' are
    separate kernels); the prep kernel is modelled with v1's tiles (8 rows in 256-channel steps,
    40 registers on sm_90a), which the H200 measured."""
    from csra_triton.tools.compiled import MEASURED_H200, model_v2
    from csra_triton.tools.shapes import SHAPES as ALL
    from csra_triton import tuning

    rows = {(r["kernel"], r["shape"]): r["model_v2"]["time_us"]
            for r in _report(tmp_path_factory, slice_)[0]["rows"] if r["arch"] == "sm_90a"}

    def prep_v1(name):
        shape = ALL[name]
        cfg = tuning.default_config(shape.heads, shape.C, shape.d, shape.N, 2, "sm_90a")
        return model_v2("prep", shape, shape.torch_dtype, cfg, 40, 0,
                        row_tiles=(8, 256))["time_us"]

    for key, measured in MEASURED_H200.items():
        modelled = prep_v1(key[1]) if key[0] == "prep" else rows[key]
        assert abs(modelled / measured - 1) <= 0.25, (key, modelled, measured)
    for shape, measured in (("openimages-r101-448", 2900.0), ("coco-vitl16-448", 210.0)):
        modelled = prep_v1(shape) + rows[("fwd", shape)]
        assert abs(modelled / measured - 1) <= 0.25, (shape, modelled, measured)


def test_training_forward_keeps_the_rules_in_every_layout(tmp_path_factory):
    """The training forward that also stores its raw scores (fwd_keep), for the headline's
    channels-last and token layouts (NCHW: the main report) on Hopper (16 warps there: with 8,
    whose 128 x 256 accumulators already take 255 registers, the stores spilled), Ampere,
    Ada/RTX 50 (99 KB) and CDNA3: 0 spills, tensor cores. Not on Blackwell (sm_100a), which
    recomputes the scores instead (8 B of spills with 8 warps under triton 3.6; 16 warps
    leave tcgen05)."""
    doc, _ = _inspect(tmp_path_factory, "--arch", "sm_90a,sm_80,sm_120,gfx942", "--shapes",
                      HEADLINE, "--layouts", "channels_last,tokens", "--kernels", "fwd_keep")
    assert doc["broken"] == [], "\n".join(doc["broken"])
    assert len(doc["rows"]) == 4 * 2
    assert all(r["mma"] == "wgmma" for r in doc["rows"] if r["arch"] == "sm_90a")
