"""What a user sees at the edges, against float64 and the official head (hardening round 3).

Each test names the bug it fails on, and was seen to fail with that bug put back:

* batched gradients (``autograd.grad(..., is_grads_batched=True)``,
  ``jacobian(vectorize=True)``) failing on the eager path: the loop and the kernels read a
  batched tensor's storage, and a learnable lam's einsum has no batching rule;
* NaN logits where the official head is finite: a temperature that rounds to 0 in fp32, a
  weight row whose fp32 norm overflows (the kernels' ``best * cz`` of an empty half is NaN
  when cz is 0);
* logits in the autocast dtype where the official head returns fp32 (its bf16 conv output
  divided by the fp32 row norms);
* degenerate sizes (0 classes, 0 heads, 0 channels) and malformed checkpoints failing with
  internal errors, or the two backends disagreeing.
"""
import math

import pytest
import torch

import csra_triton
from csra_triton import ops, settings
from csra_triton.reference import MHA, csra_reference
from helpers import INF, TOL, ref64, rel_err

BACKENDS = ["triton", "torch"]
TEMPS = [1.0, 2.0, 4.0, INF]
TOL32 = TOL[torch.float32]


@pytest.fixture(params=["eager", "ops"])
def path(request, monkeypatch):
    """The eager path (a plain autograd.Function) and the custom ops (CSRA_TRITON_EAGER=0)."""
    monkeypatch.setattr(ops, "EAGER", request.param == "eager")
    return request.param


# --------------------------------------------------------------------------- batched gradients


def _ref_grads(x, weight, lam, go):
    """float64 (dx, dW, dlam) of csra_reference for one grad_output ``go``."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    lam64 = torch.tensor(float(lam), dtype=torch.float64, requires_grad=True)
    y = csra_reference(x64, w64, TEMPS, lam64)
    return torch.autograd.grad(y, (x64, w64, lam64), go.double())


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tokens"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_is_grads_batched_matches_float64(backend_name, path, layout):
    """A batch of 3 grad_outputs through x, the weight and a learnable lam, each slice equal to
    float64's gradient for that grad_output."""
    x = torch.randn(2, 8, 3, 2)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(4, 5, 8, requires_grad=True)
    lam = torch.nn.Parameter(torch.tensor(0.3))
    x.requires_grad_()
    gos = torch.randn(3, 2, 5)
    with ops.use_backend(backend_name):
        if layout == "tokens":
            y = csra_triton.csra(x.flatten(2).transpose(1, 2), weight, TEMPS, lam,
                                 layout="tokens")
        else:
            y = csra_triton.csra(x, weight, TEMPS, lam)
        gx, gw, glam = torch.autograd.grad(y, (x, weight, lam), gos, is_grads_batched=True)
    assert gx.shape == (3, *x.shape) and gw.shape == (3, *weight.shape) and glam.shape == (3,)
    for i in range(3):
        rx, rw, rlam = _ref_grads(x, weight, 0.3, gos[i])
        assert rel_err(gx[i], rx) <= TOL32
        assert rel_err(gw[i], rw) <= TOL32
        assert rel_err(glam[i], rlam) <= TOL32


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_jacobian_vectorized_matches_float64(backend_name, path):
    """``jacobian(vectorize=True)`` (vmap over is_grads_batched) for x, weight and lam."""
    x = torch.randn(2, 4, 2, 2)
    weight = torch.randn(4, 3, 4)
    lam = torch.tensor(0.2)

    def f(x, w, lam_):
        return csra_triton.csra(x, w, TEMPS, lam_)

    with ops.use_backend(backend_name):
        jx, jw, jlam = torch.autograd.functional.jacobian(f, (x, weight, lam), vectorize=True)
    rx, rw, rlam = torch.autograd.functional.jacobian(
        lambda a, b, c: csra_reference(a, b, TEMPS, c),
        (x.double(), weight.double(), lam.double()))
    assert rel_err(jx, rx) <= TOL32
    assert rel_err(jw, rw) <= TOL32
    assert rel_err(jlam, rlam) <= TOL32


