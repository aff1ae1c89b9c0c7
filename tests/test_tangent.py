"""The fused sCM step's tangent rules (scmlab.tangent) against torch.func.jvp in fp64: each layer, the chunked
attention, and whole networks (MLP, UNet with attention, DiT) with dropout on."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as nnF

from scmlab import tangent as T
from scmlab.jvp import attention as math_or_fused_attention
from scmlab.nets import build_net

DTYPE = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed), dtype=DTYPE)


def assert_tangent(got, ref):
    """Within 1e-9 of the reference's largest entry, and the reference is a real derivative."""
    assert ref.abs().max() > 1e-3
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-9 * ref.abs().max().item())


def randomized(module, seed=1):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen(seed), dtype=p.dtype))
    return module


LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), T.linear, (4, 3, 6)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1, stride=2), T.conv2d, (2, 3, 7, 6)),
    "group_norm": (lambda: nn.GroupNorm(2, 6), T.group_norm, (3, 6, 4, 5)),
    "group_norm_no_affine": (lambda: nn.GroupNorm(3, 6, affine=False), T.group_norm, (3, 6, 4, 5)),
    "layer_norm": (lambda: nn.LayerNorm(7), T.layer_norm, (3, 5, 7)),
    "layer_norm_no_affine": (lambda: nn.LayerNorm(7, elementwise_affine=False), T.layer_norm, (3, 7)),
}


@pytest.mark.parametrize("name", LAYERS)
def test_layer_rules_equal_forward_mode_ad(name):
    make, rule, shape = LAYERS[name]
    layer = randomized(make().to(DTYPE))
    x, dx = randn(*shape, seed=2) * 2 + 0.3, randn(*shape, seed=3)
    y, dy = rule(layer, x, dx)
    ref_y, ref_dy = torch.func.jvp(layer, (x,), (dx,))
    assert torch.equal(y, layer(x))  # the layer's own forward
    assert_tangent(dy, ref_dy)
    assert rule(layer, x, None)[1] is None


FUNCTIONS = {
    "silu": (T.silu, nnF.silu),
    "gelu": (T.gelu, nnF.gelu),
    "pixel_norm": (lambda x, dx: T.pixel_norm(x, dx, dim=1),
                   lambda x: x / (x.square().mean(1, keepdim=True) + 1e-8).sqrt()),
}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_function_rules_equal_forward_mode_ad(name):
    rule, reference = FUNCTIONS[name]
    x, dx = randn(4, 6, 3, seed=2) * 2, randn(4, 6, 3, seed=3)
    y, dy = rule(x, dx)
    ref_y, ref_dy = torch.func.jvp(reference, (x,), (dx,))
    torch.testing.assert_close(y, ref_y, rtol=1e-14, atol=1e-14)
    assert_tangent(dy, ref_dy)


def test_linear_maps_apply_to_the_tangents_alike():
    pairs = [(randn(2, 3, 8, 8, seed=s), randn(2, 3, 8, 8, seed=s + 10)) for s in range(2)]
    y, dy = T.linear_map(lambda a, b: torch.cat([nnF.avg_pool2d(a, 2), nnF.avg_pool2d(b, 2)], 1), *pairs)
    ref = torch.func.jvp(lambda a, b: torch.cat([nnF.avg_pool2d(a, 2), nnF.avg_pool2d(b, 2)], 1),
                         tuple(p for p, _ in pairs), tuple(d for _, d in pairs))
    torch.testing.assert_close(dy, ref[1], rtol=0, atol=1e-15)
    assert T.linear_map(torch.add, (pairs[0][0], None), (pairs[1][0], None))[1] is None


def test_dropout_keeps_the_mask_of_a_plain_forward():
    """native_dropout (which returns the mask) draws the same units as F.dropout under the same seed, so the
    fused forward and a plain (or torch.func.jvp) forward drop the same units; the tangent uses that mask."""
    x, dx = randn(64, 32, seed=2), randn(64, 32, seed=3)
    torch.manual_seed(5)
    y, dy = T.dropout(x, dx, 0.3, True)
    torch.manual_seed(5)
    plain = nnF.dropout(x, 0.3, True)
    torch.manual_seed(5)
    ref_y, ref_dy = torch.func.jvp(lambda a: nnF.dropout(a, 0.3, True), (x,), (dx,))
    assert torch.equal(y, plain) and torch.equal(y, ref_y)
    assert 0.2 < (y == 0).double().mean() < 0.4
    torch.testing.assert_close(dy, ref_dy, rtol=0, atol=1e-15)
    assert torch.equal(T.dropout(x, dx, 0.3, False)[1], dx)  # eval: the identity


