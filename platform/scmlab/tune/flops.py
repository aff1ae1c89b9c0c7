"""Compute accounting for scaling studies: parameters, forward FLOPs and training FLOPs per sample of a network.

FLOPs here are 2 x multiply-accumulates of the matrix products (Linear, Conv, the two attention matmuls), the
convention of ``torch.utils.flop_counter`` and of scaling-law papers; elementwise work (norms, activations, softmax)
is left out. A forward is one evaluation of F_theta and w_phi(t) at batch 1; every op is per sample, so a batch of B
costs B times that.

Training FLOPs per sample, in forwards F of the trained network (DESIGN.md section 3):
    diffusion   F + 2F                          forward + backward (grads of activations and of weights)
    sCT         JVP + F + 2F                    the tangent's JVP of F_theta^-, then forward + backward
    sCD         sCT + teacher forward(s)        1 teacher forward, 2 with classifier-free guidance
JVP = F with ``jvp='fused'``: the tangent alone, carried through the training forward (a linear map's tangent is the
same product applied to the input tangent): DESIGN.md section 3's ideal of 1.33x a diffusion step (4F / 3F).
JVP = 2F with ``jvp='autograd'``: the primal plus the tangent, the least a separate forward-mode pass can do, 1.67x
(5F / 3F). ``jvp='fd'`` (central differences) is 3F. Not counted: attention's two bilinear products have two-term
tangents, and the fused tangent also recomputes q k^T for its softmax (5 products where the primal takes 2), an extra
of 1-1.5x the attention products: below 2.5% of F for the UNet presets, 5-22% for the DiT presets, where attention
is a larger share.

With ``jvp='autograd'`` PyTorch executes more than that: its tangent rule for every Linear / Conv also multiplies the
input by a dense zero tangent of the weights, so ``torch.func.jvp`` runs 3F of matmul FLOPs and an sCT step 6F (2x
diffusion, not 1.67x; tests/test_flops.py counts it), part of the wall-clock gap that DESIGN.md section 3 measures.
The fused step executes what it is counted (scmlab.tangent multiplies by the weights only). The scaling
axis uses the algorithmic count, which does not move with the PyTorch version.
"""

import types

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config import ModelConfig
from ..nets import PRESETS, build_net, count_params
from ..nets.dit import MLP_RATIO, TIME_FEATURES

BACKWARD_FORWARDS = 2
"""A backward pass costs two forwards: the gradient with respect to the activations and to the weights."""
JVP_FORWARDS = {"fused": 1, "autograd": 2, "fd": 3}
"""Forward-equivalents of the tangent evaluation: the tangent alone (fused), primal + tangent (forward-mode AD) or
three points (finite differences)."""
OBJECTIVES = ("diffusion", "sct", "scd")

# The dataset each preset is sized for: (data_shape, num_classes). MLPs: 2-D toys; 'ci': 8x8 digits; 'small':
# Fashion-MNIST; 'cifar10': CIFAR-10; UNet S..XL: ImageNet 64x64; XXL: ImageNet 512x512 as 4x64x64 latents; DiT
# S..XL: ImageNet 256x256 as 4x32x32 latents (the DiT paper's).
NATIVE_DATA = {
    "mlp": {size: ((2,), 0) for size in PRESETS["mlp"]},
    "unet": {"ci": ((1, 8, 8), 10), "small": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10),
             **{size: ((3, 64, 64), 1000) for size in ("S", "M", "L", "XL")}, "XXL": ((4, 64, 64), 1000)},
    "dit": {"ci": ((1, 8, 8), 10), "small": ((1, 28, 28), 10),
            **{size: ((4, 32, 32), 1000) for size in ("S", "B", "L", "XL")}},
}


def _buildable(model_cfg):
    """build_net also reads sigma_d (for the log-sigma time embedding); it changes no FLOP or parameter count, so
    a bare config.ModelConfig is accepted as well as config.net_config(...)."""
    fields = vars(model_cfg)
    return types.SimpleNamespace(**{"sigma_d": 0.5, **fields})


def _example_inputs(data_shape, num_classes, guidance_input, device):
    x = torch.zeros(1, *data_shape, device=device)
    t = torch.full((1,), 0.5, device=device)
    labels = torch.zeros(1, dtype=torch.long, device=device) if num_classes else None
    guidance = torch.ones(1, device=device) if guidance_input else None
    return x, t, labels, guidance


