"""Samplers with the exact Gaussian models: consistency sampling reproduces the flow map, the PF-ODE solver
converges to it at its order and costs EDM's 2N - 1 evaluations."""

import math

import pytest
import torch

from gaussian import ConsistencyNet, GaussianMixture, TeacherNet
from scmlab import sampling, trigflow

DATA = GaussianMixture([[0.3, -0.2, 0.1]], [[0.2, 0.6, 0.45]])


def _latents(n, seed=0):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _exact(eps):
    return DATA.flow_map(0.5 * eps, torch.full((eps.shape[0],), trigflow.t_max(0.5), dtype=torch.float64))


def test_default_times():
    assert sampling.consistency_times(1, 0.5) == [trigflow.t_max(0.5)]
    assert sampling.consistency_times(2, 0.5) == [trigflow.t_max(0.5), 1.1]
    times = sampling.consistency_times(4, 0.5)
    assert len(times) == 4 and all(a > b for a, b in zip(times, times[1:])) and times[-1] > 0
    grid = sampling.ode_times(10, 0.5)
    assert len(grid) == 11 and grid[-1] == 0.0 and abs(grid[0] - trigflow.t_max(0.5)) < 1e-12


def test_one_step_is_the_exact_flow_map():
    eps = _latents(1000)
    x = sampling.consistency_sample(ConsistencyNet(DATA), eps, sigma_d=0.5)
    torch.testing.assert_close(x, _exact(eps), rtol=0, atol=1e-12)


@pytest.mark.parametrize("steps", [2, 3])
def test_multistep_samples_have_the_data_distribution(steps):
    """With the exact consistency function every step lands on an exact data sample; the re-noised chain keeps
    the data law, so mean and std match the Gaussian's within Monte Carlo error."""
    n = 100_000
    eps, renoise = _latents(n, 1), [_latents(n, 2 + i) for i in range(steps - 1)]
    x = sampling.consistency_sample(ConsistencyNet(DATA), eps, sigma_d=0.5,
                                    times=sampling.consistency_times(steps, 0.5), renoise=renoise)
    tol = 4 / math.sqrt(n)  # 4 standard errors (unit-scale data)
    torch.testing.assert_close(x.mean(0), DATA.mu[0], rtol=0, atol=tol)
    torch.testing.assert_close(x.std(0), DATA.s[0], rtol=0, atol=tol)


def test_sampling_is_a_function_of_its_inputs():
    net, eps = ConsistencyNet(DATA), _latents(64)
    renoise = [_latents(64, 9)]
    times = sampling.consistency_times(2, 0.5)
    a = sampling.consistency_sample(net, eps, sigma_d=0.5, times=times, renoise=renoise)
    b = sampling.consistency_sample(net, eps, sigma_d=0.5, times=times, renoise=renoise)
    assert torch.equal(a, b)


@pytest.mark.parametrize("order", [1, 2])
def test_pf_ode_converges_at_its_order(order):
    eps = _latents(500, 3)
    exact = _exact(eps)
    errors = [(sampling.pf_ode_sample(TeacherNet(DATA), eps, sigma_d=0.5, num_steps=n, order=order) - exact)
              .abs().max().item() for n in (32, 64, 128)]
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(r - order) < 0.25 for r in rates), (errors, rates)
    assert errors[-1] < (2e-2 if order == 1 else 1e-3)


class Counting(torch.nn.Module):
    """The exact teacher (its labels ignored), counting its evaluations."""

    num_classes = 2

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.teacher = TeacherNet(DATA)

    def forward(self, x, t, class_labels=None, guidance=None):
        self.calls += 1
        return self.teacher(x, t)


@pytest.mark.parametrize("steps, guidance, evaluations", [(18, 1.0, 35), (32, 1.0, 63), (32, 1.2, 126)])
def test_heun_is_edms_sampler(steps, guidance, evaluations):
    """N Heun steps with an Euler step to t = 0: 2N - 1 evaluations (the paper's 35 NFE on CIFAR-10, 63 and 63 x 2
    with guidance on ImageNet 512, App. G.1)."""
    net = Counting()
    labels = torch.zeros(4, dtype=torch.long)
    sampling.pf_ode_sample(net, _latents(4), sigma_d=0.5, num_steps=steps, class_labels=labels, guidance_scale=guidance)
    assert net.calls == evaluations