@pytest.mark.parametrize("N,chunk", [(13, 4), (16, 5), (7, 256)])
def test_chunked_attention_tangent_equals_math_attention_under_jvp(N, chunk, monkeypatch):
    """The online-softmax tangent over blocks of keys (sequence lengths that are not multiples of the block) against
    torch.func.jvp of the explicit math attention, in fp64; logits large enough that the running max moves."""
    monkeypatch.setattr(T, "ATTENTION_CHUNK", chunk)
    B, heads, d = 2, 3, 8
    q, k, v = (randn(B, heads, N, d, seed=s) * 3 for s in range(3))
    dq, dk, dv = (randn(B, heads, N, d, seed=s) for s in range(3, 6))

    def math_attention(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) / d**0.5, dim=-1) @ v

    o, do = T.attention(q, k, v, dq, dk, dv)
    ref_o, ref_do = torch.func.jvp(math_attention, (q, k, v), (dq, dk, dv))
    torch.testing.assert_close(o, ref_o, rtol=1e-12, atol=1e-12)
    assert torch.equal(o, math_or_fused_attention(q, k, v))  # the plain forward's kernel
    assert_tangent(do, ref_do)


# --- whole networks --------------------------------------------------------------------------------------------

def model_cfg(arch, size, **overrides):
    fields = dict(arch=arch, size=size, dropout=0.3, time_embedding="positional", time_max_freq=4.0,
                  double_norm=True, label_dropout=0.3, guidance_input=True, dropout_max_res=None,
                  sigma_d=0.5)
    return SimpleNamespace(**{**fields, **overrides})


NETS = [("mlp", "tiny", (3,), {}), ("mlp", "tiny", (3,), dict(double_norm=False, time_embedding="fourier_logsigma")),
        ("unet", "ci", (1, 8, 8), {}), ("dit", "ci", (2, 8, 12), {}),
        ("dit", "ci", (1, 8, 8), dict(double_norm=False, time_embedding="fourier_logsigma"))]


@pytest.mark.parametrize("arch,size,data_shape,options", NETS)
def test_network_tangent_equals_torch_func_jvp(arch, size, data_shape, options, monkeypatch):
    """net(..., tangent=(dx, dt)) in training mode (dropout and label dropout on) against torch.func.jvp of the
    plain forward under the same seed (the same masks), in fp64: the tangent within 1e-9, and F is the plain
    forward's value exactly (the fused step's F_theta^- is the plain forward's F_theta^-). The UNet and DiT have
    attention, here over more than one block of keys."""
    monkeypatch.setattr(T, "ATTENTION_CHUNK", 5)
    torch.manual_seed(0)
    net = randomized(build_net(model_cfg(arch, size, **options), data_shape=data_shape, num_classes=3).to(DTYPE),
                     seed=1).train()
    x, dx = randn(4, *data_shape, seed=2), randn(4, *data_shape, seed=3)
    t = torch.rand(4, generator=gen(4), dtype=DTYPE) * 1.4 + 0.1
    dt = randn(4, seed=5)
    labels, guidance = torch.tensor([0, 1, 2, 1]), torch.full((4,), 2.0, dtype=DTYPE)

    torch.manual_seed(7)
    F, logvar, dF = net(x, t, labels, guidance, return_logvar=True, tangent=(dx, dt))
    torch.manual_seed(7)
    plain = net(x, t, labels, guidance)
    torch.manual_seed(7)
    with torch.no_grad():
        ref_F, ref_dF = torch.func.jvp(lambda x, t: net(x, t, labels, guidance), (x, t), (dx, dt))
    assert torch.equal(F, plain)
    torch.testing.assert_close(F, ref_F, rtol=1e-12, atol=1e-12)
    assert_tangent(dF, ref_dF)
    assert F.requires_grad and not dF.requires_grad  # the tangent adds nothing to the graph
    torch.manual_seed(8)
    assert not torch.allclose(net(x, t, labels, guidance), plain)  # other masks, other output: dropout is on
