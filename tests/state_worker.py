"""Worker for test_state.test_broadcast_between_ranks (spawned; must be importable).

Each rank holds a head with its own weights and evaluates once (a warm call); rank 0 then
broadcasts its weight into ``weight.detach()`` (what ZeRO-style optimizers do to sync: the
receiving rank's version counter does not move), and both ranks evaluate again. Each rank writes
the relative error of that second evaluation against float64 on the weight it now holds, per
backend."""
import os

import torch
import torch.distributed as dist

import csra_triton
from ddp_worker import run_rank
from helpers import ref64, rel_err


def worker(rank, world, init_method, out_dir):
    def body():
        errs = {}
        for backend in ("triton", "torch"):
            torch.manual_seed(100 + rank)          # different weights on each rank
            head = csra_triton.CSRATriton(8, 5, heads=4, lam=0.3)
            torch.manual_seed(7)                   # the same input on both
            x = torch.randn(2, 8, 3, 3)
            with csra_triton.use_backend(backend), torch.no_grad():
                head(x)                            # warm: whatever a call may keep
                dist.broadcast(head.weight.detach(), src=0)
                y = head(x)
            errs[backend] = rel_err(y, ref64(x, head.weight, head.temperatures, head.lam))
            errs[backend + "-moved"] = rank == 0 or not torch.equal(
                head.weight, _initial_weight(100 + rank))
        torch.save(errs, os.path.join(out_dir, f"rank{rank}.pt"))

    run_rank(rank, world, init_method, body)


def _initial_weight(seed):
    torch.manual_seed(seed)
    return csra_triton.CSRATriton(8, 5, heads=4, lam=0.3).weight.detach()
