"""TrigFlow functions against their definitions (DESIGN.md section 2)."""

import math

import torch

from scmlab import trigflow


def test_t_max_matches_paper():
    assert abs(trigflow.t_max(0.5) - 1.5645) < 1e-4
    assert trigflow.t_from_sigma(0.5, 0.5) == math.pi / 4


def test_velocity_is_time_derivative_of_noisy():
    g = torch.Generator().manual_seed(0)
    x0, z = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    t, h = torch.rand(4, generator=g, dtype=torch.float64) * 1.5, 1e-6
    fd = (trigflow.noisy(x0, z, t + h) - trigflow.noisy(x0, z, t - h)) / (2 * h)
    torch.testing.assert_close(fd, trigflow.velocity(x0, z, t), rtol=1e-8, atol=1e-8)


def test_noisy_endpoints_and_variance_preservation():
    x0, z = torch.randn(2, 7), torch.randn(2, 7)
    torch.testing.assert_close(trigflow.noisy(x0, z, torch.zeros(2)), x0)
    torch.testing.assert_close(trigflow.noisy(x0, z, torch.full((2,), math.pi / 2)), z, atol=1e-6, rtol=0)
    # With independent x0, z of std sigma_d, x_t keeps std sigma_d at every t.
    g = torch.Generator().manual_seed(1)
    x0, z = 0.5 * torch.randn(200_000, generator=g), 0.5 * torch.randn(200_000, generator=g)
    assert abs(trigflow.noisy(x0, z, torch.full((200_000,), 0.7)).std().item() - 0.5) < 0.005


def test_consistency_fn_boundary_condition():
    x, F = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(trigflow.consistency_fn(F, x, torch.zeros(3), 0.5), x)


def test_proposal_distribution_is_lognormal_in_sigma():
    sigma_d, P_mean, P_std = 0.5, -1.0, 1.4
    t = trigflow.sample_t(400_000, P_mean, P_std, sigma_d, generator=torch.Generator().manual_seed(0))
    assert bool(((t > 0) & (t < math.pi / 2)).all())
    log_sigma = torch.log(sigma_d * torch.tan(t.double()))
    assert abs(log_sigma.mean().item() - P_mean) < 0.01
    assert abs(log_sigma.std().item() - P_std) < 0.01