def parameter_count(model_cfg, data_shape: tuple[int, ...], num_classes: int = 0) -> int:
    """Trainable parameters (scmlab.nets.count_params, on the meta device), for a ModelConfig or a net config."""
    return count_params(_buildable(model_cfg), data_shape=tuple(data_shape), num_classes=num_classes)


def forward_flops(model_cfg, data_shape: tuple[int, ...], num_classes: int = 0) -> int:
    """Counted FLOPs of one forward (F_theta and w_phi(t)) at batch 1: FlopCounterMode over a real forward of the
    network built on the meta device (no memory, no compute; the counts equal a CPU forward's)."""
    cfg = _buildable(model_cfg)
    net = build_net(cfg, data_shape=tuple(data_shape), num_classes=num_classes, device="meta").eval()
    x, t, labels, guidance = _example_inputs(data_shape, num_classes, cfg.guidance_input, "meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, t, labels, guidance, return_logvar=True)
    return counter.get_total_flops()


def analytic_forward_flops(model_cfg, data_shape: tuple[int, ...]) -> int:
    """The same count from the preset's hyperparameters alone: sum of 2 x MACs over the layers of the layout that
    nets/mlp.py, nets/unet.py and nets/dit.py document. A check on the counter (and on the layout's
    documentation)."""
    arch = {"mlp": _mlp_flops, "unet": _unet_flops, "dit": _dit_flops}[model_cfg.arch]
    return arch(PRESETS[model_cfg.arch][model_cfg.size], tuple(data_shape), model_cfg.guidance_input)


def _linear(n_in: int, n_out: int, tokens: int = 1) -> int:
    return 2 * n_in * n_out * tokens


def _conditioning(num_features: int, emb: int, guidance_input: bool, logvar: int) -> int:
    """Time (and guidance) feature MLPs num_features -> E -> E; w_phi head L -> L -> 1. Label lookup: no FLOPs."""
    mlp = _linear(num_features, emb) + _linear(emb, emb)
    return mlp * (2 if guidance_input else 1) + _linear(logvar, logvar) + _linear(logvar, 1)


def _mlp_flops(p: dict, data_shape, guidance_input: bool) -> int:
    (D,), W, E = data_shape, p["width"], p["emb_channels"]
    block = _linear(E, 2 * W) + 2 * _linear(W, W)  # adaptive norm's scale/shift, two Linears
    return (_conditioning(p["num_features"], E, guidance_input, p["logvar_channels"])
            + _linear(D, W) + p["num_blocks"] * block + _linear(W, D))


def _unet_flops(p: dict, data_shape, guidance_input: bool) -> int:
    img, height, width = data_shape
    mc, nb = p["model_channels"], p["num_blocks"]
    cblock = [mc * m for m in p["channel_mult"]]
    E = max(cblock)

    def conv(cin, cout, k, level):
        return _linear(cin * k * k, cout, tokens=(height >> level) * (width >> level))

    def block(cin, cout, level, attention):
        flops = _linear(E, 2 * cout) + conv(cin, cout, 3, level) + conv(cout, cout, 3, level)
        flops += conv(cin, cout, 1, level) if cin != cout else 0
        if attention:  # qkv and proj 1x1 convs; q k^T and weights @ v over N tokens and C = heads x d channels
            n = (height >> level) * (width >> level)
            flops += conv(cout, 3 * cout, 1, level) + conv(cout, cout, 1, level) + 2 * _linear(n, n, tokens=cout)
        return flops

    def attends(level):
        return (height >> level) in p["attn_resolutions"]

    logvar = p.get("logvar_channels", 128)  # UNet's default
    flops = _conditioning(mc, E, guidance_input, logvar) + conv(img, mc, 3, 0)
    skips, cout = [mc], mc
    for level, channels in enumerate(cblock):  # encoder
        if level > 0:
            flops += block(cout, cout, level, False)
            skips.append(cout)
        for _ in range(nb):
            flops += block(cout, channels, level, attends(level))
            cout = channels
            skips.append(cout)
    for level, channels in reversed(list(enumerate(cblock))):  # decoder
        if level == len(cblock) - 1:
            flops += block(cout, cout, level, True) + block(cout, cout, level, False)
        else:
            flops += block(cout, cout, level, False)
        for _ in range(nb + 1):
            flops += block(cout + skips.pop(), channels, level, attends(level))
            cout = channels
    return flops + conv(cout, img, 3, 0)


def _dit_flops(p: dict, data_shape, guidance_input: bool) -> int:
    img, height, width = data_shape
    C, patch = p["hidden"], p["patch_size"]
    n = (height // patch) * (width // patch)  # tokens
    block = (2 * _linear(C, 2 * C)  # two adaptive norms' scale/shift
             + _linear(C, 3 * C, tokens=n) + 2 * _linear(n, n, tokens=C) + _linear(C, C, tokens=n)  # attention
             + 2 * _linear(C, MLP_RATIO * C, tokens=n))  # MLP
    return (_conditioning(TIME_FEATURES, C, guidance_input, p.get("logvar_channels", 128))
            + _linear(img * patch * patch, C, tokens=n) + p["depth"] * block
            + _linear(C, 2 * C) + _linear(C, patch * patch * img, tokens=n))


def forwards_per_sample(objective_kind: str, *, jvp: str = "fused", cfg_guidance: bool = False) -> tuple[int, int]:
    """The accounting of the module docstring: (forwards of the trained network, forwards of the teacher) that one
    training sample costs. diffusion (3, 0); sCT (3 + JVP, 0); sCD (3 + JVP, 1, or 2 with guidance)."""
    if objective_kind not in OBJECTIVES:
        raise ValueError(f"objective kind {objective_kind!r} is not one of {', '.join(OBJECTIVES)}")
    if jvp not in JVP_FORWARDS:
        raise ValueError(f"jvp {jvp!r} is not one of {', '.join(JVP_FORWARDS)}")
    student = 1 + BACKWARD_FORWARDS + (JVP_FORWARDS[jvp] if objective_kind != "diffusion" else 0)
    teacher = (2 if cfg_guidance else 1) if objective_kind == "scd" else 0
    return student, teacher


def train_flops_per_sample(model_cfg, objective_kind: str, data_shape: tuple[int, ...], num_classes: int = 0,
                           cfg_guidance: bool = False, *, jvp: str = "fused", teacher_cfg=None) -> int:
    """Training FLOPs per sample of one step: forwards_per_sample x forward_flops. ``teacher_cfg`` (sCD) defaults
    to the student's architecture (the paper's sCD students start from their teacher's weights)."""
    student, teacher = forwards_per_sample(objective_kind, jvp=jvp, cfg_guidance=cfg_guidance)
    F = forward_flops(model_cfg, data_shape, num_classes)
    F_teacher = F if teacher_cfg is None or not teacher else forward_flops(teacher_cfg, data_shape, num_classes)
    return student * F + teacher * F_teacher


def trial_flops(model_cfg, objective_kind: str, data_shape: tuple[int, ...], num_classes: int = 0,
                cfg_guidance: bool = False, *, steps: int, batch_size: int, jvp: str = "fused",
                teacher_cfg=None) -> int:
    """Total training FLOPs of a run: per-sample FLOPs x steps x global batch size."""
    per_sample = train_flops_per_sample(model_cfg, objective_kind, data_shape, num_classes, cfg_guidance,
                                        jvp=jvp, teacher_cfg=teacher_cfg)
    return per_sample * steps * batch_size


def preset_table() -> list[dict]:
    """Parameters, forward FLOPs and training FLOPs per sample of every preset on its native data (NATIVE_DATA),
    with default model options; sCD is counted without guidance, the teacher of the student's size."""
    rows = []
    for arch, sizes in NATIVE_DATA.items():
        for size, (shape, num_classes) in sizes.items():
            cfg = ModelConfig(arch=arch, size=size)
            F = forward_flops(cfg, shape, num_classes)
            row = {"arch": arch, "size": size, "data_shape": shape, "num_classes": num_classes,
                   "params": parameter_count(cfg, shape, num_classes), "forward_flops": F}
            for kind in OBJECTIVES:
                student, teacher = forwards_per_sample(kind)
                row[f"train_flops_per_sample/{kind}"] = (student + teacher) * F
            rows.append(row)
    return rows
