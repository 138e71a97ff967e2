"""An FSDP2 (``fully_shard``) early-exit training step of a tiny Llama on 2 gloo CPU processes equals
the single-process step on the combined batch: the loss (mean of the ranks') to rtol 1e-5, every
updated parameter to rtol 1e-5 / atol 1e-6 (fp32; the ranks' gradients are averaged in another
order). The LM head weight is a sharded DTensor outside the forward: the loss reads it inside the
sharded module's call, where FSDP's hooks have gathered it, whether the head is sharded with the
root or by itself; a head weight that stays sharded (tensor parallel) is a clear error."""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers", reason="transformers (udn_kernels[dev]) not installed")
fsdp = pytest.importorskip("torch.distributed.fsdp", reason="torch without FSDP2")

from udn_kernels.integrations import EarlyExitLoss  # noqa: E402

WORLD = 2
LR = 0.5
LAYOUTS = ("root", "head apart")  # the LM head sharded with the root module, or by its own fully_shard


def _build():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).float()


def _data():
    # every position is a target, so each rank's mean is over the same token count and the mean
    # of the ranks' means is the combined batch's mean
    return torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(1))


def _step(model, loss_fn, input_ids):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loss = loss_fn(input_ids, input_ids)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _loss_fn(model):
    return EarlyExitLoss(model, exits=2, scale="sum", e_scale=0.5)


def _worker(rank, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        mesh = init_device_mesh("cpu", (WORLD,))
        shard = slice(rank * 4 // WORLD, (rank + 1) * 4 // WORLD)
        results = {}
        for layout in LAYOUTS:
            model = _build()
            for layer in model.model.layers:
                fsdp.fully_shard(layer, mesh=mesh)
            if layout == "head apart":
                fsdp.fully_shard(model.lm_head, mesh=mesh)
            fsdp.fully_shard(model, mesh=mesh)
            sharded_head = type(model.lm_head.weight).__name__
            loss = _step(model, _loss_fn(model), _data()[shard])
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            state = {name: p.full_tensor() for name, p in model.named_parameters()}
            results[layout] = {"loss": loss, "state": state, "sharded_head": sharded_head}
        # a head weight no FSDP hook gathers: the clear error
        model = _build()
        model.lm_head.weight = torch.nn.Parameter(distribute_tensor(model.lm_head.weight.detach(), mesh, [Shard(0)]))
        try:
            _loss_fn(model)(_data()[shard])
        except RuntimeError as exc:
            results["error"] = str(exc)
        if rank == 0:
            torch.save(results, out_path)
        dist.barrier()  # rank 0 hosts the store: it leaves last
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "rank0.pt"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return torch.load(out)


@pytest.fixture(scope="module")
def single():
    model = _build()
    loss = _step(model, _loss_fn(model), _data())
    return loss, dict(model.named_parameters())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fsdp_step_equals_single_process_step(distributed, single, layout):
    result = distributed[layout]
    loss, params = single
    assert result["sharded_head"] == "DTensor"  # the trap is real: outside the forward the head is sharded
    torch.testing.assert_close(result["loss"], loss, rtol=1e-5, atol=0)
    assert result["state"].keys() == params.keys()
    initial = dict(_build().named_parameters())
    for name, p in params.items():
        assert not torch.equal(p, initial[name]), name  # the step moved every parameter
        torch.testing.assert_close(result["state"][name], p.detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_never_gathered_head_weight_is_a_clear_error(distributed):
    assert "LM head weight is still a sharded DTensor" in distributed["error"]
