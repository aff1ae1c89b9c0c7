"""2-D toy distributions, generated from a fixed seed (vectors in original units, labels = mixture component).

The Gaussian and the Gaussian mixture have closed-form PF-ODE velocities (DESIGN section 2), so models trained on
them can be checked exactly; their parameters are recorded in the manifest's card.
"""

import math

import numpy as np

from .raw import Raw


def gaussian(count: int = 50000, seed: int = 0, mean=(0.0, 0.0), cov=((1.0, 0.8), (0.8, 1.0))) -> Raw:
    """x ~ N(mean, cov); a correlated 2-D Gaussian by default."""
    rng = np.random.default_rng(seed)
    return Raw(rng.multivariate_normal(mean, cov, size=count).astype(np.float32))


def gmm(count: int = 50000, seed: int = 0, modes: int = 8, radius: float = 2.0, std: float = 0.1) -> Raw:
    """Equal-weight mixture of N(mu_k, std^2 I), mu_k = radius (cos 2 pi k / modes, sin 2 pi k / modes)."""
    rng = np.random.default_rng(seed)
    k = rng.integers(modes, size=count)
    angle = 2 * math.pi * k / modes
    centers = radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return Raw((centers + std * rng.standard_normal((count, 2))).astype(np.float32), k, modes)


def moons(count: int = 50000, seed: int = 0, noise: float = 0.05) -> Raw:
    """Two interleaved half circles (as sklearn's make_moons), plus N(0, noise^2 I)."""
    rng = np.random.default_rng(seed)
    k = rng.integers(2, size=count)
    theta = rng.uniform(0, math.pi, size=count)
    outer = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    inner = np.stack([1 - np.cos(theta), 0.5 - np.sin(theta)], axis=1)
    x = np.where(k[:, None] == 0, outer, inner) + noise * rng.standard_normal((count, 2))
    return Raw(x.astype(np.float32), k, 2)


def rings(count: int = 50000, seed: int = 0, radii=(1.0, 2.0), noise: float = 0.05) -> Raw:
    """Concentric circles of the given radii, equally likely, plus N(0, noise^2 I)."""
    rng = np.random.default_rng(seed)
    k = rng.integers(len(radii), size=count)
    theta = rng.uniform(0, 2 * math.pi, size=count)
    x = np.asarray(radii)[k, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    return Raw((x + noise * rng.standard_normal((count, 2))).astype(np.float32), k, len(radii))
