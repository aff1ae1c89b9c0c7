"""FSDP2 (train.parallel: fsdp): the sCT step's gradients through fully_shard on 2 gloo CPU workers equal one
unsharded process's on the same global batch, in fp64, for both tangent paths (the fused pass and torch.func.jvp) and
the three architectures."""

import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scmlab.nets import build_net
from scmlab.objectives import SCMLoss
from scmlab.train import parallel
from scmlab.train.loop import backward

SD, BATCH = 0.5, 8
NETS = {"mlp": ("tiny", (3,)), "unet": ("ci", (1, 8, 8)), "dit": ("ci", (1, 8, 8))}
CASES = [(arch, jvp) for arch in NETS for jvp in ("fused", "autograd")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def network(arch: str) -> torch.nn.Module:
    """fp64, no dropout (each rank would draw its own masks), weights perturbed away from the zero-initialized
    output layers so that every parameter gets a gradient."""
    size, shape = NETS[arch]
    cfg = SimpleNamespace(arch=arch, size=size, dropout=0.0, dropout_max_res=None, time_embedding="positional",
                          time_max_freq=4.0, double_norm=True, label_dropout=0.0, guidance_input=False, sigma_d=SD)
    torch.manual_seed(0)
    net = build_net(cfg, data_shape=shape).double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return net


def batch(arch: str):
    generator = torch.Generator().manual_seed(2)
    shape = (BATCH, *NETS[arch][1])
    x0 = torch.randn(shape, generator=generator, dtype=torch.float64)
    z = torch.randn(shape, generator=generator, dtype=torch.float64) * SD
    t = torch.rand(BATCH, generator=generator, dtype=torch.float64) * 1.4 + 0.05
    return x0, t, z


def sct_gradients(net, arch: str, jvp: str, rows=slice(None)) -> dict:
    """The gradients of one sCT step on `rows` of the global batch (the real objective and the loop's backward,
    which divides by the local batch: under 2 workers, the gradients average the two halves)."""
    x0, t, z = batch(arch)
    objective = SCMLoss("sct", sigma_d=SD, warmup_steps=0, jvp=jvp)  # tangent normalization, adaptive weight
    net.zero_grad(set_to_none=True)
    backward(objective, net, x0[rows], None, t[rows], z[rows], step=0, generator=None)
    return {name: p.grad for name, p in net.named_parameters()}


def _rank(rank: int, port: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {}
        for arch, jvp in CASES:
            net = parallel.shard(network(arch))
            # Sharded: every parameter a DTensor, each rank holding part of the largest ones.
            split = all(isinstance(p, parallel.DTensor) for p in net.parameters()) and all(
                parallel.local(p).shape[0] < p.shape[0] for p in net.parameters() if p.shape[0] >= 2)
            half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
            grads = {name: g.full_tensor() for name, g in sct_gradients(net, arch, jvp, half).items()}
            results[arch, jvp] = (split, {name: g.numpy() for name, g in grads.items()})
        if rank == 0:
            queue.put(results)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_gradients():
    """Every case's gradients from one pair of spawned gloo workers (spawning costs more than the steps)."""
    queue = mp.get_context("spawn").SimpleQueue()
    ranks = mp.start_processes(_rank, args=(free_port(), queue), nprocs=2, join=False, start_method="spawn")
    results = queue.get()  # before joining: the gradients outgrow a pipe's buffer
    while not ranks.join():
        pass
    return results


@pytest.mark.slow  # two spawned processes: about 20 s of CPU on 2 shared cores
@pytest.mark.parametrize("arch,jvp", CASES)
def test_fsdp_sct_gradients_equal_the_unsharded_step_fp64(fsdp_gradients, arch, jvp):
    split, grads = fsdp_gradients[arch, jvp]
    assert split
    reference = sct_gradients(network(arch), arch, jvp)
    assert grads.keys() == reference.keys()
    assert max(g.abs().max() for g in reference.values()) > 1e-2  # gradients that could differ
    for name, ref in reference.items():
        torch.testing.assert_close(torch.from_numpy(grads[name]), ref, rtol=1e-10, atol=1e-13, msg=name)


# --- the training loop under train.parallel: fsdp -------------------------------------------------------------

def _train_rank(rank: int, port: int, configs: dict) -> None:
    """The runs one after the other in one process group, each rank's batch k a function of (seed, rank, k)."""
    from test_train import step_indexed_loader

    from scmlab import data
    from scmlab.config import Config
    from scmlab.train import train

    data.make_loader = step_indexed_loader  # the real loader reshuffles on resume (statistically equivalent)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for name, config in configs:
            config = Config.from_dict(config)
            train(config, rank=rank, world_size=2, wrap=parallel.wrapper(config.train.parallel))
            dist.barrier()  # rank 0 has written the run's last checkpoint before the next run looks for one
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes training 4 short runs: about 30 s of CPU on 2 shared cores
def test_fsdp_training_equals_ddp_and_resumes_its_checkpoints(toy_shards, make_config, tmp_path):
    """Through the real loop on 2 gloo workers, with gradient accumulation, clipping and a checkpoint every step:
    FSDP's weights, EMA and Adam state after 3 steps are DDP's, in DDP's checkpoint layout (so either resumes the
    other's), and a DDP run resumed under FSDP continues as the uninterrupted run. fp32: the loop's data is."""
    from scmlab import data
    from scmlab.config import Config
    from scmlab.train import checkpoint
    from scmlab.train.samples import build_model

    def config(name, parallel_kind, steps):
        return make_config(toy_shards, tmp_path / name, model={"dropout": 0.0}, optim={"grad_clip": 0.05},
                           train={"steps": steps, "batch_size": 8, "grad_accum": 2, "parallel": parallel_kind,
                                  "ema_half_life": 20}).to_dict()

    runs = [("ddp", config("ddp", "ddp", 3)), ("fsdp", config("fsdp", "fsdp", 3)),
            ("resumed", config("resumed", "ddp", 2)), ("resumed", config("resumed", "fsdp", 3))]
    mp.start_processes(_train_rank, args=(free_port(), runs), nprocs=2, start_method="spawn")
    ddp, fsdp, resumed = (checkpoint.load(str(tmp_path / name)) for name in ("ddp", "fsdp", "resumed"))
    assert ddp["step"] == fsdp["step"] == resumed["step"] == 3
    assert fsdp["config"]["train"]["parallel"] == "fsdp"
    torch.manual_seed(0)  # train.seed: the loop's initialization
    initial = build_model(Config.from_dict(runs[0][1]), data.read_manifest(toy_shards)).state_dict()
    assert all(not torch.equal(ddp["model"][k], initial[k]) for k in ("linear_in.weight", "linear_out.weight"))
    for other in (fsdp, resumed):
        for part in ("model", "ema"):
            assert other[part].keys() == ddp[part].keys()
            for key, value in ddp[part].items():
                torch.testing.assert_close(other[part][key], value, rtol=1e-5, atol=1e-6, msg=f"{part}.{key}")
        assert other["optimizer"]["param_groups"] == ddp["optimizer"]["param_groups"]
        assert other["optimizer"]["state"].keys() == ddp["optimizer"]["state"].keys()
        for index, moments in ddp["optimizer"]["state"].items():
            for key, value in moments.items():
                torch.testing.assert_close(other["optimizer"]["state"][index][key], value, rtol=1e-5, atol=1e-7,
                                           msg=f"optimizer.{index}.{key}")
