"""Tangent rules of the networks' layers, for the fused sCM step (``objective.jvp: fused``).

The sCM step needs F_theta (with its graph, for the backward), F_theta^- (its value) and the JVP
cos(t) sin(t) dF_theta^-/dt (Algorithm 1 of Lu & Song 2024). Forward-mode AD recomputes the primal in a second
pass, and one whose primal keeps grad records its tangent into the graph (DESIGN.md section 3). Here the tangent is
carried through the training forward itself: each op takes its input x with the tangent dx and returns (y, dy),
where
- y is the op's usual forward, with its autograd graph: F_theta^- = F_theta.detach() is then the same value, bit
  for bit, in any precision;
- dy is the directional derivative of y along dx, computed under ``no_grad`` from the op's own input, output and
  weights: it adds one linear pass per layer and stores nothing for the backward.

A plain forward passes dx = None and gets dy = None: the op is then exactly its usual forward. Tangents of labels
and guidance scales are zero and are not carried. Every rule is checked against ``torch.func.jvp`` in fp64
(tests/test_tangent.py).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as nnF

from .jvp import attention as attention_primal

ATTENTION_CHUNK = 256
"""Keys per block of the attention tangent's online softmax: its memory is O(N x chunk) per head, not O(N^2)."""


def linear_map(fn, *pairs):
    """A linear map fn (sum, scaling, reshape, concatenation, pooling) of (value, tangent) pairs: its tangent is
    fn of the tangents."""
    y = fn(*(x for x, _ in pairs))
    if pairs[0][1] is None:
        return y, None
    with torch.no_grad():
        return y, fn(*(dx for _, dx in pairs))


def linear(layer: nn.Linear, x, dx):
    """y = x W^T + b;  dy = dx W^T."""
    y = layer(x)
    if dx is None:
        return y, None
    with torch.no_grad():
        return y, nnF.linear(dx, layer.weight)


def conv2d(layer: nn.Conv2d, x, dx):
    """y = W * x + b;  dy = W * dx."""
    y = layer(x)
    if dx is None:
        return y, None
    with torch.no_grad():
        return y, nnF.conv2d(dx, layer.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def _at_least_fp32(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))


# The normalizations' tangents. Standardizing a group of n numbers, xhat = (x - mean) / sqrt(var + eps), has the
# Jacobian rstd (I - 1 1^T / n - xhat xhat^T / n): symmetric, so its JVP is its VJP, which PyTorch's fused backward
# kernel computes in one pass from the statistics of its forward kernel. In at least fp32 (under CPU autocast the
# forward of a norm may run in bf16).

def group_norm(layer: nn.GroupNorm, x, dx):
    """y = xhat gamma + beta, xhat standardized over each group of channels and all positions;  dy = gamma dxhat."""
    y = layer(x)
    if dx is None:
        return y, None
    with torch.no_grad():
        x32, dx32 = _at_least_fp32(x), _at_least_fp32(dx)
        size = (x.shape[0], x.shape[1], x[0, 0].numel(), layer.num_groups)  # B, C, positions, groups
        _, mean, rstd = torch.ops.aten.native_group_norm(x32, None, None, *size, layer.eps)
        dxhat = torch.ops.aten.native_group_norm_backward(dx32, x32, mean, rstd, None, *size,
                                                          [True, False, False])[0]
        if layer.affine:
            dxhat = dxhat * layer.weight.reshape(-1, *[1] * (x.ndim - 2))
        return y, dxhat.to(y.dtype)


def layer_norm(layer: nn.LayerNorm, x, dx):
    """y = xhat gamma + beta, xhat standardized over the last dimension;  dy = gamma dxhat."""
    y = layer(x)
    if dx is None:
        return y, None
    with torch.no_grad():
        x32, dx32 = _at_least_fp32(x), _at_least_fp32(dx)
        shape = [x.shape[-1]]
        _, mean, rstd = torch.ops.aten.native_layer_norm(x32, shape, None, None, layer.eps)
        dxhat = torch.ops.aten.native_layer_norm_backward(dx32, x32, shape, mean, rstd, None, None,
                                                          [True, False, False])[0]
        if layer.elementwise_affine:
            dxhat = dxhat * layer.weight
        return y, dxhat.to(y.dtype)


def pixel_norm(x, dx, dim: int = 1, eps: float = 1e-8):
    """y = x r, r = (mean(x^2) + eps)^-1/2 over `dim` (Karras et al. 2018, Eq. 2);  dy = r (dx - y mean(y dx))."""
    mean_square = _at_least_fp32(x).square().mean(dim=dim, keepdim=True)
    y = x * torch.rsqrt(mean_square + eps).to(x.dtype)
    if dx is None:
        return y, None
    with torch.no_grad():
        r = torch.rsqrt(mean_square + eps)
        y32, dx32 = _at_least_fp32(y), _at_least_fp32(dx)
        return y, (r * (dx32 - y32 * (y32 * dx32).mean(dim=dim, keepdim=True))).to(y.dtype)


