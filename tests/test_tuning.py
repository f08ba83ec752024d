"""Launch configs: pruning, the persisted cache, the single-config fallback, and that every tile
shape the tuner may pick computes the same function (run in the interpreter on CPU)."""
import json

import pytest
import torch

import csra_triton
import csra_triton.triton_impl
from csra_triton.tools import benchmark as bm
from csra_triton import tuning
from csra_triton.common import BoundedCache
from csra_triton.tools.cli import main
from helpers import INF, op_values, ref64, rel_err

EDGE = [("N=1", 4, 80, 2048, 1), ("C=1", 4, 1, 2048, 49), ("H=1,C=1,N=1,d=3", 1, 1, 3, 1),
        ("H=8,N=577", 8, 80, 1024, 577)]
SHAPES = [(s.name, s.heads, s.C, s.d, s.N) for s in bm.SHAPES.values()] + EDGE


@pytest.mark.parametrize("name, H, C, D, N", SHAPES, ids=[s[0] for s in SHAPES])
def test_pruned_space_is_valid_and_nonempty(name, H, C, D, N):
    space = tuning.config_space("fwd", H, C, D, N)
    assert space and space[0] == tuning.default_config(H, C, D, N)
    hp = tuning.pow2(H)
    for c in space:
        assert tuning.is_valid(c, H, C, D, N)
        assert hp * c.BC >= 16 and c.BN >= 32 and c.BD >= 16    # tl.dot: 16 per half-tile
        assert c.BN <= max(32, tuning.pow2(N)) and c.BD <= max(16, tuning.pow2(D))
        assert c.BC <= max(tuning.pow2(C), 64 // hp, 1)
    assert len(set(space)) == len(space)
    bwd = tuning.config_space("ds", H, C, D, N, tiles=space[-1].tiles())
    assert bwd and all(c.tiles() == space[-1].tiles() for c in bwd)


def test_pruning_rejects_oversized_tiles():
    assert not tuning.is_valid(tuning.Config(16, 64, 64), 4, 80, 2048, 9)   # BN > 32 >= N
    assert not tuning.is_valid(tuning.Config(2, 32, 64), 4, 80, 2048, 49)   # 8 rows < 16
    assert not tuning.is_valid(tuning.Config(16, 16, 64), 4, 80, 2048, 9)   # 8-position halves
    assert not tuning.is_valid(tuning.Config(32, 32, 64), 4, 3, 2048, 49)   # BC >> classes
    assert tuning.is_valid(tuning.Config(16, 32, 64), 4, 3, 2048, 49)       # 64 rows: wgmma
    assert tuning.is_valid(tuning.Config(4, 32, 16), 4, 1, 3, 1)            # 16-row minimum


def test_cache_round_trip_and_mismatches_ignored(tmp_path):
    path = tmp_path / "tune.json"
    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0"}
    cfg = tuning.Config(16, 32, 128, 8, 3)
    key = tuning.make_key("fwd", 4, 80, 2048, 196, torch.bfloat16)
    tuning.save_choice(key, cfg, 0.05, env, path)
    tuning.save_choice(key, tuning.Config(8, 16, 64), 0.07, env, path)      # replaces
    assert tuning.load_cache(env, path) == {key: tuning.Config(8, 16, 64)}
    assert len(json.loads(path.read_text())["entries"]) == 1
    for other in ({**env, "gpu": "NVIDIA H200"}, {**env, "triton": "3.9.0"},
                  {**env, "torch": "2.13.0"}):
        assert tuning.load_cache(other, path) == {}
    path.write_text("not json")
    assert tuning.load_cache(env, path) == {}


def test_cache_files_naming_the_ds_kernel_bwd_still_serve(tmp_path):
    """Cache files written before the dS' kernel had one name key it "bwd": their entries
    serve the "ds" lookups, a "ds" choice saved for the same key replaces them, and a key
    without a kernel part is skipped, not an error. Everything that takes a kernel name takes
    today's only."""
    path = tmp_path / "tune.json"
    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0"}
    ds = tuning.make_key("ds", 4, 80, 2048, 196, torch.bfloat16)
    old = ds.replace("ds|", "bwd|", 1)
    tuning.save_choice(old, tuning.Config(16, 32, 128, 8, 3), 0.05, env, path)
    assert tuning.load_cache(env, path) == {ds: tuning.Config(16, 32, 128, 8, 3)}
    tuning.save_choice(ds, tuning.Config(16, 32, 128, 4, 2), 0.04, env, path)
    doc = json.loads(path.read_text())
    assert [e["key"] for e in doc["entries"]] == [ds]
    doc["entries"].append(dict(key="no-kernel-part", config={"BC": 1, "BN": 1, "BD": 1}, **env))
    path.write_text(json.dumps(doc))
    assert tuning.load_cache(env, path) == {ds: tuning.Config(16, 32, 128, 4, 2)}
    shape = tuning.Problem(B=2, heads=4, C=80, d=2048, N=196)
    space = tuning.config_space("ds", 4, 80, 2048, 196, 2, tiles=(16, 32, 128))
    for call in (lambda: tuning.config_space("bwd", 4, 80, 2048, 196),
                 lambda: tuning.drop_known_spills(space, "bwd", shape, torch.bfloat16, "sm_90a",
                                                  "f" * 32),
                 lambda: csra_triton.triton_impl.kernel_source("bwd")):
        with pytest.raises(ValueError, match="kernel must be one of"):
            call()


def test_an_empty_batch_asks_tuning_for_nothing(monkeypatch):
    """B = 0 prepares the weight and launches nothing else, so it has no config to choose: a
    sweep of empty launches would time launch overhead alone and save a config picked by
    noise for every later batch of that key."""
    asked, choose = [], tuning.choose
    monkeypatch.setattr(tuning, "choose", lambda *a, **k: asked.append(a[:5]) or choose(*a, **k))
    head = csra_triton.CSRATriton(16, 6, heads=2)
    x = torch.randn(0, 16, 3, 2, requires_grad=True)
    with csra_triton.use_backend("triton"):
        with torch.no_grad():
            assert head(x).shape == (0, 6)
        head(x).sum().backward()
        y, *state = torch.ops.csra_triton.csra_fwd(x.flatten(2), head.weight,
                                                    op_values([1.0, INF], 0.1),
                                                    True)
    assert asked == []
    assert x.grad.shape == x.shape and not x.grad.any()
    assert head.weight.grad is not None and not head.weight.grad.any()


def test_single_config_without_gpu(monkeypatch):
    """Without CUDA (or under the interpreter) the default is used and nothing is timed."""
    monkeypatch.setenv("CSRA_TRITON_AUTOTUNE", "1")

    def bench(cfg):
        raise AssertionError("benchmarked without a GPU")

    x = torch.randn(2, 64, 49)
    tuning._memory.clear()
    assert tuning.choose("fwd", 4, 80, 64, 49, x, bench) == tuning.default_config(4, 80, 64, 49, 4)
    tiles = (8, 32, 32)
    assert tuning.choose("ds", 4, 80, 64, 49, x, bench, tiles=tiles).tiles() == tiles


# 16, 64 and 128 rows; 32 positions (two tiles over N=35: the online softmax) or 64 (one pass).
CONFIGS = [tuning.Config(4, 32, 16), tuning.Config(16, 64, 32), tuning.Config(32, 32, 64)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.label().replace(" ", ","))
def test_other_tiles_compute_the_same_function(cfg, device, monkeypatch):
    """Tiles the tuner may choose (injected as a cached choice) give the same values and grads."""
    H, C, D, h, w = 4, 37, 40, 5, 7
    monkeypatch.setattr(tuning, "_memory", BoundedCache(16))
    for kernel in ("fwd", "ds"):
        tuning._memory.set(tuning.make_key(kernel, H, C, D, h * w, torch.float32), cfg)
    monkeypatch.setattr(csra_triton.triton_impl, "DS_WORKSPACE_ELEMS", 900)  # several chunks
    monkeypatch.setattr(csra_triton.triton_impl, "_plans", BoundedCache(16))  # no plan from before
    x = torch.randn(2, D, h, w, device=device, requires_grad=True)
    weight = torch.randn(H, C, D, device=device, requires_grad=True)
    g = torch.randn(2, C, device=device)
    temps = [1.0, 2.0, 4.0, INF]
    with csra_triton.use_backend("triton"):
        y = csra_triton.csra(x, weight, temps, 0.3)
        y.backward(g)
    ref, dx, dw = ref64(x, weight, temps, 0.3, grad=g)
    assert rel_err(y, ref) <= 1e-5
    assert rel_err(x.grad, dx) <= 1e-5 and rel_err(weight.grad, dw) <= 1e-5


def test_tune_command_on_cpu_lists_the_space(capsys):
    if torch.cuda.is_available():
        pytest.skip("on CUDA the command sweeps; covered by bench/gpu_check.sh")
    assert main(["tune", "--shapes", "coco-r101-448,latency-r101-224"]) == 0
    out = capsys.readouterr().out
    assert "sweeps need CUDA" in out and "coco-r101-448:" in out and "forward configs" in out


def _sweep(bench, configs):
    rejected = []
    try:
        results = tuning.sweep(configs, bench, rejected=rejected)
    except RuntimeError:          # no config passed
        results = []
    return results, [why for _, why in rejected]


def test_the_sweep_times_only_correct_spill_free_candidates(device, monkeypatch):
    """The harness every autotuning sweep runs (``triton_impl.fwd_bench`` / ``ds_bench`` with
    ``tuning.checked_timer``), here in the interpreter with the GPU timer stubbed: a candidate
    is timed only if its output equals float64 (``tuning.y_reference``; for dS', the default
    config's) and its compiled form does not spill. A launch that writes something else, and
    one that spills, are rejected with the reason."""
    ti = csra_triton.triton_impl
    from csra_triton import common

    monkeypatch.setattr(tuning, "time_ms", lambda fn: (fn(), 1.0)[1])
    H, C, D, N = 4, 5, 24, 12
    x = torch.randn(2, D, N, device=device)
    weight = torch.randn(H, C, D, device=device)
    temps = [1.0, 2.0, 4.0, INF]
    params = ti.params_tensor(temps, 0.3, torch.float32, x.device)
    # y_reference is the float64 head on the prepared operands: their fp32 inverse norms
    # (2^-24 relative) are its only difference from the head on the weight itself
    w_op, inv_n = ti.prep_weight(x, weight, True)
    ref = tuning.y_reference(x, w_op.view(H, C, D), inv_n, params)
    assert rel_err(ref, ref64(x, weight, temps, 0.3)) <= 4 * 2.0 ** -24
    configs = CONFIGS[:2]

    outs = common.fwd_outputs(x, H, C, common.empty)
    results, why = _sweep(ti.fwd_bench(x, weight, params, outs), configs)
    assert [c for c, _ in results] == configs and why == []

    real_call = ti.fwd_call

    class Wrong:                  # the launch runs, then its y is off by one
        def __init__(self, call):
            self.call = call

        def run(self):
            kernel = self.call.run()
            outs[0].add_(1.0)
            return kernel

    monkeypatch.setattr(ti, "fwd_call", lambda *a, **k: Wrong(real_call(*a, **k)))
    results, why = _sweep(ti.fwd_bench(x, weight, params, outs), configs)
    assert results == [] and all("differs from its reference" in w for w in why) and len(why) == 2

    class Spilling(Wrong):
        def run(self):
            self.call.run()
            return type("Kernel", (), {"n_spills": 8})()

    monkeypatch.setattr(ti, "fwd_call", lambda *a, **k: Spilling(real_call(*a, **k)))
    results, why = _sweep(ti.fwd_bench(x, weight, params, outs), configs)
    assert results == [] and why == ["ConfigRejected: spills 8 registers"] * 2

    # dS': each candidate against the default config's output (the sweep's first)
    monkeypatch.setattr(ti, "fwd_call", real_call)
    grad_y = torch.randn(2, C, device=device)
    w_op, inv_n = ti.prep_weight(x, weight, True)
    ti.fwd_call(x, w_op, inv_n, params, outs, configs[0], H).run()
    ws = torch.empty(H * C * 2 * N, device=device)

    def ds_bench():
        return ti.ds_bench(x, w_op, inv_n, params, grad_y, outs[1:5], C, ws)

    results, why = _sweep(ds_bench(), configs)
    assert [c for c, _ in results] == configs and why == []
    real_ds = ti.ds_call

    def wrong_second(*a, **k):
        call = real_ds(*a, **k)
        if a[9] != configs[1]:
            return call
        out = a[8]
        return type("Call", (), {"run": lambda self: (call.run(), out.add_(1.0))[0]})()

    monkeypatch.setattr(ti, "ds_call", wrong_second)
    results, why = _sweep(ds_bench(), configs)
    assert [c for c, _ in results] == configs[:1] and len(why) == 1, why
    assert "differs from its reference" in why[0]


def test_configs_the_compile_report_saw_spill_are_dropped(tmp_path, monkeypatch):
    """The compile report's cache keys a launch by ``inspect_key`` and the launch's layout,
    precision, constexprs, warps and stages; a config it saw spill (in any layout) is dropped
    from a sweep without compiling it again, one it saw clean or never compiled is kept."""
    path = tmp_path / "inspect.json"
    monkeypatch.setenv("CSRA_TRITON_INSPECT_CACHE", str(path))
    shape = tuning.Problem(B=2, heads=4, C=80, d=2048, N=196)
    space = tuning.config_space("fwd", 4, 80, 2048, 196, 2, arch="sm_90a")
    spills, clean, unseen = space[1], space[2], space[3]

    def key(cfg, layout):
        return (tuning.inspect_key("fwd", "sm_90a", shape, torch.bfloat16, cfg, "f" * 32)
                + f"|{layout}|ieee|[('BC', {cfg.BC})]|{cfg.num_warps}|{cfg.num_stages}")

    cache = {key(spills, "nchw"): {"spill_bytes": 0}, key(spills, "tokens"): {"spill_bytes": 8},
             key(clean, "nchw"): {"spill_bytes": 0}}
    tuning.save_inspect_cache(cache)
    kept, dropped = tuning.drop_known_spills(space, "fwd", shape, torch.bfloat16, "sm_90a",
                                             "f" * 32)
    assert dropped == [spills] and clean in kept and unseen in kept and kept[0] == space[0]
