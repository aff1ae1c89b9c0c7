"""Samplers: multistep consistency sampling for sCM students, and the PF-ODE solver for diffusion teachers.

All samplers take standard-normal latents and scale them by sigma_d; re-noising latents can be given too, so a
sample is a deterministic function of its inputs. Put the network in eval mode first (dropout off).
"""

import numpy as np
import torch

from . import trigflow


def consistency_times(steps: int, sigma_d: float) -> list[float]:
    """Default times: [t_max] for 1 step, [t_max, 1.1] for 2 (the paper's), then evenly spaced below 1.1."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [trigflow.t_max(sigma_d)] + [float(t) for t in np.linspace(trigflow.T_MID, 0.0, steps)[:-1]]


def _full(t: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0],), t, device=like.device, dtype=like.dtype)


@torch.no_grad()
def consistency_sample(net, noise: torch.Tensor, *, sigma_d: float, times=None, class_labels=None, guidance=None,
                       renoise=None, generator=None) -> torch.Tensor:
    """Multistep consistency sampling (section 2 / Algorithm 1 of Song et al. 2023, in TrigFlow form).

        x = f(sigma_d eps, t_0);   then for each further t_i:  x = f(cos(t_i) x + sin(t_i) sigma_d eps_i, t_i)

    noise: eps, (B, ...) standard normal. times: default consistency_times(1). renoise: the eps_i for the later
    steps (a list of len(times) - 1 tensors); drawn from `generator` when not given.
    """
    times = consistency_times(1, sigma_d) if times is None else list(times)
    x = sigma_d * noise
    for i, t in enumerate(times):
        if i > 0:
            eps = renoise[i - 1] if renoise is not None else torch.randn(
                x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = trigflow.noisy(x, sigma_d * eps, _full(t, x))
        tt = _full(t, x)
        x = trigflow.consistency_fn(net(x / sigma_d, tt, class_labels, guidance), x, tt, sigma_d)
    return x


def ode_times(num_steps: int, sigma_d: float, sigma_min: float = 0.002, sigma_max: float = trigflow.SIGMA_MAX,
              rho: float = 7.0) -> list[float]:
    """EDM's time grid (Karras et al. 2022, Eq. 5), sigma_max -> sigma_min in rho-space, mapped to TrigFlow time
    t = arctan(sigma / sigma_d), then t = 0. Returns num_steps + 1 times."""
    i = np.arange(num_steps) / max(num_steps - 1, 1)
    sigma = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return [float(t) for t in np.arctan(sigma / sigma_d)] + [0.0]


@torch.no_grad()
def pf_ode_sample(net, noise: torch.Tensor, *, sigma_d: float, num_steps: int, order: int = 2, times=None,
                  class_labels=None, guidance=None, guidance_scale: float = 1.0) -> torch.Tensor:
    """Integrate the PF-ODE dx_t/dt = sigma_d F(x_t / sigma_d, t) from t_max to 0 (Euler for order 1, Heun for 2).

    Heun is EDM's sampler (Karras et al. 2022, Algorithm 1): the step that ends at t = 0 is an Euler step, so N
    steps cost 2N - 1 network evaluations (18 steps: 35 NFE, the paper's CIFAR-10 teacher, App. G.1).
    guidance_scale != 1 applies classifier-free guidance F_uncond + w (F_cond - F_uncond) to a conditional net
    (twice the evaluations). times: a decreasing grid ending at 0 (default ode_times(num_steps)).
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    times = ode_times(num_steps, sigma_d) if times is None else list(times)

    def velocity(x, t):
        tt = _full(t, x)
        F = net(x / sigma_d, tt, class_labels, guidance)
        if class_labels is not None and guidance_scale != 1.0:
            F_uncond = net(x / sigma_d, tt, torch.full_like(class_labels, net.num_classes), guidance)
            F = F_uncond + guidance_scale * (F - F_uncond)
        return sigma_d * F

    x = sigma_d * noise
    for t, s in zip(times[:-1], times[1:]):
        h = s - t  # negative: integrating backwards in time
        v = velocity(x, t)
        x_next = x + h * v
        if order == 2 and s > 0:
            x_next = x + h * 0.5 * (v + velocity(x_next, s))
        x = x_next
    return x
