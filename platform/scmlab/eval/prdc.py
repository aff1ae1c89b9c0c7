"""Precision and recall of generated samples in feature space (Kynkaanniemi et al. 2019, "Improved Precision and
Recall Metric for Assessing Generative Models", Eqs. 1-2), and density and coverage (Naeem et al. 2020, "Reliable
Fidelity and Diversity Metrics for Generative Models", Eqs. 3-4).

Each real feature r_i gets a ball whose radius is the distance to its k-th nearest real neighbour (k = 3, the
papers' choice for these sample sizes); likewise each fake feature f_j among the fakes.
- precision: the share of fakes inside some real ball (fidelity); recall: the share of reals inside some fake ball
  (diversity: mode dropping lowers it);
- density: (1 / k M) sum_j #{i: f_j in ball(r_i)} (counts how many real balls hold each fake; 1 on average when the
  laws agree); coverage: the share of reals whose ball holds at least one fake.
"""

import torch

K = 3
CHUNK = 2048  # rows of a distance matrix computed at once


def _kth_neighbour_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row of x to its k-th nearest other row."""
    radii = []
    for start in range(0, x.shape[0], CHUNK):
        d = torch.cdist(x[start:start + CHUNK], x)  # (chunk, N), including the point itself at distance 0
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = K) -> dict[str, float]:
    """{"precision", "recall", "density", "coverage"} of `fake` (M, D) against `real` (N, D); both need more than k
    rows."""
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision/recall need more than k={k} features in each set, got {real.shape[0]} real and "
                         f"{fake.shape[0]} generated")
    real, fake = real.double(), fake.double()
    r_real, r_fake = _kth_neighbour_radii(real, k), _kth_neighbour_radii(fake, k)
    in_real = torch.zeros(fake.shape[0], dtype=torch.float64, device=fake.device)  # real balls holding each fake
    real_reached = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)  # a fake ball holds real i
    real_covered = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)  # real i's ball holds a fake
    for start in range(0, real.shape[0], CHUNK):
        d = torch.cdist(real[start:start + CHUNK], fake)  # (chunk, M)
        inside = d < r_real[start:start + CHUNK, None]
        in_real += inside.sum(0)
        real_reached[start:start + CHUNK] = (d < r_fake[None, :]).any(1)
        real_covered[start:start + CHUNK] = inside.any(1)
    return {"precision": float((in_real > 0).double().mean()), "recall": float(real_reached.double().mean()),
            "density": float(in_real.mean() / k), "coverage": float(real_covered.double().mean())}