# Elementwise activations: dy = f'(x) dx, the same product as their backward, which PyTorch fuses into one kernel.

def silu(x, dx):
    """y = x sigmoid(x);  dy = sigmoid(x) (1 + x (1 - sigmoid(x))) dx."""
    y = nnF.silu(x)
    if dx is None:
        return y, None
    with torch.no_grad():
        return y, torch.ops.aten.silu_backward(dx, x)


def gelu(x, dx):
    """y = x Phi(x) (the exact, erf form);  dy = (Phi(x) + x phi(x)) dx, phi the standard normal density."""
    y = nnF.gelu(x)
    if dx is None:
        return y, None
    with torch.no_grad():
        return y, torch.ops.aten.gelu_backward(dx, x)


def dropout(x, dx, p: float, training: bool):
    """y = x m / (1 - p);  dy = dx m / (1 - p), with the same mask m (the same product as the backward's).
    ``torch.native_dropout`` returns the mask and draws it exactly as ``F.dropout`` does (tests/test_tangent.py),
    so a plain forward under the same seed drops the same units."""
    if dx is None or not training or p == 0:
        return nnF.dropout(x, p=p, training=training), dx
    y, mask = torch.native_dropout(x, p, True)
    with torch.no_grad():
        return y, torch.ops.aten.native_dropout_backward(dx, mask, 1 / (1 - p))


def attention(q, k, v, dq, dk, dv):
    """o = softmax(q k^T / sqrt(d)) v over (B, heads, N, d) tensors, by the same kernel as the plain forward
    (scmlab.jvp.attention), and its tangent by an online softmax over blocks of keys. With s = q k^T / sqrt(d),
    p = softmax(s) and ds = (dq k^T + q dk^T) / sqrt(d):

        do_i = sum_j p_ij (ds_ij v_j + dv_j) - mu_i o_i,    mu_i = sum_j p_ij ds_ij

    Each block of keys updates the running max, the softmax normalizer and the two sums, rescaled when the max
    grows (as flash attention does), so no N x N matrix is ever held. The products run in the inputs' precision
    (bf16 under autocast), the softmax statistics and sums in at least fp32. The tangent costs 5 products of the
    primal's size where the primal takes 2.

    The same code serves CUDA. A flash kernel with a tangent (PyPI ``jvp_flash_attention`` 0.14, head dims
    16-256) could replace the loop there; it has not been measured against it (no GPU was lent while this was
    written), so it is no dependency.
    """
    o = attention_primal(q, k, v)
    if dq is None:
        return o, None
    with torch.no_grad():
        chunk, scale = ATTENTION_CHUNK, q.shape[-1] ** -0.5
        q = q * scale
        q_dq = torch.cat([q, dq * scale], dim=-1)  # (B, heads, N, 2d): ds = [q, dq] [dk; k]^T in one product
        acc_dtype = torch.promote_types(o.dtype, torch.float32)
        shape = q.shape[:-1]  # (B, heads, N)
        m = torch.full(shape, -math.inf, dtype=acc_dtype, device=q.device)  # running max of s_ij over j
        denom = torch.zeros(shape, dtype=acc_dtype, device=q.device)  # sum_j exp(s_ij - m_i)
        mu = torch.zeros_like(denom)  # sum_j exp(s_ij - m_i) ds_ij
        acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)  # sum_j exp(s_ij - m_i) (ds_ij v_j + dv_j)
        for start in range(0, k.shape[-2], chunk):
            block = slice(start, start + chunk)
            kb = k[..., block, :].transpose(-2, -1)  # (B, heads, d, chunk)
            s = (q @ kb).to(acc_dtype)  # (B, heads, N, chunk)
            ds = (q_dq @ torch.cat([dk[..., block, :].transpose(-2, -1), kb], dim=-2)).to(acc_dtype)
            m_new = torch.maximum(m, s.amax(dim=-1))
            rescale = torch.exp(m - m_new)
            p = s.sub_(m_new[..., None]).exp_()  # exp(s_ij - m_i), in place of s
            pds = ds.mul_(p)
            denom = denom * rescale + p.sum(dim=-1)
            mu = mu * rescale + pds.sum(dim=-1)
            vb, dvb = v[..., block, :], dv[..., block, :]  # (B, heads, chunk, d)
            acc = acc * rescale[..., None] + (pds.to(vb.dtype) @ vb + p.to(vb.dtype) @ dvb).to(acc_dtype)
            m = m_new
        do = (acc - mu[..., None] * o.to(acc_dtype)) / denom[..., None]
        return o, do.to(o.dtype)
