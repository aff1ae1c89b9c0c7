"""Compute accounting: counted forward FLOPs against the analytic count of every preset, meta-device counts against
a real forward, parameter counts, the documented training-FLOP ratios, and the accounting against the FLOPs that a
real training step of each objective executes."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from scmlab.config import ModelConfig, net_config
from scmlab.nets import build_net, count_params
from scmlab.objectives import DiffusionLoss, SCMLoss
from scmlab.tune import flops

PRESETS = [(arch, size, *data) for arch, sizes in flops.NATIVE_DATA.items() for size, data in sizes.items()]


@pytest.mark.parametrize("arch,size,data_shape,num_classes", PRESETS)
def test_counted_forward_flops_equal_the_analytic_count(arch, size, data_shape, num_classes):
    cfg = ModelConfig(arch=arch, size=size)
    counted = flops.forward_flops(cfg, data_shape, num_classes)
    assert counted > 0
    assert abs(flops.analytic_forward_flops(cfg, data_shape) / counted - 1) < 0.01


@pytest.mark.parametrize("arch,size,data_shape", [("mlp", "small", (5,)), ("unet", "ci", (3, 28, 28)),
                                                  ("dit", "ci", (3, 16, 24))])
def test_analytic_count_follows_the_options_and_the_resolution(arch, size, data_shape):
    """Off the native data, and with the guidance-scale embedding on, the two counts still agree."""
    cfg = ModelConfig(arch=arch, size=size, guidance_input=True)
    counted = flops.forward_flops(cfg, data_shape, num_classes=4)
    assert counted > flops.forward_flops(ModelConfig(arch=arch, size=size), data_shape)
    assert abs(flops.analytic_forward_flops(cfg, data_shape) / counted - 1) < 0.01


@pytest.mark.parametrize("arch,size,data_shape", [("mlp", "tiny", (2,)), ("unet", "ci", (1, 8, 8)),
                                                  ("dit", "ci", (1, 8, 8))])
def test_meta_device_count_equals_a_real_forward(arch, size, data_shape):
    net = build_net(net_config(ModelConfig(arch=arch, size=size), 0.5), data_shape=data_shape, num_classes=10)
    # FlopCounterMode counts no FLOP of CPU's fused attention kernel: the math form, as on the meta device.
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        net(torch.randn(3, *data_shape), torch.rand(3), torch.tensor([0, 4, 9]), return_logvar=True)
    assert counter.get_total_flops() == 3 * flops.forward_flops(ModelConfig(arch=arch, size=size), data_shape, 10)


def test_parameter_counts_equal_count_params():
    table = flops.preset_table()
    for row in table:
        cfg = net_config(ModelConfig(arch=row["arch"], size=row["size"]), 0.5)
        assert row["params"] == count_params(cfg, data_shape=row["data_shape"], num_classes=row["num_classes"])
    by_size = {row["size"]: row for row in table if row["arch"] == "unet"}
    assert by_size["ci"]["params"] < by_size["small"]["params"] < by_size["cifar10"]["params"] < by_size["S"]["params"]
    assert by_size["S"]["forward_flops"] < by_size["XL"]["forward_flops"] < by_size["XXL"]["forward_flops"]


def test_training_flops_follow_the_documented_accounting():
    cfg, shape = ModelConfig(arch="unet", size="ci"), (1, 8, 8)
    F = flops.forward_flops(cfg, shape, 10)
    per_sample = {kind: flops.train_flops_per_sample(cfg, kind, shape, 10) for kind in flops.OBJECTIVES}
    assert per_sample["diffusion"] == 3 * F  # forward + backward
    assert per_sample["sct"] / per_sample["diffusion"] == pytest.approx(4 / 3)  # DESIGN section 3's fused ideal
    assert per_sample["scd"] == 5 * F  # + one teacher forward
    assert flops.train_flops_per_sample(cfg, "scd", shape, 10, cfg_guidance=True) == 6 * F
    assert flops.train_flops_per_sample(cfg, "sct", shape, 10, jvp="autograd") == 5 * F  # a separate JVP pass
    assert flops.train_flops_per_sample(cfg, "sct", shape, 10, jvp="fd") == 6 * F
    small = ModelConfig(arch="unet", size="small")
    assert flops.train_flops_per_sample(cfg, "scd", shape, 10, teacher_cfg=small) == \
        4 * F + flops.forward_flops(small, shape, 10)
    assert flops.trial_flops(cfg, "sct", shape, 10, steps=7, batch_size=32) == 7 * 32 * per_sample["sct"]
    with pytest.raises(ValueError, match="objective kind"):
        flops.train_flops_per_sample(cfg, "ect", shape, 10)


def _executed(loss_fn, net, x0, labels):
    with FlopCounterMode(display=False) as counter:
        loss, _ = loss_fn(net, x0, labels, step=0)
        loss.mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("kind,jvp,guidance", [("diffusion", None, 1.0), ("sct", "fused", 1.0),
                                               ("sct", "autograd", 1.0), ("sct", "fd", 1.0), ("scd", "fused", 2.0),
                                               ("scd", "autograd", 2.0)])
def test_accounting_against_the_flops_a_real_step_executes(kind, jvp, guidance):
    """A real step of each objective runs what the accounting says, except that PyTorch's forward-mode AD adds
    exactly one forward (its product with the weights' zero tangent; see the flops module docstring)."""
    torch.manual_seed(0)
    cfg, shape, batch = ModelConfig(arch="unet", size="ci"), (1, 8, 8), 4
    net = build_net(net_config(cfg, 0.5), data_shape=shape, num_classes=10)
    x0, labels = torch.rand(batch, *shape) * 2 - 1, torch.arange(batch)
    if kind == "diffusion":
        loss_fn = DiffusionLoss()
    else:
        teacher = build_net(net_config(cfg, 0.5), data_shape=shape, num_classes=10).eval() if kind == "scd" else None
        loss_fn = SCMLoss(kind, jvp=jvp, teacher=teacher, guidance_scale=guidance)
    executed = _executed(loss_fn, net, x0, labels)
    F = flops.forward_flops(cfg, shape, 10)
    accounted = batch * flops.train_flops_per_sample(cfg, kind, shape, 10, cfg_guidance=guidance != 1.0,
                                                     jvp=jvp or "fused")
    extra = batch * F if jvp == "autograd" else 0
    # 1%: the backward skips the input gradient of the first layer, and the JVP skips the w_phi head.
    assert executed == pytest.approx(accounted + extra, rel=0.01)
