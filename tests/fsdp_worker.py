"""Worker for test_training.test_fsdp2_step_equals_single_process (spawned; must be importable).

Each rank shards a CSRATriton with FSDP2 (``fully_shard``: the weight is split over the two
ranks by heads), takes SGD steps on its half of the batch, eager and then under
``torch.compile``, and rank 0 saves the full weight after each step."""
import os

import torch
from torch.distributed.fsdp import fully_shard

import csra_triton
from ddp_worker import run_rank


def make(seed=0):
    torch.manual_seed(seed)
    head = csra_triton.CSRATriton(8, 6, heads=4, lam=0.3)
    x = torch.randn(4, 8, 3, 3)
    target = (torch.rand(4, 6) < 0.4).float()
    return head, x, target


def step(model, opt, x, target):
    opt.zero_grad()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), target)
    loss.backward()
    opt.step()


def worker(rank, world, init_method, out_dir, backend):
    def body():
        head, x, target = make()
        fully_shard(head)
        sharded = tuple(head.weight.to_local().shape)
        opt = torch.optim.SGD(head.parameters(), lr=0.5)
        part = slice(rank * 2, rank * 2 + 2)
        weights = []
        with csra_triton.use_backend(backend):
            step(head, opt, x[part], target[part])                  # eager
            weights.append(head.weight.full_tensor().detach().clone())
            compiled = torch.compile(head)
            step(compiled, opt, x[part], target[part])              # compiled
            weights.append(head.weight.full_tensor().detach().clone())
        if rank == 0:
            torch.save({"weights": weights, "sharded": sharded},
                       os.path.join(out_dir, f"fsdp-{backend}.pt"))

    run_rank(rank, world, init_method, body)
