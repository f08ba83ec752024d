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
from helpers import INF, ref64, rel_err

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
    bwd = tuning.config_space("bwd", H, C, D, N, tiles=space[-1].tiles())
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


def test_single_config_without_gpu(monkeypatch):
    """Without CUDA (or under the interpreter) the default is used and nothing is timed."""
    monkeypatch.setenv("CSRA_TRITON_AUTOTUNE", "1")

    def bench(cfg):
        raise AssertionError("benchmarked without a GPU")

    x = torch.randn(2, 64, 49)
    tuning._memory.clear()
    assert tuning.choose("fwd", 4, 80, 64, 49, x, bench) == tuning.default_config(4, 80, 64, 49, 4)
    tiles = (8, 32, 32)
    assert tuning.choose("bwd", 4, 80, 64, 49, x, bench, tiles=tiles).tiles() == tiles


# 16, 64 and 128 rows; 32 positions (two tiles over N=35: the online softmax) or 64 (one pass).
CONFIGS = [tuning.Config(4, 32, 16), tuning.Config(16, 64, 32), tuning.Config(32, 32, 64)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.label().replace(" ", ","))
def test_other_tiles_compute_the_same_function(cfg, device, monkeypatch):
    """Tiles the tuner may choose (injected as a cached choice) give the same values and grads."""
    H, C, D, h, w = 4, 37, 40, 5, 7
    monkeypatch.setattr(tuning, "_memory", BoundedCache(16))
    for kernel in ("fwd", "bwd"):
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
