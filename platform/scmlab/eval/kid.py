"""Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs", section 4 and appendix).

KID is the squared maximum mean discrepancy between the feature distributions of two sets under the cubic
polynomial kernel k(x, y) = (x . y / d + 1)^3, d the feature dimension, estimated without bias (the U-statistic:
no k(x, x) terms) and averaged over random subsets of the two sets. Unlike FID it is unbiased in the number of
samples, so its expectation is 0 when both sets come from one distribution (an estimate can be slightly negative).
"""

import torch

SUBSETS, SUBSET_SIZE = 100, 1000  # the paper's code and torch-fidelity's defaults


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x . y / d + 1)^3 for all pairs: (N, D), (M, D) -> (N, M)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased estimate of MMD^2 between the laws of x (m, D) and y (n, D) (Gretton et al. 2012, Eq. 3):
    mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j)."""
    x, y = x.double(), y.double()
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(xx + yy - 2 * polynomial_kernel(x, y).mean())


def kid(x: torch.Tensor, y: torch.Tensor, *, subsets: int = SUBSETS, subset_size: int = SUBSET_SIZE,
        seed: int = 0) -> float:
    """KID between feature sets x (N, D) and y (M, D): the unbiased MMD^2 averaged over `subsets` random subsets
    (without replacement) of min(subset_size, N, M) features of each, drawn with `seed` (reproducible)."""
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 features in each set, got {x.shape[0]} and {y.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(subsets):
        i = torch.randperm(x.shape[0], generator=g)[:size].to(x.device)
        j = torch.randperm(y.shape[0], generator=g)[:size].to(y.device)
        total += mmd2_unbiased(x[i], y[j])
    return total / subsets
