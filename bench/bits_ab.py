"""Bit-for-bit comparison of two checkouts' results (CPU: the Triton kernels in the interpreter
and the PyTorch fallback with either GEMM choice for bf16), through the public API only, so that
any two versions compare:

    python bench/bits_ab.py dump OLD_CHECKOUT /tmp/old.pt
    python bench/bits_ab.py dump . /tmp/new.pt
    python bench/bits_ab.py compare /tmp/old.pt /tmp/new.pt

Each dump holds y, dx, dW and dlam of a training call and y of an inference call for both
backends, NCHW, channels_last and tokens, fp32, bf16 and fp64, a fixed and a learnable lam, on
the eager path and on the ops (``CSRA_TRITON_EAGER=0``); the settings that are read at import
(``CSRA_TRITON_EAGER``, ``CSRA_TRITON_CPU_BF16_GEMM``) vary by subprocess.
"""
import itertools
import os
import subprocess
import sys

CASES = [("1", "1"), ("1", "0"), ("0", "1"), ("0", "0")]     # (EAGER, CPU_BF16_GEMM)


def _dump_one(root: str) -> dict:
    sys.path.insert(0, os.path.abspath(root))
    import torch

    import csra_triton
    from csra_triton import use_backend

    out = {}
    torch.backends.cudnn.allow_tf32 = False
    for backend, layout, dtype, lam_kind in itertools.product(
            ("triton", "torch"), ("nchw", "channels_last", "tokens"),
            (torch.float32, torch.bfloat16, torch.float64), ("fixed", "learnable")):
        if backend == "triton" and os.environ["CSRA_TRITON_CPU_BF16_GEMM"] == "0":
            continue                          # (the setting is the fallback's)
        torch.manual_seed(0)
        head = csra_triton.CSRATriton(24, 7, 4, lam=0.3)
        head.weight.data.normal_()
        if lam_kind == "learnable":
            head.lam = torch.nn.Parameter(torch.tensor(0.3))
        x = torch.randn(3, 24, 4, 5).to(dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        if layout == "tokens":
            x = x.flatten(2).transpose(1, 2).contiguous()
        g = torch.randn(3, 7).to(dtype)
        fn = head.forward_tokens if layout == "tokens" else head.forward
        key = f"{backend}|{layout}|{str(dtype)[6:]}|{lam_kind}"
        with use_backend(backend):
            with torch.no_grad():
                y_inf = fn(x)
            xg = x.detach().requires_grad_()
            y = fn(xg)
            y.backward(g)
        out[key] = dict(y_inf=y_inf, y=y.detach(), dx=xg.grad, dW=head.weight.grad,
                        dlam=getattr(head.lam, "grad", None))
    return out


def dump(root: str, path: str) -> None:
    import torch

    result = {}
    for eager, gemm in CASES:
        env = dict(os.environ, TRITON_INTERPRET="1", CSRA_TRITON_EAGER=eager,
                   CSRA_TRITON_CPU_BF16_GEMM=gemm, CSRA_TRITON_POISON="1")
        part = path + f".{eager}{gemm}"
        subprocess.run([sys.executable, __file__, "_one", root, part], env=env, check=True)
        for k, v in torch.load(part).items():
            result[f"eager={eager}|bf16gemm={gemm}|{k}"] = v
        os.unlink(part)
    torch.save(result, path)
    print(f"{len(result)} cases -> {path}")


def compare(a: str, b: str) -> int:
    import torch

    da, db = torch.load(a), torch.load(b)
    bad = 0
    same = 0
    for key in sorted(set(da) | set(db)):
        if key not in da or key not in db:
            print(f"only in {'the first' if key in da else 'the second'}: {key}")
            bad += 1
            continue
        for name, ta in da[key].items():
            tb = db[key][name]
            if ta is None and tb is None:
                continue
            if ta is None or tb is None or ta.dtype != tb.dtype or ta.shape != tb.shape or \
                    not torch.equal(ta.reshape(-1).view(torch.uint8) if ta.numel() else ta,
                                    tb.reshape(-1).view(torch.uint8) if tb.numel() else tb):
                diff = ((ta.double() - tb.double()).abs().max().item()
                        if ta is not None and tb is not None and ta.shape == tb.shape else "n/a")
                print(f"DIFFERS {key} {name}: max |diff| {diff}")
                bad += 1
            else:
                same += 1
    print(f"{same} tensors bit-identical, {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "_one":
        import torch

        torch.save(_dump_one(sys.argv[2]), sys.argv[3])
    elif cmd == "dump":
        dump(sys.argv[2], sys.argv[3])
    elif cmd == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
