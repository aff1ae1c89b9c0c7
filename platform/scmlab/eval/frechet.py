"""Gaussian statistics of features, and the Frechet distance between two Gaussians (FID's, Heusel et al. 2017).

    d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1^1/2 S_2 S_1^1/2)^1/2)

Statistics are float64 running sums (n, sum f, sum f f^T): features never need to sit in memory together, and the
partial sums of several processes add up (`all_reduce`), so a distributed evaluation equals a single-process one.
"""

import torch


class GaussianStats:
    """n, the sum of features and the sum of their outer products, in float64, on the features' device."""

    def __init__(self, dim: int, device="cpu"):
        self.n = 0
        self.s1 = torch.zeros(dim, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> "GaussianStats":
        """Add a batch of features (B, D)."""
        f = features.to(self.s1.device, torch.float64).flatten(1)
        self.n += f.shape[0]
        self.s1 += f.sum(0)
        self.s2 += f.T @ f
        return self

    def all_reduce(self) -> "GaussianStats":
        """Sum the statistics of every rank of the default process group (a collective: every rank calls it)."""
        import torch.distributed as dist

        n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.s1.device)
        for t in (n, self.s1, self.s2):
            dist.all_reduce(t)
        self.n = int(n.item())
        return self

    @property
    def mean(self) -> torch.Tensor:
        return self.s1 / self.n

    @property
    def cov(self) -> torch.Tensor:
        """The unbiased sample covariance (n - 1 in the denominator, as numpy.cov)."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        mu = self.mean
        c = (self.s2 - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return (c + c.T) / 2

    def state_dict(self) -> dict:
        return {"n": self.n, "s1": self.s1.cpu(), "s2": self.s2.cpu()}

    @classmethod
    def from_state_dict(cls, d: dict, device="cpu") -> "GaussianStats":
        stats = cls(int(d["s1"].shape[0]), device)
        stats.n = int(d["n"])
        stats.s1 += torch.as_tensor(d["s1"], dtype=torch.float64).to(device)
        stats.s2 += torch.as_tensor(d["s2"], dtype=torch.float64).to(device)
        return stats


def _sqrtm_psd(S: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
    w, V = torch.linalg.eigh(S)
    return (V * w.clamp(min=0).sqrt()) @ V.T


def frechet_distance(mu1: torch.Tensor, S1: torch.Tensor, mu2: torch.Tensor, S2: torch.Tensor) -> float:
    """The squared Frechet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2), in float64.

    tr((S1^1/2 S2 S1^1/2)^1/2) is the sum of the singular values of A = S1^1/2 S2^1/2 (A A^T is that matrix), with
    the symmetric square roots from symmetric eigendecompositions. This avoids the general matrix square root of
    S1 S2 (scipy.linalg.sqrtm, as the FID reference code does), whose round-off turns complex, and also taking
    square roots of the eigenvalues of S1^1/2 S2 S1^1/2: with fewer samples than feature dimensions (singular
    covariances) that turns round-off of 1e-16 into errors of 1e-8 per null direction, which add up over 2048.
    """
    mu1, S1, mu2, S2 = (t.to(torch.float64) for t in (mu1, S1, mu2, S2))
    trace_sqrt = torch.linalg.svdvals(_sqrtm_psd(S1) @ _sqrtm_psd(S2)).sum()
    d = mu1 - mu2
    return float(d @ d + torch.trace(S1) + torch.trace(S2) - 2 * trace_sqrt)


def frechet_of(a: GaussianStats, b: GaussianStats) -> float:
    """The Frechet distance between the Gaussians of two sets of statistics."""
    return frechet_distance(a.mean, a.cov, b.mean.to(a.s1.device), b.cov.to(a.s1.device))
