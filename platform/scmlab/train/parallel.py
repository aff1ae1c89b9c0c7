"""Data parallelism over the workers (train.parallel): DDP replicas, or FSDP2 shards.

- ``ddp``: every worker holds the whole network, its gradients and Adam's two moments (16 bytes per parameter in
  fp32); the gradients are all-reduced.
- ``fsdp``: ``torch.distributed.fsdp.fully_shard`` (FSDP2) shards the parameters, gradients and optimizer state
  over the N workers (16 / N bytes per parameter), all-gathering each residual block's weights for its forward and
  backward and reduce-scattering its gradients. The EMA stays a whole copy on every worker (4 bytes per parameter;
  scmlab.ema), so sampling, evaluation and checkpoints are those of a DDP run.

Both tangent paths of the sCM step run through fully_shard (tests/test_fsdp.py, torch 2.13, 2 gloo workers): the
fused pass computes its tangents inside the blocks' forwards, where FSDP2 has put the gathered weights, and
torch.func.jvp runs through FSDP2's hooks (fully_shard is no wrapper: it changes the module's class in place, so
scmlab.objectives' unwrapping leaves it as it is), under no_grad.

Checkpoints hold whole tensors in the layout of an unsharded run (the optimizer's state keyed by parameter index),
so a run can resume under either kind and `scmlab sample` reads either.
"""

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor


def wrapper(kind: str):
    """The loop's `wrap` for train.parallel `kind` (checked by the config): a network -> the module the steps call."""
    return torch.nn.parallel.DistributedDataParallel if kind == "ddp" else shard


def shard(net: nn.Module) -> nn.Module:
    """fully_shard each residual block (the entries of the network's top-level ModuleLists: MLP and DiT `blocks`,
    UNet `enc` and `dec`), then the rest with the root, over all the workers, on the device the network is on (FSDP2's
    default is CUDA whenever there is one); returns `net`, now sharded in place. One block's weights are whole at a
    time, in its forward and in its backward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(next(net.parameters()).device.type, (torch.distributed.get_world_size(),))
    for child in net.children():
        if isinstance(child, nn.ModuleList):
            for block in child:
                fully_shard(block, mesh=mesh)
    return fully_shard(net, mesh=mesh)


def is_sharded(net: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in net.parameters())


def local(x: torch.Tensor) -> torch.Tensor:
    """A DTensor's local part (a replicated value whole, a sharded one this worker's shard), or x itself."""
    return x.to_local() if isinstance(x, DTensor) else x


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(net: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) of a sharded `net` as whole CPU tensors in an unsharded run's layout, on rank
    0 ({} on the others). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = get_model_state_dict(net, options=_options())
    optim = get_optimizer_state_dict(net, optimizer, options=_options())
    if not optim:
        return model, {}
    # The optimizer was built on net.parameters(): its own param_groups are an unsharded run's, indices and all.
    index = {name: i for i, (name, _) in enumerate(net.named_parameters())}
    return model, {"state": {index[name]: value for name, value in optim["state"].items()},
                   "param_groups": optimizer.state_dict()["param_groups"]}


def load_optimizer(net: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an unsharded run's optimizer state (whole tensors, keyed by parameter index; given on every rank) into
    the optimizer of a sharded `net`, each rank keeping its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [name for name, _ in net.named_parameters()]
    by_name = {"state": {names[i]: value for i, value in state["state"].items()},
               "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                for group in state["param_groups"]]}
    set_optimizer_state_dict(net, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):  # as saved: the load makes Adam's
        group.update({key: value for key, value in saved.items() if key != "params"})  # betas a list
