"""Tangent machinery: the JVP of the network along the PF-ODE trajectory, and attention that forward-mode AD passes.

sCM needs cos(t) sin(t) dF_theta^-/dt, the total derivative of the stop-gradient network along x_t(t) (Algorithm 1
of Lu & Song 2024). One JVP of F at (x_t / sigma_d, t) with tangent (cos t sin t dx_t/dt / sigma_d, cos t sin t)
returns it, together with F itself as the primal output.

Three ways to compute it (``objective.jvp``):
- ``fused`` (the default): the tangent is carried through the training forward itself, layer by layer
  (scmlab.tangent), so F_theta^- is the training forward's own value and the JVP costs one linear pass with no
  primal recomputed and nothing stored for the backward. Networks take it as ``net(..., tangent=(dx, dt))``.
- ``autograd``: exact forward-mode AD (``torch.func.jvp``) on the *unwrapped* module (it fails through DDP's
  wrapper; theta^- is a stop-gradient, so running it outside the wrapper is exact). FSDP2's fully_shard is no
  wrapper: the JVP runs through its hooks, which gather the sharded weights (tests/test_fsdp.py).
- ``fd``: central finite differences, three forward passes.

The last two (``network_jvp``) evaluate the network under the same random state (dropout masks), which is also the
state of the training forward that follows, so F_theta - F_theta^- is zero in value up to the rounding of the
kernels: under bf16 the JVP's math attention and the training forward's fused kernel round differently, an error
of the size of g's entries at image resolutions (DESIGN.md section 8), which ``fused`` does not have.
"""

import contextlib

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as nnF

JVP_MODES = ("fused", "autograd", "fd")


@contextlib.contextmanager
def replay_randomness(device: torch.device):
    """Run the block, then rewind the RNG so that the next block draws the same random numbers (dropout masks)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


def network_jvp(fn, primals: tuple, tangents: tuple, mode: str = "autograd", eps: float = 1e-3):
    """Return (fn(*primals), directional derivative of fn at primals along tangents), both without a graph.

    Every evaluation of fn runs under the RNG state found on entry, and that state is restored on exit. (The
    ``fused`` mode has no separate pass: the network carries the tangent, see SCMLoss.evaluate.)
    """
    device = primals[0].device
    with torch.no_grad():
        if mode == "autograd":
            with replay_randomness(device):
                return torch.func.jvp(fn, primals, tangents)
        if mode == "fd":
            # Central difference: error O(eps^2 |f'''|); the step is taken along the whole tangent, so eps is
            # relative to the tangent's scale (cos t sin t <= 1/2 keeps that scale O(1) per coordinate).
            def at(s):
                with replay_randomness(device):
                    return fn(*(p + s * d for p, d in zip(primals, tangents)))

            out = at(0.0)
            return out, (at(eps) - at(-eps)) / (2 * eps)
    raise ValueError(f"network_jvp: mode {mode!r} is not autograd or fd")


def _has_forward_tangent(x: torch.Tensor) -> bool:
    if torch._C._are_functorch_transforms_active():
        return True
    return fwAD._current_level >= 0 and fwAD.unpack_dual(x).tangent is not None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, N, d) tensors.

    PyTorch's fused SDPA kernels (flash, efficient, cuDNN) have no forward-mode AD rule (DESIGN.md section 3), so
    under a JVP this falls back to the explicit math form, whose every op has one; otherwise it takes the fused
    kernel.
    """
    if not _has_forward_tangent(q):
        return nnF.scaled_dot_product_attention(q, k, v)
    scale = q.shape[-1] ** -0.5
    weights = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)  # (B, heads, N, N)
    return weights @ v
