"""DistributedUDN: two gloo CPU processes train like one process on the combined batch, growth included."""
import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from udn_kernels.data import spirals
from udn_kernels.nn import UDN
from udn_kernels.nn.distributed import DistributedUDN

STEPS = 4
N = 64


def _build():
    torch.manual_seed(0)
    model = UDN.mlp(2, 6, 2, init_rate=1.0).double()
    # The untrained net prefers shallow depths; ascending on the rate (maximize=True) with a large
    # step makes q's truncation grow during the short run so growth under DDP is exercised.
    opt = torch.optim.SGD([{"params": [model.depth.raw_rate], "lr": 60.0, "maximize": True},
                           {"params": [p for n, p in model.named_parameters() if n != "depth.raw_rate"]}],
                          lr=0.05, momentum=0.5)
    model.attach_optimizer(opt)
    return model, opt


def _data():
    x, y = spirals(N, 1.0, 0.05, seed=1)
    return x.double(), y


def _worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a bounded timeout turns a lost peer into an error instead of a CI run that never ends
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        model, opt = _build()
        ddp = DistributedUDN(model)
        x, y = _data()
        shard = slice(rank * N // world, (rank + 1) * N // world)
        depths = []
        for _ in range(STEPS):
            opt.zero_grad()
            ddp.loss(x[shard], y[shard], N).backward()
            opt.step()
            depths.append(model.built_depth)
        if rank == 0:
            torch.save({"state": model.state_dict(), "depths": depths}, out_path)
        # rank 0 hosts the store: leaving before rank 1 is done with it hung a CI run once
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Exit without interpreter teardown: freeing DDP's reducer there deadlocked a CI run inside
    # torch's gloo teardown (the group's destructor, holding the GIL, joins its run-loop thread,
    # which waits for the GIL to free the finished barrier's work).
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_equals_single_process(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    result = torch.load(out)

    model, opt = _build()
    x, y = _data()
    depths = []
    for _ in range(STEPS):
        opt.zero_grad()
        model.loss(x, y, N).backward()
        opt.step()
        depths.append(model.built_depth)
    assert result["depths"] == depths
    assert depths[-1] > 4, depths  # the run did grow
    state = model.state_dict()
    assert state.keys() == result["state"].keys()
    for key, value in state.items():
        torch.testing.assert_close(result["state"][key], value, rtol=1e-9, atol=1e-11, msg=key)