# --------------------------------------------------------------------------- degenerate values


def _official(x, weight, temps, lam):
    """The official head (per-head 1x1 convs, fp32), temperatures as given (99: max)."""
    temps = [99 if math.isinf(t) else t for t in temps]
    return MHA.from_weight(weight, temps, lam)(x)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_temperature_that_rounds_to_zero_is_a_uniform_softmax(backend_name, path):
    """T = 1e-46 is > 0 but 0 in fp32: the official fp32 head's softmax(s * T) is uniform
    (att = mean s), finite; so are ours, forward and backward, against float64 with T = 0."""
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    weight = torch.randn(4, 5, 8, requires_grad=True)
    temps = [1e-46, 2.0, 1e-46, INF]
    with ops.use_backend(backend_name):
        y = csra_triton.csra(x, weight, temps, 0.3)
        g = torch.randn_like(y)
        dx, dw = torch.autograd.grad(y, (x, weight), g)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all() and torch.isfinite(dw).all()
    assert rel_err(y, _official(x.detach(), weight.detach(), temps, 0.3)) <= TOL32
    y64, dx64, dw64 = ref64(x, weight, [0.0, 2.0, 0.0, INF], 0.3, grad=g)
    assert rel_err(y, y64) <= TOL32
    assert rel_err(dx, dx64) <= TOL32 and rel_err(dw, dw64) <= TOL32


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's
@pytest.mark.parametrize("n", [1, 5, 40], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_weight_row_with_overflowing_norm_matches_official(backend_name, n):
    """A weight row of entries 1e19: its fp32 norm is inf, the official head divides by it and
    gets 0 for that row's scores; every logit (that class's is 0 + its other heads') is the
    official head's, none NaN. N = 1, 5 (a tile with empty halves) and 40 (several tiles)."""
    x = torch.randn(2, 8, 1, n)
    weight = torch.randn(4, 5, 8)
    weight[0, 2] = 1e19
    with ops.use_backend(backend_name):
        y = csra_triton.csra(x, weight, TEMPS, 0.3)
    ref = _official(x, weight, TEMPS, 0.3)
    assert torch.isfinite(ref).all() and torch.isfinite(y).all()
    assert rel_err(y, ref) <= TOL32


# --------------------------------------------------------------------------- autocast dtype


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_logits_dtype_under_autocast_is_the_official_heads(backend_name, autocast_dtype,
                                                           weight_dtype, device):
    """Under autocast the logits come back in the official head's dtype (fp32 for an fp32
    weight: its conv output is divided by fp32 norms), rounded once from the fp32 sums: as
    close to float64 as the official head, or closer."""
    x = torch.randn(2, 16, 4, 4, device=device)
    weight = torch.randn(4, 6, 16, device=device).to(weight_dtype)
    official = MHA.from_weight(weight, [1, 2, 4, 99], 0.3)
    with torch.autocast(device, dtype=autocast_dtype), ops.use_backend(backend_name):
        y = csra_triton.csra(x, weight, TEMPS, 0.3)
        y_off = official(x)
        y_unnorm = csra_triton.csra(x, weight, TEMPS, 0.3, normalize=False)
    assert y.dtype == y_off.dtype
    # without normalisation there is no division (the official head always divides): the
    # autocast dtype, as the conv output
    assert y_unnorm.dtype == autocast_dtype
    x_op = x.to(autocast_dtype)       # what the official conv multiplies
    ref = ref64(x_op, weight, TEMPS, 0.3)
    assert rel_err(y, ref) <= max(1.25 * rel_err(y_off, ref), TOL[torch.float32])


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_fp64_weight_under_autocast(backend_name, device):
    """An fp64 weight (a head cast with ``.double()``) beside fp32 features under bf16 autocast:
    x is cast as a conv's input would be, the weight stays fp64, the norm division promotes the
    logits to fp64; y, dW and the attention maps against float64 on the operands multiplied
    (bf16 x, the weight rounded to bf16): bf16's TOL, as for every bf16 input."""
    x = torch.randn(2, 16, 3, 3, device=device)
    head = csra_triton.CSRATriton(16, 5, 4, 0.3).double().to(device)
    g = torch.randn(2, 5, device=device, dtype=torch.float64)
    with torch.autocast(device, dtype=torch.bfloat16), ops.use_backend(backend_name):
        y = head(x)
        y.backward(g)
        maps = head.attention_maps(x)
    assert y.dtype == torch.float64 and head.weight.grad.dtype == torch.float64
    x_op = x.to(torch.bfloat16)
    ref, _, dw = ref64(x_op, head.weight, head.temperatures, 0.3, grad=g)
    assert rel_err(y, ref) <= TOL[torch.bfloat16]
    assert rel_err(head.weight.grad, dw) <= TOL[torch.bfloat16]
    assert maps.shape == (2, 4, 5, 3, 3) and torch.isfinite(maps).all()


def test_model_cast_to_bf16_stays_bf16(device):
    """A head cast with ``.to(bf16)`` and bf16 features, no autocast: bf16 logits, as the
    official head's."""
    head = csra_triton.CSRATriton(16, 6, heads=4).to(device).bfloat16()
    x = torch.randn(2, 16, 4, 4, device=device, dtype=torch.bfloat16)
    official = MHA.from_weight(head.weight.detach(), [1, 2, 4, 99], head.lam)
    assert head(x).dtype == official(x).dtype == torch.bfloat16


# --------------------------------------------------------------------------- settings


@pytest.mark.no_triton
def test_every_setting_refuses_a_bad_value_naming_the_variable():
    """Each variable of the settings table: a malformed value raises ValueError naming it and
    what it accepts (no value falls back silently: ``true`` for a 0/1 flag used to mean
    automatic, ``false`` left the eager path on)."""
    bad = {"EAGER": "maybe", "POISON": "2", "ONEDNN_FP32": "nein", "CPU_BF16_GEMM": "2",
           "CPU_KEEP_RATIO": "-1", "DIRECT_LAUNCH": "yes please", "DS_ELEMS": "0",
           "KEEP_WEIGHT_BYTES": "1e6", "KEEP_SCORES": "offf", "CB_MAJOR_BYTES": "-3",
           "AUTOTUNE": "sometimes"}
    names = [v for v in settings.variables() if v.startswith("CSRA_TRITON_")
             and v not in ("CSRA_TRITON_TUNE_CACHE", "CSRA_TRITON_INSPECT_CACHE")]
    assert sorted(names) == sorted("CSRA_TRITON_" + k for k in bad)
    for k, v in bad.items():
        with pytest.raises(ValueError, match=f"CSRA_TRITON_{k}: expected"):
            settings.from_environ({f"CSRA_TRITON_{k}": v})


@pytest.mark.no_triton
@pytest.mark.parametrize("word,value", [("1", True), ("true", True), ("YES", True), ("on", True),
                                        ("0", False), ("false", False), ("No", False),
                                        ("off", False)])
def test_flags_take_the_usual_words(word, value):
    env = settings.from_environ({"CSRA_TRITON_EAGER": word, "CSRA_TRITON_CPU_BF16_GEMM": word,
                                 "CSRA_TRITON_KEEP_SCORES": word})
    assert env.eager is value and env.cpu_bf16_gemm is value and env.keep_scores is value


@pytest.mark.no_triton
def test_unset_or_empty_is_the_default():
    d = settings.Settings()
    assert settings.from_environ({}) == d
    assert settings.from_environ({v: "" for v in settings.variables()}) == d
    assert settings.from_environ({"CSRA_TRITON_CPU_BF16_GEMM": "auto"}).cpu_bf16_gemm is None
    assert settings.from_environ({"CSRA_TRITON_DS_ELEMS": "1_024"}).ds_elems == 1024
    # TRITON_INTERPRET is Triton's own: not among the package's settings, never refused
    assert "TRITON_INTERPRET" not in settings.variables()
    assert settings.from_environ({"TRITON_INTERPRET": "bogus"}) == d


@pytest.mark.no_triton
def test_a_bad_setting_fails_the_import(tmp_path):
    """At import, in a fresh process: the error names the variable; a good value is taken."""
    import os
    import subprocess
    import sys

    code = "import csra_triton.ops as o; print('eager', o.EAGER)"
    for val, want, ok in (("off", "eager False", True),
                          ("false-ish", "CSRA_TRITON_EAGER: expected one of", False)):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=dict(os.environ, CSRA_TRITON_EAGER=val), timeout=300)
        assert want in run.stdout + run.stderr and (run.returncode == 0) == ok


