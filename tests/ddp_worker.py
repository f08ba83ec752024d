"""Worker for test_integration.test_ddp_matches_single_process (spawned; must be importable)."""
import torch
import torch.distributed as dist

import csra_triton


def make_model_and_data(seed=0):
    torch.manual_seed(seed)
    model = csra_triton.CSRATriton(8, 5, heads=4)
    x = torch.randn(8, 8, 3, 3)
    y = (torch.rand(8, 5) < 0.4).float()
    return model, x, y


def train(model, x, y, steps=3, lr=0.5):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()
    return model


def worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        model, x, y = make_model_and_data()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        per = x.shape[0] // world
        part = slice(rank * per, (rank + 1) * per)
        train(ddp, x[part], y[part])
        if rank == 0:
            torch.save(model.weight.detach().clone(), out_file)
        # Both ranks leave together: one full suite run of six (2026-11-27) ended with a rank aborting
        # in gloo's teardown ("terminate called without an active exception") while the other
        # was still saving.
        dist.barrier()
    finally:
        dist.destroy_process_group()
