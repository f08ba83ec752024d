"""The arch table and the run-time choices keyed by it (the compile-time side is
tests/test_compiled.py)."""
import pytest
import torch

from csra_triton import archs, ops, triton_impl, tuning

pytestmark = pytest.mark.no_triton   # the arch table and the choices keyed by it: no kernel runs


def test_capabilities_and_gcn_names_map_to_checked_archs():
    assert archs.from_capability(7, 5) == "sm_75"
    assert archs.from_capability(8, 0) == "sm_80"
    assert archs.from_capability(8, 7) == "sm_86"          # Orin: nearest checked below it
    assert archs.from_capability(8, 9) == "sm_89"
    assert archs.from_capability(9, 0) == "sm_90a"
    assert archs.from_capability(10, 0) == "sm_100a"
    assert archs.from_capability(12, 0) == "sm_120"
    # ROCm reports capability 9.4 for an MI300X: its arch comes from gcnArchName, not from that
    assert archs.from_gcn("gfx942:sramecc+:xnack-") == "gfx942"
    assert archs.from_gcn("gfx90a:sramecc+:xnack-") == "gfx90a"
    assert archs.from_gcn("gfx950") == "gfx950"


def test_defaults_follow_the_arch():
    H, C, D, N = 4, 80, 2048, 196
    hopper = tuning.default_config(H, C, D, N, 2, "sm_90a")
    assert hopper.BC * 4 == 128 and hopper.num_stages == 3
    assert tuning.default_config(H, C, D, N, 2, 9) == hopper              # a capability major
    mi300 = tuning.default_config(H, C, D, N, 2, "gfx942")
    assert mi300.BC * 4 == 64 and mi300.num_stages == 2                   # 64 KB of LDS
    t4 = tuning.default_config(H, C, D, N, 2, "sm_75")
    assert (t4.BC * 4, t4.BN, t4.BD) == (32, 64, 16)
    with pytest.raises(ValueError, match="arch"):
        tuning.default_config(H, C, D, N, 2, "sm_61")


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of a chosen arch, as the run-time choices see it (no GPU needed)."""
    def use(arch, name="a GPU"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(archs, "device_arch", lambda device=None: arch)
        monkeypatch.setattr(archs, "device_name", lambda device=None: name)
        monkeypatch.setattr(triton_impl, "INTERPRET", False)
        archs._warn_bf16.cache_clear()
    return use


def test_bf16_on_turing_runs_the_fallback_with_a_warning(fake_gpu):
    fake_gpu("sm_75", "Tesla T4")
    cuda = torch.device("cuda")
    with pytest.warns(UserWarning, match="Tesla T4 .sm_75. has no bf16"):
        assert ops.backend_for(cuda, torch.bfloat16) == "torch"
    assert ops.backend_for(cuda, torch.float16) == "triton"
    fake_gpu("sm_80")
    assert ops.backend_for(cuda, torch.bfloat16) == "triton"


def test_tf32_only_where_the_arch_has_it(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    x = torch.empty(2, 8, 4)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    fake_gpu("sm_80")
    assert triton_impl.tf32_enabled(x)
    fake_gpu("sm_75")
    assert not triton_impl.tf32_enabled(x)
    fake_gpu("sm_90a")
    monkeypatch.setattr(archs, "is_rocm", lambda: True)
    assert not triton_impl.tf32_enabled(x)
