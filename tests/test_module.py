"""CSRATriton: parameters, defaults, official checkpoints, layouts, input errors."""
import math

import pytest
import torch
from torch import nn

import csra_triton
from csra_triton import CSRATriton
from csra_triton.reference import MHA, OFFICIAL_TEMPERATURES
from helpers import INF, TOL, ref64, rel_err


def test_parameter_layout_and_init():
    m = CSRATriton(64, 10, heads=4)
    names = dict(m.named_parameters())
    assert list(names) == ["weight"] and m.weight.shape == (4, 10, 64)
    bound = 1 / math.sqrt(64)  # Conv2d default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert m.weight.abs().max() <= bound
    big = CSRATriton(256, 200, heads=2).weight
    assert abs(big.std().item() - (1 / math.sqrt(256)) / math.sqrt(3)) < 5e-3


@pytest.mark.parametrize("heads", sorted(OFFICIAL_TEMPERATURES))
def test_official_temperatures(heads):
    m = CSRATriton(8, 3, heads=heads)
    expected = [INF if t == 99 else float(t) for t in OFFICIAL_TEMPERATURES[heads]]
    assert m.temperatures == tuple(expected)


def test_custom_heads_need_temperatures():
    with pytest.raises(ValueError, match="temperatures"):
        CSRATriton(8, 3, heads=3)
    assert CSRATriton(8, 3, heads=3, temperatures=[0.5, 3, 99]).temperatures == (0.5, 3.0, INF)


@pytest.mark.parametrize("kwargs, match", [
    (dict(in_ch=0, classes=3), "in_ch"),
    (dict(in_ch=8, classes=0), "classes"),
    (dict(in_ch=8, classes=3, heads=0), "heads"),
    (dict(in_ch=8, classes=3, heads=2, temperatures=[1]), "temperatures"),
    (dict(in_ch=8, classes=3, heads=1, temperatures=[0]), "temperatures"),
    (dict(in_ch=8, classes=3, heads=1, temperatures=[math.nan]), "temperatures"),
    (dict(in_ch=8, classes=3, lam=math.inf), "lam"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CSRATriton(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_dtype_and_values(dtype, device):
    m = CSRATriton(24, 7, heads=6).to(device)
    x = torch.randn(2, 24, 4, 3, device=device, dtype=dtype)
    y = m(x)
    assert y.dtype == dtype and y.shape == (2, 7)
    assert rel_err(y, ref64(x, m.weight, m.temperatures, m.lam)) <= TOL[dtype]


def test_official_state_dict_gives_official_outputs(device):
    official = MHA(4, 0.1, 32, 6).to(device).double()
    m = CSRATriton(32, 6, heads=4).to(device).double()
    m.load_state_dict(official.state_dict())
    x = torch.randn(3, 32, 5, 5, device=device, dtype=torch.float64)
    assert rel_err(m(x), official(x)) <= 1e-12
    for k in range(4):
        assert torch.equal(m.weight[k], official.multi_head[k].head.weight.view(6, 32))


def test_official_state_dict_under_prefix(device):
    """A full model's checkpoint: the head sits under a prefix such as ``classifier.``."""
    official = nn.Sequential()
    official.add_module("classifier", MHA(2, 0.1, 16, 5))
    ours = nn.Sequential()
    ours.add_module("classifier", CSRATriton(16, 5, heads=2))
    ours.load_state_dict(official.state_dict())
    x = torch.randn(2, 16, 3, 3)
    assert rel_err(ours(x), official(x)) <= 1e-5


@pytest.mark.parametrize("mutate, match", [
    (lambda sd: sd.pop("multi_head.1.head.weight"), "missing key 'multi_head.1.head.weight'"),
    (lambda sd: sd.__setitem__("multi_head.0.head.weight", torch.zeros(5, 16, 1, 1)), "shape"),
    (lambda sd: sd.__setitem__("multi_head.2.head.weight", torch.zeros(6, 16, 1, 1)),
     "more than heads=2"),
    (lambda sd: sd.__setitem__("multi_head.0.head.bias", torch.zeros(6)), "bias"),
])
def test_official_state_dict_errors(mutate, match):
    sd = MHA(2, 0.1, 16, 6).state_dict()
    mutate(sd)
    with pytest.raises(RuntimeError, match=match):
        CSRATriton(16, 6, heads=2).load_state_dict(sd)


def test_layouts_agree(device):
    m = CSRATriton(16, 5, heads=4).to(device)
    x = torch.randn(2, 16, 3, 4, device=device)
    y = m(x)
    assert rel_err(m(x.to(memory_format=torch.channels_last)), y) <= 1e-6
    tokens = x.flatten(2).transpose(1, 2).contiguous()  # (B, N, d)
    assert rel_err(m.forward_tokens(tokens), y) <= 1e-6


@pytest.mark.parametrize("make_x, err, match", [
    (lambda: torch.randn(2, 16, 9), ValueError, "4-D"),
    (lambda: torch.randn(2, 15, 3, 3), ValueError, "16 channels"),
    (lambda: torch.randn(2, 16, 0, 3), ValueError, "h\\*w"),
    (lambda: torch.randint(0, 5, (2, 16, 3, 3)), TypeError, "dtype"),
    (lambda: [[1.0]], TypeError, "torch.Tensor"),
])
def test_bad_inputs(make_x, err, match):
    m = CSRATriton(16, 5, heads=2)
    with pytest.raises(err, match=match):
        m(make_x())


def test_bad_functional_arguments():
    x, w = torch.randn(2, 8, 3, 3), torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="weight"):
        csra_triton.csra(x, w[0], [1], 0.1)
    with pytest.raises(ValueError, match="one per head"):
        csra_triton.csra(x, w, [1], 0.1)
    with pytest.raises(ValueError, match="> 0"):
        csra_triton.csra(x, w, [1, -2], 0.1)
    with pytest.raises(ValueError, match="lam"):
        csra_triton.csra(x, w, [1, 2], math.nan)
    with pytest.raises(TypeError, match="lam"):
        csra_triton.csra(x, w, [1, 2], torch.tensor([0.1, 0.2]))     # a tensor lam: one element
    with pytest.raises(TypeError, match="lam"):
        csra_triton.csra(x, w, [1, 2], "0.1")
    with pytest.raises(ValueError, match="layout"):
        csra_triton.csra(x, w, [1, 2], 0.1, layout="nhwc")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch():
    with pytest.raises(ValueError, match="same device"):
        csra_triton.csra(torch.randn(2, 8, 3, 3), torch.randn(2, 4, 8, device="cuda"), [1, 2], 0.1)


def test_empty_batch(backend, device):
    m = CSRATriton(8, 5, heads=2).to(device)
    x = torch.randn(0, 8, 3, 3, device=device, requires_grad=True)
    y = m(x)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.count_nonzero(m.weight.grad) == 0
