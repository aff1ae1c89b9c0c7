"""The metrics' math against closed forms and independent computations: the Frechet distance (closed forms for
commuting and non-commuting Gaussians, scipy's sqrtm), streaming float64 statistics (numpy), KID's unbiasedness,
precision / recall / density / coverage (a direct numpy transcription of the papers' definitions)."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from scmlab.eval.distances import energy_distance
from scmlab.eval.frechet import GaussianStats, frechet_distance, frechet_of
from scmlab.eval.kid import kid, mmd2_unbiased, polynomial_kernel
from scmlab.eval.prdc import prdc


def _t(a):
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def test_frechet_commuting_gaussians_closed_form():
    """Diagonal covariances commute: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(_t(mu1), _t(np.diag(a)), _t(mu2), _t(np.diag(b))) == pytest.approx(expected, rel=1e-12)
    # a common rotation of both keeps them commuting and the distance unchanged
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    rotated = frechet_distance(_t(q @ mu1), _t(q @ np.diag(a) @ q.T), _t(q @ mu2), _t(q @ np.diag(b) @ q.T))
    assert rotated == pytest.approx(expected, rel=1e-10)


def test_frechet_non_commuting_gaussians_closed_form():
    """In 2-D, tr((S1^1/2 S2 S1^1/2)^1/2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)) (the eigenvalues l1, l2 of the
    inner matrix give (sqrt l1 + sqrt l2)^2 = l1 + l2 + 2 sqrt(l1 l2))."""
    S1 = np.array([[2.0, 0.3], [0.3, 0.5]])
    S2 = np.array([[1.0, -0.7], [-0.7, 1.5]])
    assert not np.allclose(S1 @ S2, S2 @ S1)
    mu1, mu2 = np.array([0.5, -1.0]), np.array([-0.2, 0.4])
    trace_sqrt = math.sqrt(np.trace(S1 @ S2) + 2 * math.sqrt(np.linalg.det(S1) * np.linalg.det(S2)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(S1) + np.trace(S2) - 2 * trace_sqrt
    assert frechet_distance(_t(mu1), _t(S1), _t(mu2), _t(S2)) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(_t(mu1), _t(S1), _t(mu1), _t(S1)) == pytest.approx(0, abs=1e-12)


def test_streaming_statistics_and_frechet_match_numpy_and_scipy():
    """Statistics summed batch by batch in float64 equal numpy's mean and cov; the distance equals the FID
    reference code's formula with scipy.linalg.sqrtm of S1 S2, to 1e-6 relative, on random (correlated) features."""
    rng = np.random.default_rng(1)
    mix = rng.normal(size=(64, 64)) / 8
    x = rng.normal(size=(500, 64)) @ mix + 3.0  # offset: the sums must not lose the covariance to cancellation
    y = rng.normal(size=(400, 64)) @ (mix + 0.05 * rng.normal(size=(64, 64))) + 2.9
    a, b = GaussianStats(64), GaussianStats(64)
    for chunk in np.array_split(x, 7):
        a.update(torch.from_numpy(chunk).float())
    b.update(torch.from_numpy(y).float())
    x32, y32 = x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(a.mean.numpy(), x32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(a.cov.numpy(), np.cov(x32, rowvar=False), rtol=1e-9, atol=1e-12)
    S1, S2 = np.cov(x32, rowvar=False), np.cov(y32, rowvar=False)
    root = scipy.linalg.sqrtm(S1 @ S2)
    reference = np.sum((x32.mean(0) - y32.mean(0)) ** 2) + np.trace(S1) + np.trace(S2) - 2 * np.trace(root).real
    assert frechet_of(a, b) == pytest.approx(reference, rel=1e-6)
    # partial sums add up (what all_reduce does across ranks), and survive a state_dict round trip
    parts = [GaussianStats(64).update(torch.from_numpy(c).float()) for c in np.array_split(x, 3)]
    merged = GaussianStats.from_state_dict(parts[0].state_dict())
    for p in parts[1:]:
        merged.n, merged.s1, merged.s2 = merged.n + p.n, merged.s1 + p.s1, merged.s2 + p.s2
    assert frechet_of(merged, b) == pytest.approx(frechet_of(a, b), rel=1e-10)


def test_kid_is_unbiased_where_the_v_statistic_is_not():
    """Two samples of one distribution: the mean of many KID estimates is 0 within its standard error, while the
    biased estimate (k(x, x) terms included) is positive by many standard errors."""
    rng = np.random.default_rng(2)
    d, m, repeats = 16, 40, 300
    unbiased, biased = [], []
    for _ in range(repeats):
        x = torch.from_numpy(rng.normal(size=(m, d)))
        y = torch.from_numpy(rng.normal(size=(m, d)))
        unbiased.append(mmd2_unbiased(x, y))
        biased.append(float(polynomial_kernel(x, x).mean() + polynomial_kernel(y, y).mean()
                            - 2 * polynomial_kernel(x, y).mean()))
    se = np.std(unbiased) / math.sqrt(repeats)
    assert abs(np.mean(unbiased)) < 3 * se
    assert np.mean(biased) > 10 * se
    # over subsets: still centred, and a shifted distribution scores clearly above it
    x, y = torch.from_numpy(rng.normal(size=(300, d))), torch.from_numpy(rng.normal(size=(300, d)))
    same, shifted = kid(x, y, subsets=50, subset_size=100), kid(x, y + 0.5, subsets=50, subset_size=100)
    assert abs(same) < 0.05 * shifted


def _prdc_reference(real: np.ndarray, fake: np.ndarray, k: int) -> dict:
    """The definitions, written out with full distance matrices (as Naeem et al.'s published code)."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    r_real = np.sort(dist(real, real), axis=1)[:, k]
    r_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    d = dist(real, fake)
    return {"precision": (d < r_real[:, None]).any(0).mean(), "recall": (d < r_fake[None, :]).any(1).mean(),
            "density": (d < r_real[:, None]).sum(0).mean() / k, "coverage": (d.min(1) < r_real).mean()}


def test_prdc_matches_the_definitions_and_shows_mode_dropping(monkeypatch):
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(300, 8)), rng.normal(size=(250, 8)) * 1.2 + 0.3
    monkeypatch.setattr("scmlab.eval.prdc.CHUNK", 64)  # several blocks of the distance matrices
    got = prdc(torch.from_numpy(real), torch.from_numpy(fake))
    for key, value in _prdc_reference(real, fake, 3).items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    same = prdc(torch.from_numpy(real), torch.from_numpy(real))
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    # two modes in the data, samples from one of them: fidelity stays, diversity halves
    modes = np.concatenate([rng.normal(size=(200, 8)) - 5, rng.normal(size=(200, 8)) + 5])
    one_mode = prdc(torch.from_numpy(modes), torch.from_numpy(rng.normal(size=(200, 8)) + 5))
    assert one_mode["precision"] > 0.9 and 0.4 < one_mode["recall"] < 0.55 and one_mode["coverage"] < 0.55


def test_energy_distance_in_blocks_equals_the_full_matrices(monkeypatch):
    monkeypatch.setattr("scmlab.eval.distances.CHUNK", 64)
    rng = np.random.default_rng(4)
    x, y = torch.from_numpy(rng.normal(size=(300, 3))), torch.from_numpy(rng.normal(size=(200, 3)) + 0.2)
    full = float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())
    assert energy_distance(x, y) == pytest.approx(full, rel=1e-12)
