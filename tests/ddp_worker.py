"""Workers for test_integration.test_ddp_matches_single_process (spawned; must be importable),
and :func:`run_rank`, the gloo rank harness the other workers share."""
import os
import sys
import traceback

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


def run_rank(rank, world, init_method, body):
    """Runs ``body()`` as one of ``world`` gloo ranks; all ranks leave together (a barrier).
    It leaves with ``os._exit`` once the process group is destroyed and its result
    written: a spawned rank that returned went through the interpreter's full teardown, where
    gloo's threads and the store's destructor race the C++ static destructors (seen once in
    three full CI runs: "terminate called without an active exception", SIGABRT). The suite's
    process makes that teardown longer and its order different: the ranks import what it
    imported (torch._dynamo and Inductor, triton's interpreter, hypothesis). Nothing is left to
    tear down after the explicit destroy, so skipping the rest is safe."""
    code = 1
    try:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
        try:
            body()
            dist.barrier()          # both ranks leave together
        finally:
            dist.destroy_process_group()
        code = 0
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if code == 0:
            os._exit(0)


def worker(rank, world, init_method, out_file):
    """One rank of test_ddp_matches_single_process: DDP over half of the batch."""
    def body():
        model, x, y = make_model_and_data()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        per = x.shape[0] // world
        part = slice(rank * per, (rank + 1) * per)
        train(ddp, x[part], y[part])
        if rank == 0:
            torch.save(model.weight.detach().clone(), out_file)

    run_rank(rank, world, init_method, body)