# --------------------------------------------------------------------------- degenerate sizes


@pytest.mark.parametrize("layout", ["nchw", "tokens"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_zero_classes_give_empty_logits_on_both_backends(backend_name, path, layout):
    """0 classes: an empty (B, 0), in the autocast-free dtype of x; the backward gives a zero
    dx and an empty dW (the fallback failed in its chunk loop, "range() arg 3 must not be
    zero")."""
    x = torch.randn(2, 8, 3, 3)
    if layout == "tokens":
        x = x.flatten(2).transpose(1, 2).contiguous()
    x.requires_grad_()
    weight = torch.randn(4, 0, 8, requires_grad=True)
    with ops.use_backend(backend_name):
        y = csra_triton.csra(x, weight, TEMPS, 0.3, layout=layout)
        assert y.shape == (2, 0) and y.dtype == x.dtype
        dx, dw = torch.autograd.grad(y, (x, weight), torch.ones_like(y))
    assert torch.equal(dx, torch.zeros_like(x)) and dw.shape == weight.shape


@pytest.mark.parametrize("shape", [(0, 3, 8), (4, 3, 0)], ids=["0heads", "0channels"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_zero_heads_or_channels_are_refused(backend_name, shape):
    """0 heads or 0 channels: a ValueError naming the weight, before any kernel, on both
    backends and through CSRAFunction (the fallback failed with a reshape or oneDNN error;
    the Triton path returned values)."""
    H, C, D = shape
    weight = torch.randn(H, C, D)
    x = torch.randn(2, D, 2, 2)
    with ops.use_backend(backend_name):
        with pytest.raises(ValueError, match=r"weight: expected .*heads >= 1 and in_ch >= 1"):
            csra_triton.csra(x, weight, [1.0] * H, 0.1)
        with pytest.raises(ValueError, match=r"weight: expected .*heads >= 1 and in_ch >= 1"):
            csra_triton.CSRAFunction.apply(x.flatten(2), weight, [1.0] * H, 0.1)


@pytest.mark.no_triton
@pytest.mark.parametrize("bad", [torch.tensor(1.0), torch.randn(5, 8), "weights"],
                         ids=["0-d", "2-d", "str"])
def test_malformed_official_checkpoint_names_the_key(bad):
    """A 0-d (or otherwise not (C, d, 1, 1)) value under an official key: an
    OfficialCheckpointError (a ValueError) naming the key and the expected shape, from
    load_official and describe_official (were IndexError and 'not enough values to unpack')."""
    from csra_triton import OfficialCheckpointError
    from csra_triton.models import describe_official

    sd = {"classifier.multi_head.0.head.weight": bad,
          "classifier.multi_head.1.head.weight": torch.randn(5, 8, 1, 1)}
    with pytest.raises(OfficialCheckpointError, match=r"multi_head.0.head.weight.*\(classes, in_ch, 1, 1\)"):
        csra_triton.load_official(sd)
    with pytest.raises(OfficialCheckpointError, match=r"multi_head.0.head.weight.*\(classes, in_ch, 1, 1\)"):
        describe_official(sd)
    assert issubclass(OfficialCheckpointError, ValueError)


# --------------------------------------------------------------------------- compiled head


def _compiled(head):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    return torch.compile(head, fullgraph=True, backend=counter), counter


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_compiled_head_takes_new_lam_and_temperatures_without_recompiling(backend_name):
    """A lam schedule and new temperatures (finite <-> max heads included) on a compiled head:
    one compilation for 12 values (a float lam was a guarded constant: a recompile per value,
    and FailOnRecompileLimitHit at the 9th under fullgraph), every y, dx and dW as float64's
    for the values the head holds at that call."""
    head = csra_triton.CSRATriton(8, 5, heads=4)
    f, counter = _compiled(head)
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    with ops.use_backend(backend_name):
        for i in range(12):
            head.lam = 0.05 * (i + 1)
            head.temperatures = [1.0 + i, 2.0, 0.5 + i, INF if i % 2 else 3.0]
            head.normalize = i % 3 != 2          # (a bool: one compilation per value)
            x.grad = head.weight.grad = None
            y = f(x)
            g = torch.randn_like(y)
            y.backward(g)
            y64, dx64, dw64 = ref64(x, head.weight, list(head.temperatures), head.lam,
                                    head.normalize, grad=g)
            assert rel_err(y, y64) <= TOL32
            assert rel_err(x.grad, dx64) <= TOL32 and rel_err(head.weight.grad, dw64) <= TOL32
    assert counter.frame_count == 2                  # normalize True, then False


def test_compiled_head_after_meta_init_and_to_empty():
    """A head built on the meta device, materialised with to_empty and initialised: the
    compiled call reads the temperatures and lam the module holds (the tensor mirror it passes
    is rewritten at every device move, never left uninitialised)."""
    with torch.device("meta"):
        head = csra_triton.CSRATriton(8, 5, heads=4, lam=0.3)
    head.to_empty(device="cpu")
    head.reset_parameters()
    f, counter = _compiled(head)
    x = torch.randn(2, 8, 3, 3)
    assert rel_err(f(x), ref64(x, head.weight, list(head.temperatures), 0.3)) <= TOL32
    for lam in (0.2, 0.1, 0.3):       # the values followed the weight to the CPU: no recompile
        head.lam = lam
        assert rel_err(f(x), ref64(x, head.weight, list(head.temperatures), lam)) <= TOL32
    assert counter.frame_count == 1
    head.double()        # a dtype cast leaves the values exact
    assert rel_err(f(x.double()), ref64(x.double(), head.weight, list(head.temperatures), 0.3)) \
        <= TOL[torch.float64]
    head.type(torch.float32)     # .type() casts every tensor of the module, buffers included
    assert rel_err(f(x), ref64(x, head.weight, list(head.temperatures), 0.3)) <= TOL32



# --------------------------------------------------------------------------- hardening round 4
# nn.Module's machinery, entry points and settings that gave silently wrong results or internal
# errors (the module once mirrored lam and the temperatures in a registered buffer, which
# nn.Module moved, cast, shared and left behind).


def _sd_head(lam=0.3):
    head = csra_triton.CSRATriton(8, 5, heads=4, lam=lam)
    return head, {k: v.clone() for k, v in head.state_dict().items()}


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_meta_init_then_assign_load_compiles_and_exports_right(backend_name):
    """A head built on the meta device, then ``load_state_dict(sd, assign=True)``: eager,
    ``torch.compile(fullgraph=True)`` and ``torch.export`` all give float64's values (the
    compiled and exported calls returned uninitialised memory while a buffer stayed on meta)."""
    _, sd = _sd_head()
    with torch.device("meta"):
        head = csra_triton.CSRATriton(8, 5, heads=4, lam=0.3)
    head.load_state_dict(sd, assign=True)
    x = torch.randn(2, 8, 3, 3)
    ref = ref64(x, head.weight, list(head.temperatures), 0.3)
    with ops.use_backend(backend_name), torch.no_grad():
        assert rel_err(head(x), ref) <= TOL32
        f, counter = _compiled(head)
        assert rel_err(f(x), ref) <= TOL32
        ep = torch.export.export(head, (x,))
        assert rel_err(ep.module()(x), ref) <= TOL32
        for lam in (0.2, 0.1):        # the values followed the assigned weight: no recompile
            head.lam = lam
            assert rel_err(f(x), ref64(x, head.weight, list(head.temperatures), lam)) <= TOL32
        assert counter.frame_count == 1


def test_values_off_the_weights_device_are_never_used():
    """A compiled call whose values tensor is not on the weight's device (a weight moved
    behind the module's back, e.g. by a ``.data`` assignment) takes the Python values: right,
    if recompiled per value; never the stale tensor (here one on the meta device, holding
    nothing)."""
    head = csra_triton.CSRATriton(8, 5, heads=4, lam=0.3)
    x = torch.randn(2, 8, 3, 3)
    head.__dict__["_values"] = head._values.to("meta")
    f, _ = _compiled(head)
    with torch.no_grad():
        assert rel_err(f(x), ref64(x, head.weight, list(head.temperatures), 0.3)) <= TOL32


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_type_casts_reach_no_copy_of_the_values(backend_name):
    """``head.type(torch.float64)`` casts every tensor of the module (a mirror buffer of the
    values' float64 bits read back ~3e19); ``.type(torch.float32)`` back (the bits view then
    raised). Compiled calls after each, against float64."""
    head = csra_triton.CSRATriton(8, 5, heads=4, lam=0.3)
    x = torch.randn(2, 8, 3, 3)
    with ops.use_backend(backend_name), torch.no_grad():
        f, _ = _compiled(head)
        for dtype in (torch.float64, torch.float32):
            head.type(dtype)
            y = f(x.to(dtype))
            assert y.dtype == dtype
            assert rel_err(y, ref64(x.to(dtype), head.weight, list(head.temperatures), 0.3)) \
                <= TOL[dtype]


def test_ds_config_of_other_tiles_never_serves(monkeypatch, device):
    """A dS' config cached for other tiles than the forward's (``tune --kernel ds`` against the
    default forward, then ``tune --kernel fwd``): it is not used, and the grid is sized by the
    forward's tiles that the kernel runs. The seeded config made dx all NaN (poisoned)."""
    from csra_triton import triton_impl, tuning
    from csra_triton.common import BoundedCache

    monkeypatch.setattr(tuning, "_memory", BoundedCache(16))
    monkeypatch.setattr(triton_impl, "KEEP_SCORES", False)      # dS' recomputed: the ds kernel
    H, C, D, N = 4, 37, 16, 9
    x = torch.randn(2, D, 3, 3, device=device, requires_grad=True)
    head = csra_triton.CSRATriton(D, C, H).to(device)
    fwd = tuning.default_config(H, C, D, N, 4)
    other = tuning.Config(max(1, fwd.BC // 2), fwd.BN, fwd.BD, 4, 2)
    tuning._memory.set(tuning.make_key("ds", H, C, D, N, x.dtype), other)
    assert tuning.choose("ds", H, C, D, N, x.detach(), tiles=fwd.tiles()).tiles() == fwd.tiles()
    tuning._memory.set(tuning.make_key("ds", H, C, D, N, x.dtype), other)
    g = torch.randn(2, C, device=device)
    with csra_triton.use_backend("triton"):
        head(x).backward(g)
    _, dx, dw = ref64(x, head.weight, list(head.temperatures), head.lam, grad=g)
    assert rel_err(x.grad, dx) <= TOL32 and rel_err(head.weight.grad, dw) <= TOL32


def test_the_ds_launch_is_sized_by_the_tiles_it_runs():
    """The dS' kernel runs the forward's tiles (its constexprs, ``kw``); its grid is sized by
    them too, whatever config supplies its warps and stages (a grid sized by a dS' config of
    other tiles left classes unwritten)."""
    from csra_triton import triton_impl, tuning

    B, D, N, H, C = 2, 16, 9, 4, 37
    x = torch.empty(B, D, N)
    fwd = tuning.default_config(H, C, D, N, 4)
    other = tuning.Config(max(1, fwd.BC // 4), fwd.BN, fwd.BD, 4, 2)
    kw = triton_impl._tile_kw(x, fwd, H, D, False, None)
    state = [torch.empty(B, H, C) for _ in range(3)] + [torch.empty(B, H, C, dtype=torch.int32)]
    call = triton_impl.ds_call(x, torch.empty(H * C, D), torch.empty(H, C), torch.empty(H + 2),
                               torch.empty(B, C), state, 0, C, torch.empty(H, C, B, N), other, H,
                               kw=kw)
    assert call.constexprs["BC"] == fwd.BC
    assert call.grid == (-(-C // fwd.BC), B)
    assert (call.num_warps, call.num_stages) == (other.num_warps, other.num_stages)


def test_the_tuning_key_holds_the_dtype(monkeypatch):
    """A config tuned for bf16 never serves fp32 at the same shape (on Hopper the bf16 config's
    BD = 64 in fp32 needs ~288 KB of shared memory: a failed launch)."""
    from csra_triton import tuning
    from csra_triton.common import BoundedCache

    monkeypatch.setattr(tuning, "_memory", BoundedCache(16))
    seeded = tuning.Config(16, 256, 64, 8, 3)
    tuning._memory.set(tuning.make_key("fwd", 4, 80, 64, 49, torch.bfloat16), seeded)
    x32 = torch.randn(2, 64, 49)
    assert tuning.choose("fwd", 4, 80, 64, 49, x32) == tuning.default_config(4, 80, 64, 49, 4)
    assert tuning.choose("fwd", 4, 80, 64, 49, x32.bfloat16()) == seeded


VALUES = ["1", "yes", "y", "TRUE", "on", " 1", "0", "2", ""]


@pytest.mark.no_triton
def test_triton_interpret_means_what_triton_made_of_it():
    """``TRITON_INTERPRET`` is Triton's own: the package asks the kernels Triton decorated
    whether they are interpreter functions ("yes" and "y" interpret, " 1" does not; the
    package read them the other way: bf16 results off by 2e10, or "0 active drivers"). One
    process imports torch, then forks a child per value that sets it and imports triton and
    the package afresh."""
    import json
    import subprocess
    import sys

    code = f"""
import json, os, sys, torch
for value in {VALUES!r}:
    r, w = os.pipe()
    if os.fork() == 0:
        os.close(r)
        os.environ["TRITON_INTERPRET"] = value
        import triton.knobs as k, csra_triton.triton_impl as t, csra_triton.kernels as kn
        os.write(w, json.dumps([value, t.INTERPRET, bool(k.runtime.interpret),
                                type(kn.csra_fwd_kernel).__name__]).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        print(f.read())
    _, status = os.wait()
    assert status == 0, (value, status)
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert [r[0] for r in rows] == VALUES
    for value, ours, triton_says, kind in rows:
        assert ours == triton_says == (kind == "InterpretedFunction"), (value, ours, kind)
        assert ours == (value.strip().lower() in ("1", "yes", "y", "true", "on")
                        and value == value.strip()), value


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_inductor_dynamic_backward_with_a_batch_equal_to_h_or_w(backend_name):
    """``torch.compile(dynamic=True)`` forward and backward when the first call's batch equals
    w (x (2, 8, 3, 2)): Inductor's stride reasoning failed on the (B, D, N) view of the
    backward's (D, B*N) dx (ValueRangeError); the op now returns the buffer itself."""
    torch._dynamo.reset()
    head = csra_triton.CSRATriton(8, 5, heads=4)
    f = torch.compile(head, dynamic=True, fullgraph=True)
    with ops.use_backend(backend_name):
        for shape in ((2, 8, 3, 2), (3, 8, 2, 2), (2, 8, 3, 2)):
            x = torch.randn(*shape, requires_grad=True)
            g = torch.randn(shape[0], 5)
            head.weight.grad = None
            f(x).backward(g)
            _, dx, dw = ref64(x, head.weight, list(head.temperatures), head.lam, grad=g)
            assert rel_err(x.grad, dx) <= TOL32 and rel_err(head.weight.grad, dw) <= TOL32


@pytest.mark.parametrize("entry", ["csra", "CSRAFunction"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_functional_forms_compile_with_lam_as_an_argument(backend_name, entry):
    """``torch.compile(lambda x, w, lam: csra(x, w, T, lam), fullgraph=True)``: Dynamo makes
    lam a symbolic float at its second value, which the checks read with ``math.isfinite``
    (raised, or a graph break without fullgraph); y and the gradients against float64 at four
    values."""
    torch._dynamo.reset()
    if entry == "csra":
        fn = lambda x, w, lam: csra_triton.csra(x, w, TEMPS, lam)          # noqa: E731
    else:
        fn = lambda x, w, lam: csra_triton.CSRAFunction.apply(x.flatten(2), w, TEMPS, lam)  # noqa
    f = torch.compile(fn, fullgraph=True)
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    weight = torch.randn(4, 5, 8, requires_grad=True)
    with ops.use_backend(backend_name):
        for lam in (0.1, 0.2, 0.35, 0.5):
            x.grad = weight.grad = None
            y = f(x, weight, lam)
            g = torch.randn_like(y)
            y.backward(g)
            y64, dx, dw = ref64(x, weight, TEMPS, lam, grad=g)
            assert rel_err(y, y64) <= TOL32
            assert rel_err(x.grad, dx) <= TOL32 and rel_err(weight.grad, dw) <= TOL32


def test_a_head_on_the_meta_device_gives_a_meta_result():
    """Shape inference and deferred initialisation: a head and x on the meta device give a
    (B, C) meta tensor of x's dtype, as the official head does (it raised: autocast has no
    meta device); forward and backward, NCHW and tokens."""
    with torch.device("meta"):
        head = csra_triton.CSRATriton(8, 5, heads=4)
        x = torch.randn(3, 8, 4, 4, requires_grad=True)
        y = head(x)
        assert y.shape == (3, 5) and y.is_meta and y.dtype == x.dtype
        y.sum().backward()
        assert x.grad.shape == x.shape and head.weight.grad.shape == head.weight.shape
        assert head.forward_tokens(torch.randn(3, 16, 8)).shape == (3, 5)
        assert csra_triton.csra(x.bfloat16(), head.weight, TEMPS, 0.1).dtype == torch.bfloat16


def test_flop_counter_sees_the_head():
    from torch.utils.flop_counter import FlopCounterMode

    head = csra_triton.CSRATriton(8, 5, heads=4)
    with FlopCounterMode(display=False):
        y = head(torch.randn(2, 8, 3, 3))
    assert y.shape == (2, 5)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_copy_copy_keeps_two_heads_apart(backend_name):
    """``copy.copy(head)`` shares the weight but not the values: a new lam (a number, then a
    learnable one), temperatures or normalize on the copy leave the original's eager and
    compiled results as they were (a shared mirror buffer carried the copy's lam over)."""
    import copy

    head = csra_triton.CSRATriton(8, 5, heads=4, lam=0.3)
    x = torch.randn(2, 8, 3, 3)
    ref = ref64(x, head.weight, list(head.temperatures), 0.3)
    with ops.use_backend(backend_name), torch.no_grad():
        f, _ = _compiled(head)
        f(x)
        twin = copy.copy(head)
        assert twin.weight is head.weight
        for change in (dict(lam=0.9), dict(lam=torch.nn.Parameter(torch.tensor(0.7))),
                       dict(temperatures=[1.0] * 4), dict(normalize=False)):
            for k, v in change.items():
                setattr(twin, k, v)
            assert rel_err(head(x), ref) <= TOL32 and rel_err(f(x), ref) <= TOL32
            assert head.lam == 0.3 and "lam" not in dict(head.named_parameters())
        want = ref64(x, twin.weight, [1.0] * 4, 0.7, normalize=False)
        assert rel_err(twin(x), want) <= TOL32


@pytest.mark.no_triton
def test_benchmark_command_without_xdist():
    """``pytest --benchmark-only`` where pytest-xdist is not installed (here: not loaded):
    pyproject's addopts name no option of an optional plugin."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "--benchmark-only",
                          "--collect-only", "-q", "bench"], capture_output=True, text=True,
                         cwd=root, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "unrecognized arguments" not in out.stderr


@pytest.mark.no_triton
def test_cli_help_text(capsys):
    from csra_triton.tools.cli import main

    for argv in (["--help"], ["inspect", "--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert "DESIGN.md" not in text and "../shared" not in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "ten archs" in " ".join(capsys.readouterr().out.split())
