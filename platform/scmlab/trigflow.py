"""TrigFlow: the diffusion process of sCM (Lu & Song 2024, section 2), as pure functions.

    x_t = cos(t) x0 + sin(t) z,    z ~ N(0, sigma_d^2 I),    t in [0, pi/2]                 (Eq. 6)
    v_t = dx_t/dt = cos(t) z - sin(t) x0                                                  (the velocity target)
    f_theta(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta(x_t / sigma_d, t)                (Eq. 7, f(x, 0) = x)

EDM's noise level maps to TrigFlow time by t = arctan(sigma / sigma_d). Times are (B,) tensors; they broadcast over
the trailing data dimensions.
"""

import math

import torch

SIGMA_MAX = 80.0  # EDM's largest noise level; sampling starts at t_max = arctan(SIGMA_MAX / sigma_d)
T_MID = 1.1  # the paper's intermediate time for 2-step sampling


def expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with as many dims as `like`."""
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


def t_from_sigma(sigma, sigma_d: float):
    """EDM noise level -> TrigFlow time: t = arctan(sigma / sigma_d)."""
    if isinstance(sigma, torch.Tensor):
        return torch.atan(sigma / sigma_d)
    return math.atan(sigma / sigma_d)


def t_max(sigma_d: float, sigma_max: float = SIGMA_MAX) -> float:
    """Sampling starts here: 1.5645 for sigma_d = 0.5."""
    return t_from_sigma(sigma_max, sigma_d)


def noisy(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = cos(t) x0 + sin(t) z."""
    t = expand(t, x0)
    return torch.cos(t) * x0 + torch.sin(t) * z


def velocity(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v_t = cos(t) z - sin(t) x0: the diffusion target, and sCT's unbiased estimate of dx_t/dt."""
    t = expand(t, x0)
    return torch.cos(t) * z - torch.sin(t) * x0


def sample_t(n: int, P_mean: float, P_std: float, sigma_d: float, *, generator=None, device=None, dtype=None):
    """Proposal distribution: tau ~ N(P_mean, P_std^2), t = arctan(exp(tau) / sigma_d)   (section 4.2)."""
    tau = torch.randn(n, generator=generator, device=device, dtype=dtype) * P_std + P_mean
    return torch.atan(torch.exp(tau) / sigma_d)


def consistency_fn(F: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """f(x_t, t) = cos(t) x_t - sin(t) sigma_d F, with F = F_theta(x_t / sigma_d, t) already evaluated."""
    t = expand(t, x_t)
    return torch.cos(t) * x_t - torch.sin(t) * sigma_d * F
