"""Gradient accumulation (train.grad_accum): micro-batches give the full batch's gradient and update, in one process
and under 2-rank DDP; the training loop's step with accumulation equals the step without."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scmlab.nets import MLP, PRESETS
from scmlab.objectives import SCMLoss
from scmlab.train import checkpoint, train
from scmlab.train.loop import backward

SD = 0.5


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP((2,), **PRESETS["mlp"]["tiny"]).double()


def batch(n: int = 16):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64) * SD
    t = torch.rand(n, generator=g, dtype=torch.float64) * 1.4 + 0.05
    return x0, t, z


def objective() -> SCMLoss:
    return SCMLoss("sct", sigma_d=SD, warmup_steps=0)  # the JVP, tangent normalization and adaptive weighting


def gradients(net, x0, t, z, micro_batches: int) -> list[torch.Tensor]:
    net.zero_grad(set_to_none=True)
    backward(objective(), net, x0, None, t, z, step=0, generator=None, micro_batches=micro_batches)
    module = getattr(net, "module", net)
    return [p.grad.clone() for p in module.parameters()]


def test_micro_batches_give_the_full_batch_gradient_fp64():
    net = mlp()
    x0, t, z = batch()
    full = gradients(net, x0, t, z, 1)
    for parts in (2, 4, 16):
        for a, b in zip(gradients(net, x0, t, z, parts), full):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert any(g.abs().max() > 1e-3 for g in full)  # a gradient that could differ


def _ddp_rank(rank: int, port: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(mlp())
        x0, t, z = batch()
        rows = slice(8 * rank, 8 * rank + 8)  # this rank's half of the global batch, in 2 micro-batches
        grads = gradients(ddp, x0[rows], t[rows], z[rows], 2)
        if rank == 0:
            queue.put([g.numpy() for g in grads])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about 25 s on 2 shared cores
def test_accumulation_under_two_rank_ddp_gives_the_full_batch_gradient():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    ranks = mp.start_processes(_ddp_rank, args=(port, queue), nprocs=2, join=False, start_method="spawn")
    ddp_grads = [torch.from_numpy(g) for g in queue.get()]  # before joining: the gradients outgrow a pipe's buffer
    while not ranks.join():
        pass
    x0, t, z = batch()
    for a, b in zip(ddp_grads, gradients(mlp(), x0, t, z, 1)):  # one process, the whole batch at once
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["sct", "diffusion"])
def test_a_training_step_with_accumulation_equals_the_full_batch_step(toy_shards, make_config, tmp_path, kind):
    weights = {}
    for parts in (1, 4):
        config = make_config(toy_shards, tmp_path / f"accum{parts}", objective={"kind": kind},
                             model={"dropout": 0.0}, train={"steps": 1, "batch_size": 16, "grad_accum": parts})
        summary = train(config)
        weights[parts] = checkpoint.load(summary["checkpoint"])["model"]
    before = initial_weights(make_config(toy_shards, tmp_path / "init"))
    assert any(not torch.equal(weights[1][k], before[k]) for k in before)  # the step changed the weights
    for key in weights[1]:
        torch.testing.assert_close(weights[4][key], weights[1][key], rtol=1e-5, atol=1e-6)


def initial_weights(config) -> dict:
    """The weights before the first step (the loop seeds its initialization with train.seed)."""
    from scmlab import data
    from scmlab.train.samples import build_model

    torch.manual_seed(config.train.seed)
    return build_model(config, data.read_manifest(config.data.train)).state_dict()
