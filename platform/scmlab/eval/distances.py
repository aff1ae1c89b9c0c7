"""Sample-based distances between distributions of vectors, for data small enough to hold in memory.

Both are exact metrics that need no feature network, which suits the 2-D toys and tests.
"""

import torch

CHUNK = 2048


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance (Szekely & Rizzo): 2 E|X - Y| - E|X - X'| - E|Y - Y'| >= 0, zero iff the laws agree.

    x: (N, D), y: (M, D). The V-statistic (diagonal terms included) is used; it is biased upward by O(1/N).
    """
    x, y = x.double().flatten(1), y.double().flatten(1)
    return float(2 * _mean_distance(x, y) - _mean_distance(x, x) - _mean_distance(y, y))


def _mean_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance over all pairs, CHUNK rows at a time (the full matrix can be large)."""
    total = sum(torch.cdist(x[i:i + CHUNK], y).sum() for i in range(0, x.shape[0], CHUNK))
    return total / (x.shape[0] * y.shape[0])


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance: sqrt of the mean over random unit directions of W2^2 of the 1-D projections.

    x, y: (N, D) with the same N (the 1-D W2 then pairs sorted projections).
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"sliced_wasserstein needs equal sample counts, got {x.shape[0]} and {y.shape[0]}")
    x, y = x.double().flatten(1), y.double().flatten(1)
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)  # (D, P) unit columns
    px, _ = torch.sort(x @ dirs.to(x.device), dim=0)  # (N, P)
    py, _ = torch.sort(y @ dirs.to(y.device), dim=0)
    return float((px - py).square().mean().sqrt())
