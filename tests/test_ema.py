"""EMA profiles: the half-life in images and EDM2's power function."""

import math

import torch

from scmlab.ema import EMA, power_gamma


def _constant_model(value: float) -> torch.nn.Module:
    m = torch.nn.Linear(3, 1)
    with torch.no_grad():
        m.weight.fill_(value)
        m.bias.fill_(value)
    return m


def test_half_life_in_images():
    model = _constant_model(0.0)
    ema = EMA(model, batch_size=10, half_life_images=1000, rampup=None)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for step in range(100):  # 100 steps x 10 images = one half-life: half the initial weight remains
        ema.update(model, step)
    assert abs(ema.module.weight[0, 0].item() - 0.5) < 1e-6


def test_rampup_caps_the_half_life_early():
    ema = EMA(_constant_model(0.0), batch_size=10, half_life_images=1e6, rampup=0.05)
    assert ema.beta(0) == 0.5 ** (10 / 0.5)  # half-life capped at 0.05 x 10 images seen
    assert ema.beta(10**7) == 0.5 ** (10 / 1e6)


def test_power_profile_matches_sigma_rel():
    for sigma_rel in (0.05, 0.1, 0.2):
        g = power_gamma(sigma_rel)
        assert math.isclose(math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))), sigma_rel, rel_tol=1e-9)
    # beta_t = (1 - 1/t)^(gamma+1): the first update copies the model (t = 1 -> beta = 0).
    model = _constant_model(2.0)
    ema = EMA(_constant_model(0.0), batch_size=1, sigma_rel=0.05)
    ema.update(model, 0)
    assert ema.module.weight[0, 0].item() == 2.0


def test_state_dict_round_trip_and_module_is_frozen():
    model = _constant_model(1.0)
    ema = EMA(model, batch_size=4, half_life_images=100)
    ema.update(_constant_model(3.0), 5)
    other = EMA(_constant_model(0.0), batch_size=4, half_life_images=100)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.module.weight, ema.module.weight)
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert not ema.module.training
