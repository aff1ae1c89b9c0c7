"""Exponential moving averages of the weights, for sampling.

Two profiles, as in the paper (appendix: CIFAR-10 uses a half-life of 0.5 Mimg, ImageNet a power-function EMA):
- half-life in images (EDM, Karras et al. 2022): beta = 0.5 ** (batch / half_life), with EDM's ramp-up that caps the
  half-life at `rampup` x the images seen so far, so early averages do not hold on to the random initialisation;
- power function (EDM2, Karras et al. 2024, Eq. 3 and Algorithm 2): beta_t = (1 - 1/t)^(gamma + 1), with gamma
  chosen so that the profile's relative standard deviation is sigma_rel.
"""

import copy

import numpy as np
import torch
from torch.distributed.tensor import DTensor


def power_gamma(sigma_rel: float) -> float:
    """Solve sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) for gamma (EDM2 Algorithm 2, sigma_rel_to_gamma)."""
    t = sigma_rel ** -2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


class EMA:
    """An averaged copy of a module. `update(model, step)` after each optimizer step; `module` is the average."""

    def __init__(self, model: torch.nn.Module, *, batch_size: int, half_life_images: float | None = None,
                 rampup: float | None = 0.05, sigma_rel: float | None = None):
        if (half_life_images is None) == (sigma_rel is None):
            raise ValueError("EMA: give exactly one of half_life_images (EDM profile) or sigma_rel (power profile)")
        self.batch_size, self.half_life_images, self.rampup = batch_size, half_life_images, rampup
        self.gamma = None if sigma_rel is None else power_gamma(sigma_rel)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def beta(self, step: int) -> float:
        """Decay applied at optimizer step `step` (0-based: the first update is step 0)."""
        if self.gamma is not None:
            return (1 - 1 / (step + 1)) ** (self.gamma + 1)
        half_life = self.half_life_images
        if self.rampup is not None:
            half_life = min(half_life, (step + 1) * self.batch_size * self.rampup)
        return 0.5 ** (self.batch_size / max(half_life, 1e-8))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # One multi-tensor kernel for all the parameters (the foreach form of p_ema.lerp_(p, 1 - beta) each), as
        # torch.optim's foreach optimizers do; a kernel launch per tensor costs more than the update on a GPU.
        # A sharded model's (FSDP2, scmlab.train.parallel) parameters are gathered whole: the average stays a plain
        # module on every rank, for sampling and checkpoints alike (a collective: every rank updates).
        targets = [p.full_tensor() if isinstance(p, DTensor) else p.detach() for p in model.parameters()]
        torch._foreach_lerp_(list(self.module.parameters()), targets, 1 - self.beta(step))
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
