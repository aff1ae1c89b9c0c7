"""Learning: short sCT / sCD runs on 2-D data reach the data distribution and the exact flow map.

A minimal loop (Adam + EMA) keeps these tests about the objective; the training loop has its own tests.
"""

import math

import pytest
import torch

from gaussian import GaussianMixture, TeacherNet
from scmlab import sampling
from scmlab.ema import EMA
from scmlab.eval.distances import energy_distance
from scmlab.nets import build_net
from scmlab.objectives import SCMLoss

SD = 0.5


@pytest.fixture(autouse=True)
def one_thread():
    """A 12k-parameter MLP runs faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(objective, data, steps, seed=0, batch=256, lr=3e-4):
    torch.manual_seed(seed)
    cfg = dict(arch="mlp", size="tiny", dropout=None, time_embedding="positional", time_max_freq=4.0,
               double_norm=True, label_dropout=0.0, guidance_input=False, sigma_d=SD)
    net = build_net(type("ModelConfig", (), cfg)(), data_shape=(2,))
    ema = EMA(net, batch_size=batch, half_life_images=batch * 50)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        loss, _ = objective(net, data.sample(batch, generator=g).float(), step=step, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()
        ema.update(net, step)
    return net.eval(), ema.module


def _one_step(net, eps):
    return sampling.consistency_sample(net, eps.float(), sigma_d=SD).double()


@pytest.mark.slow
def test_sct_on_a_ring_of_gaussians_cuts_energy_distance():
    ring = torch.arange(8) * 2 * math.pi / 8
    data = GaussianMixture(torch.stack([0.6 * ring.cos(), 0.6 * ring.sin()], 1), torch.full((8, 2), 0.1))
    g = torch.Generator().manual_seed(7)
    eps, ref = torch.randn(2000, 2, generator=g, dtype=torch.float64), data.sample(2000, generator=g)
    objective = SCMLoss("sct", sigma_d=SD, P_mean=-1.0, P_std=1.4, warmup_steps=300)
    net, ema = _train(objective, data, steps=1200)
    untrained, _ = _train(objective, data, steps=0)
    before = energy_distance(_one_step(untrained, eps), ref)
    after = energy_distance(_one_step(ema, eps), ref)
    floor = energy_distance(data.sample(2000, generator=g), ref)  # two samples of the data itself
    assert after < before / 10, (before, after, floor)


@pytest.mark.slow
def test_scd_from_an_exact_mixture_teacher_reaches_the_flow_map():
    """The teacher is the mixture's exact PF-ODE velocity; the reference is the same ODE solved accurately
    (Heun, 200 steps) from the same latents. The 1-step student must land close to it."""
    data = GaussianMixture([[-0.5, 0.1], [0.5, -0.1]], [[0.25, 0.4], [0.25, 0.4]])
    eps = torch.randn(2000, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    flow_map = sampling.pf_ode_sample(TeacherNet(data), eps, sigma_d=SD, num_steps=200, order=2)
    objective = SCMLoss("scd", sigma_d=SD, P_mean=-1.0, P_std=1.4, warmup_steps=300, teacher=TeacherNet(data))
    _, ema = _train(objective, data, steps=1500)
    untrained, _ = _train(objective, data, steps=0)
    error = lambda net: ((_one_step(net, eps) - flow_map).norm(dim=1).mean() / flow_map.norm(dim=1).mean()).item()
    before, after = error(untrained), error(ema)
    assert after < 0.12 and after < before / 8, (before, after)
