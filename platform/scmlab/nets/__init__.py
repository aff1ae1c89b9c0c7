"""Networks F_theta for sCM: a registry of architectures ('mlp', 'unet', 'dit') with size presets.

Every network is called as ``net(x, t, class_labels=None, guidance=None, return_logvar=False, tangent=None)`` with
x already divided by sigma_d and t the TrigFlow time (B,); it returns F (shape of x), or (F, w_phi(t) of shape
(B,)). With ``tangent=(dx, dt)`` (tensors shaped as x and t) it also returns, last, the directional derivative of
F at (x, t) along (dx, dt), carried through the same forward (scmlab.tangent) and without a graph; labels and the
guidance scale are held fixed. That is the fused sCM step (``objective.jvp: fused``).
"""

import contextlib

import torch
import torch.nn as nn

from scmlab.nets.dit import DIT_PRESETS, DiT
from scmlab.nets.mlp import MLP, MLP_PRESETS
from scmlab.nets.unet import UNET_PRESETS, UNet

ARCHITECTURES = {"mlp": MLP, "unet": UNet, "dit": DiT}
PRESETS = {"mlp": MLP_PRESETS, "unet": UNET_PRESETS, "dit": DIT_PRESETS}  # arch -> size -> constructor arguments

__all__ = ["ARCHITECTURES", "MLP", "PRESETS", "DiT", "UNet", "build_net", "count_params"]


def build_net(cfg, *, data_shape: tuple[int, ...], num_classes: int = 0, device=None) -> nn.Module:
    """Build the network named by cfg.arch / cfg.size; the other cfg fields (see config.ModelConfig) override the
    preset. ``device='meta'`` builds without allocating (for counting parameters)."""
    if cfg.arch not in ARCHITECTURES:
        raise ValueError(f"model.arch {cfg.arch!r} is not one of {', '.join(ARCHITECTURES)}")
    presets = PRESETS[cfg.arch]
    if cfg.size not in presets:
        raise ValueError(f"model.size {cfg.size!r} is not a {cfg.arch} preset; choose one of {', '.join(presets)}")
    kwargs = dict(presets[cfg.size])
    if cfg.dropout is not None:
        kwargs["dropout"] = cfg.dropout
    if cfg.dropout_max_res is not None:  # UNet only (config.ModelConfig checks)
        kwargs["dropout_max_res"] = cfg.dropout_max_res
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return ARCHITECTURES[cfg.arch](
            tuple(data_shape),
            num_classes=num_classes,
            double_norm=cfg.double_norm,
            time_embedding=cfg.time_embedding,
            time_max_freq=cfg.time_max_freq,
            sigma_d=cfg.sigma_d,
            label_dropout=cfg.label_dropout,
            guidance_input=cfg.guidance_input,
            **kwargs,
        )


def count_params(cfg, *, data_shape: tuple[int, ...], num_classes: int = 0) -> int:
    """Number of trainable parameters of build_net(cfg, ...), counted on the meta device (no memory, no init)."""
    net = build_net(cfg, data_shape=data_shape, num_classes=num_classes, device="meta")
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
