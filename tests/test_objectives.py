"""The diffusion and sCT / sCD objectives against exact references (DESIGN.md section 2).

Exact references: the closed-form Gaussian models of tests/gaussian.py, torch.func.jvp in fp64 and central finite
differences along the trajectory x_t(t) = cos t x0 + sin t z.
"""

import socket

import pytest
import torch
import torch.distributed as dist

from gaussian import ConditionalTeacherNet, ConsistencyNet, GaussianMixture, TeacherNet
from scmlab import jvp, trigflow
from scmlab.jvp import network_jvp
from scmlab.nets import build_net
from scmlab.objectives import DiffusionLoss, SCMLoss

SD = 0.5
DATA = GaussianMixture([[0.3, -0.2, 0.1]], [[0.2, 0.6, 0.45]])


def _batch(n, seed=0, dims=3):
    g = torch.Generator().manual_seed(seed)
    x0 = DATA.sample(n, generator=g) if dims == 3 else torch.randn(n, dims, generator=g, dtype=torch.float64) * SD
    z = torch.randn(x0.shape, generator=g, dtype=torch.float64) * SD
    t = torch.rand(n, generator=g, dtype=torch.float64) * 1.45 + 0.05
    return x0, z, t


def _exact_scd(**kw):
    opts = dict(kind="scd", sigma_d=SD, tangent_norm="none", warmup_steps=0, adaptive_weight=False,
                teacher=TeacherNet(DATA))
    return SCMLoss(**{**opts, **kw})


class Wrapped(torch.nn.Module):
    """Stands for a DDP / compile wrapper: the objective must run the JVP on `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kw):
        return self.module(*args, **kw)


def mlp(**kw):
    """The tiny MLP in fp64 with every weight perturbed: zero-initialised output layers would make F and its
    derivatives vanish and the checks below trivially true."""
    cfg = dict(arch="mlp", size="tiny", dropout=None, time_embedding="positional", time_max_freq=4.0,
               double_norm=True, label_dropout=0.0, guidance_input=False, dropout_max_res=None, sigma_d=SD)
    cfg.update(kw)
    net = build_net(type("ModelConfig", (), cfg)(), data_shape=(3,)).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


# --- the tangent -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make_net", [lambda: ConsistencyNet(DATA, mu_shift=0.3),
                                      lambda: mlp(), lambda: mlp(double_norm=False)])
def test_jvp_is_the_total_time_derivative_along_the_trajectory(make_net):
    """cos t sin t dF/dt from one JVP == cos t sin t d/dt F(x_t(t) / sigma_d, t) by central differences (fp64)."""
    net = make_net().eval()
    x0, z, t = _batch(16, dims=3)
    cs = torch.cos(t) * torch.sin(t)
    dxt_dt = trigflow.velocity(x0, z, t)
    _, jvp_out = network_jvp(lambda x, tt: net(x, tt), (trigflow.noisy(x0, z, t) / SD, t),
                             (cs[:, None] * dxt_dt / SD, cs))
    h = 1e-5
    along = lambda s: net(trigflow.noisy(x0, z, t + s) / SD, t + s)
    fd = cs[:, None] * (along(h) - along(-h)) / (2 * h)
    assert jvp_out.abs().max() > 1e-3  # a real derivative, not a vanishing one
    torch.testing.assert_close(jvp_out, fd, rtol=1e-6, atol=1e-8)
    _, fd_mode = network_jvp(lambda x, tt: net(x, tt), (trigflow.noisy(x0, z, t) / SD, t),
                             (cs[:, None] * dxt_dt / SD, cs), mode="fd", eps=1e-4)
    torch.testing.assert_close(fd_mode, jvp_out, rtol=1e-6, atol=1e-7)


def test_rescaled_tangent_equals_direct_form():
    """Algorithm 1's g with the cos t sin t scaling inside the JVP == the direct formula with an unscaled JVP."""
    net = ConsistencyNet(DATA, mu_shift=0.3)
    x0, z, t = _batch(64)
    obj = SCMLoss("sct", sigma_d=SD, tangent_norm="none", warmup_steps=4)
    _, g, _ = obj.tangent(net, x0, z, t, None, step=1)
    x_t, dxt_dt = trigflow.noisy(x0, z, t), trigflow.velocity(x0, z, t)
    F, dF_dt = torch.func.jvp(lambda x, tt: net(x, tt), (x_t / SD, t), (dxt_dt / SD, torch.ones_like(t)))
    c, s, r = torch.cos(t)[:, None], torch.sin(t)[:, None], 0.25
    direct = -c ** 2 * (SD * F - dxt_dt) - r * c * s * (x_t + SD * dF_dt)
    torch.testing.assert_close(g, direct, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["fused", "fd"])
def test_jvp_modes_give_the_same_loss(mode):
    net = mlp()
    x0, z, t = _batch(32)
    ref = SCMLoss("sct", sigma_d=SD, jvp="autograd", warmup_steps=0)(net, x0, step=0, t=t, z=z)[0].mean()
    got = SCMLoss("sct", sigma_d=SD, jvp=mode, fd_eps=1e-4, warmup_steps=0)(net, x0, step=0, t=t, z=z)[0].mean()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)


def image_net(arch, dropout=0.3):
    """UNet 'ci' (attention in its bottleneck) or DiT 'ci' in fp64, class-conditional, every weight perturbed."""
    cfg = dict(arch=arch, size="ci", dropout=dropout, time_embedding="positional", time_max_freq=4.0,
               double_norm=True, label_dropout=0.2, guidance_input=False, dropout_max_res=None, sigma_d=SD)
    net = build_net(type("ModelConfig", (), cfg)(), data_shape=(1, 8, 8), num_classes=4).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


@pytest.mark.parametrize("arch", ["mlp", "unet", "dit"])
@pytest.mark.parametrize("kind", ["sct", "scd"])
def test_fused_step_equals_the_autograd_step_in_fp64(arch, kind):
    """One forward carrying the tangent gives the loss and every gradient of the separate-JVP step (with dropout
    and label dropout on: the same masks), sCT and sCD."""
    torch.manual_seed(0)
    make = (lambda: mlp(dropout=0.3)) if arch == "mlp" else (lambda: image_net(arch))
    nets = {mode: make().train() for mode in ("autograd", "fused")}
    nets["fused"].load_state_dict(nets["autograd"].state_dict())
    g = torch.Generator().manual_seed(1)
    x0 = _batch(8)[0] if arch == "mlp" else torch.rand(8, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    labels = None if arch == "mlp" else torch.arange(8) % 4
    teacher = image_net(arch, dropout=0.0).eval() if kind == "scd" and arch != "mlp" else \
        (mlp().eval() if kind == "scd" else None)
    results = {}
    for mode, net in nets.items():
        obj = SCMLoss(kind, sigma_d=SD, jvp=mode, warmup_steps=4, teacher=teacher)
        torch.manual_seed(3)
        loss, _ = obj(net, x0, labels, step=1, generator=torch.Generator().manual_seed(2))
        loss.mean().backward()
        results[mode] = loss.detach(), [p.grad for p in net.parameters()]
    (ref_loss, ref_grads), (loss, grads) = results["autograd"], results["fused"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-12)
    assert sum(gr.abs().sum() for gr in ref_grads) > 1e-3
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_fused_step_has_F_minus_F_minus_exactly_zero_under_bf16(arch, monkeypatch):
    """Under bf16 autocast, F_theta - F_theta^- is exactly zero in the fused step: the residual is exactly -g (the
    unweighted loss is exactly mean(g^2)). A separate JVP pass evaluates F_theta^- with the math attention, which
    in bf16 rounds differently from the training forward's fused kernel (DESIGN.md section 8): shown here on the
    plain forward with the attention that a JVP pass takes (torch.func.jvp does not run under CPU autocast)."""
    torch.manual_seed(0)
    net = image_net(arch, dropout=0.0).float().eval()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(16, 1, 8, 8, generator=g) * 2 - 1
    z = torch.randn(x0.shape, generator=g) * SD
    t = torch.rand(16, generator=g) * 1.4 + 0.1
    obj = SCMLoss("sct", sigma_d=SD, jvp="fused", tangent_norm="none", warmup_steps=0, adaptive_weight=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = obj(net, x0, step=0, t=t, z=z)
        _, g_target, _ = obj.tangent(net, x0, z, t, None, step=0)
        assert g_target.abs().max() > 1e-2
        assert torch.equal(loss, g_target.square().flatten(1).mean(1))
        x = trigflow.noisy(x0, z, t) / SD
        F = net(x, t)
        monkeypatch.setattr(jvp, "_has_forward_tangent", lambda q: True)
        assert not torch.equal(net(x, t), F)


# --- exactness on Gaussian data ----------------------------------------------------------------------------------

@pytest.mark.parametrize("tangent_norm", ["none", "l2"])
def test_scd_tangent_and_gradient_vanish_at_the_exact_model(tangent_norm):
    student = ConsistencyNet(DATA)
    x0, z, t = _batch(512)
    obj = _exact_scd(tangent_norm=tangent_norm)
    _, g, _ = obj.tangent(student, x0, z, t, None, step=0)
    assert g.abs().max().item() < 1e-12
    loss, _ = obj(student, x0, step=0, t=t, z=z)
    loss.mean().backward()
    for p in student.parameters():
        assert p.grad.abs().max().item() < 1e-12


def test_scd_gradient_does_not_vanish_away_from_the_exact_model():
    """The check above could pass for a loss that ignores the model; a wrong mean must give a real gradient."""
    student = ConsistencyNet(DATA, mu_shift=0.2)
    x0, z, t = _batch(512)
    _exact_scd()(student, x0, step=0, t=t, z=z)[0].mean().backward()
    assert student.mu.grad.abs().min().item() > 1e-3


def _distance_to_the_exact_model(net: ConsistencyNet) -> float:
    return torch.cat([net.mu - DATA.mu[0], net.log_s - DATA.s[0].log()]).norm().item()


def test_one_step_keeps_the_exact_model_and_moves_a_perturbed_one_toward_it():
    """g (Algorithm 1) vanishes on the exact consistency model only with its sign and its cos(t) sin(t) factor as
    written, and only then does the loss pull a wrong model toward the exact one. One SGD step of the sCD loss (exact
    teacher, the paper's l2 tangent normalization, r = 1) must leave the exact Gaussian model where it is, and bring
    a perturbed one closer: a flipped sign pushes it away, a dropped cos t sin t moves the exact one."""
    x0, z, t = _batch(4096)
    moved = {}
    for offset in (0.0, 0.1):
        net = ConsistencyNet(DATA)
        with torch.no_grad():
            net.mu.add_(offset)
            net.log_s.add_(offset * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
        before = _distance_to_the_exact_model(net)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
        _exact_scd(tangent_norm="l2")(net, x0, step=0, t=t, z=z)[0].mean().backward()
        optimizer.step()
        moved[offset] = (before, _distance_to_the_exact_model(net))
    assert moved[0.0][1] < 1e-12, moved  # measured 0 (gradient ~1e-17)
    assert moved[0.1][1] < moved[0.1][0] - 0.005, moved  # measured 0.245 -> 0.234


def test_sct_gradient_is_unbiased_at_the_exact_model():
    """sCT's tangent is an unbiased estimate of sCD's, so its expected gradient at the exact model is zero:
    the batch-mean gradient shrinks like 1/sqrt(N), far below the gradient of a slightly wrong model."""
    x0, z, t = _batch(200_000, seed=3)
    obj = SCMLoss("sct", sigma_d=SD, tangent_norm="none", warmup_steps=0, adaptive_weight=False)
    grads = []
    for shift in (0.0, 0.05):
        student = ConsistencyNet(DATA, mu_shift=shift)
        obj(student, x0, step=0, t=t, z=z)[0].mean().backward()
        grads.append(student.mu.grad.norm().item())
    assert grads[0] < 0.05 * grads[1], grads


def test_diffusion_loss_is_minimised_by_the_exact_teacher():
    x0, z, t = _batch(100_000, seed=4)
    loss = DiffusionLoss(sigma_d=SD, adaptive_weight=False)
    exact = loss(TeacherNet(DATA), x0, t=t, z=z)[0].mean().item()
    shifted = GaussianMixture(DATA.mu + 0.1, DATA.s)
    wrong = loss(TeacherNet(shifted), x0, t=t, z=z)[0].mean().item()
    assert exact < wrong - 1e-3
    # The definition: mean over dimensions of (F - v_t / sigma_d)^2.
    F = TeacherNet(DATA)(trigflow.noisy(x0, z, t) / SD, t)
    direct = (F - trigflow.velocity(x0, z, t) / SD).square().mean(1)
    torch.testing.assert_close(loss(TeacherNet(DATA), x0, t=t, z=z)[0], direct)


# --- guided distillation -----------------------------------------------------------------------------------------

GUIDED = GaussianMixture([[-0.35, 0.1], [0.35, -0.1]], [[0.3, 0.35], [0.3, 0.35]])


def test_teacher_velocity_applies_each_samples_guidance_scale():
    """F_u + w_i (F_c - F_u) with w_i per sample == the teacher guided at the scalar scale w_i, sample by sample."""
    teacher = ConditionalTeacherNet(GUIDED)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(6, 2, generator=g, dtype=torch.float64) * SD
    t = torch.rand(6, generator=g, dtype=torch.float64) + 0.2
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    w = torch.tensor([1.0, 1.0, 1.5, 1.5, 2.0, 2.0], dtype=torch.float64)
    per_sample = _exact_scd(teacher=teacher).teacher_velocity(x_t, t, labels, w)
    for i, w_i in enumerate(w.tolist()):
        one = slice(i, i + 1)
        fixed = _exact_scd(teacher=teacher, guidance_scale=w_i).teacher_velocity(x_t[one], t[one], labels[one])
        torch.testing.assert_close(per_sample[one], fixed)
    F_c = teacher(x_t / SD, t, labels)
    F_u = teacher(x_t / SD, t)
    torch.testing.assert_close(per_sample, SD * (F_u + w[:, None] * (F_c - F_u)))
    assert not torch.allclose(per_sample[4:], SD * F_c[4:])  # guidance changes the velocity here


class RecordsGuidance(torch.nn.Module):
    """A tiny class- and guidance-conditioned F that records the guidance inputs it is called with."""

    num_classes = 2

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
        self.seen = []

    def forward(self, x, t, class_labels=None, guidance=None, return_logvar=False, tangent=None):
        self.seen.append(guidance)
        F = self.a * x * guidance[:, None] + t[:, None]
        out = (F, torch.zeros_like(t)) if return_logvar else (F,)
        if tangent is not None:  # the fused step's tangent: dF = a s dx + dt
            dx, dt = tangent
            out += ((self.a * dx * guidance[:, None] + dt[:, None]).detach(),)
        return out if len(out) > 1 else F


def test_scd_draws_one_guidance_scale_per_sample_for_teacher_and_student():
    """guidance_max: s ~ U[1, guidance_max] per sample, the same s as the student's input (JVP and training forward)
    and as the teacher's scale: the loss equals the loss with those scales given explicitly, and differs from the
    loss at s = 1."""
    x0, z, t = _batch(512, dims=2)
    labels = torch.arange(512) % 2
    obj = _exact_scd(teacher=ConditionalTeacherNet(GUIDED), guidance_max=2.0)
    net = RecordsGuidance()
    drawn = obj(net, x0, labels, step=0, t=t, z=z, generator=torch.Generator().manual_seed(4))[0]
    s = net.seen[0]
    assert s.shape == (512,) and 1 <= s.min() and s.max() <= 2 and s.std() > 0.2  # uniform on [1, 2]: std 0.29
    assert all(torch.equal(seen, s) for seen in net.seen)  # the JVP and the training forward saw the same s
    torch.testing.assert_close(drawn, obj(net, x0, labels, step=0, t=t, z=z, guidance=s)[0])
    assert not torch.allclose(drawn, obj(net, x0, labels, step=0, t=t, z=z, guidance=torch.ones_like(s))[0])


# --- stabilizers ---------------------------------------------------------------------------------------------------

def test_tangent_normalizations():
    g = torch.randn(8, 3, 4, 4, dtype=torch.float64) * 10
    obj = lambda kind: SCMLoss("sct", sigma_d=SD, tangent_norm=kind, tangent_c=0.1)
    l2 = obj("l2").normalize(g)
    torch.testing.assert_close(l2.flatten(1).norm(dim=1), g.flatten(1).norm(dim=1) / (g.flatten(1).norm(dim=1) + 0.1))
    rms = obj("rms").normalize(g)
    g_rms = g.flatten(1).square().mean(1).sqrt()
    torch.testing.assert_close(rms.flatten(1).square().mean(1).sqrt(), g_rms / (g_rms + 0.1))
    clipped = obj("clip").normalize(g)
    assert clipped.abs().max() <= 1 and torch.equal(clipped, g.clamp(-1, 1))
    assert torch.equal(obj("none").normalize(g), g)


def test_tangent_warmup():
    obj = SCMLoss("sct", sigma_d=SD, warmup_steps=100)
    assert [obj.warmup(s) for s in (0, 50, 100, 1000)] == [0.0, 0.5, 1.0, 1.0]
    assert SCMLoss("sct", sigma_d=SD, warmup_steps=0).warmup(0) == 1.0


def test_adaptive_weighting_learns_the_loss_scale():
    """L = exp(w) m - w is minimised at w = -log m: the learned weight tracks the inverse loss scale."""
    m = torch.tensor([0.25, 4.0], dtype=torch.float64)
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    for _ in range(2000):
        opt.zero_grad()
        (torch.exp(w) * m - w).sum().backward()
        opt.step()
    torch.testing.assert_close(w.detach(), -m.log(), rtol=0, atol=1e-3)
    # ...and the objectives use exactly that form with the net's logvar head.
    net = mlp()
    x0, z, t = _batch(16)
    loss, _ = SCMLoss("sct", sigma_d=SD, warmup_steps=0)(net, x0, step=0, t=t, z=z)
    plain, _ = SCMLoss("sct", sigma_d=SD, warmup_steps=0, adaptive_weight=False)(net, x0, step=0, t=t, z=z)
    _, logvar = net(trigflow.noisy(x0, z, t) / SD, t, return_logvar=True)
    torch.testing.assert_close(loss, torch.exp(logvar) * plain - logvar)


def test_training_forward_replays_the_jvp_dropout_masks():
    """With dropout on, F_theta and F_theta^- see the same masks, so the residual is exactly -g."""
    net = mlp(dropout=0.5).train()
    x0, z, t = _batch(64)
    obj = SCMLoss("sct", sigma_d=SD, tangent_norm="none", warmup_steps=0, adaptive_weight=False)
    torch.manual_seed(7)
    loss, _ = obj(net, x0, step=0, t=t, z=z)
    torch.manual_seed(7)
    _, g, _ = obj.tangent(net, x0, z, t, None, step=0)
    torch.testing.assert_close(loss, g.square().mean(1), rtol=1e-10, atol=1e-14)
    # Without replay the masks would differ: two plain forwards under different seeds disagree.
    x = trigflow.noisy(x0, z, t) / SD
    assert not torch.allclose(net(x, t), net(x, t))


def test_jvp_runs_on_the_module_inside_a_wrapper():
    net = mlp()
    x0, z, t = _batch(16)
    obj = SCMLoss("sct", sigma_d=SD, warmup_steps=0)
    torch.testing.assert_close(obj(Wrapped(net), x0, step=0, t=t, z=z)[0], obj(net, x0, step=0, t=t, z=z)[0])


@pytest.mark.parametrize("mode", ["fused", "autograd"])
def test_through_real_ddp_gradients_match_the_bare_module(mode):
    """fused: one call through DDP's forward (its hooks see the training graph, the tangent stays outside it);
    autograd: the JVP on the module inside, the training forward through DDP."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = mlp()
        ddp = torch.nn.parallel.DistributedDataParallel(mlp())
        ddp.module.load_state_dict(net.state_dict())
        x0, z, t = _batch(16)
        obj = SCMLoss("sct", sigma_d=SD, warmup_steps=0, jvp=mode)
        obj(net, x0, step=0, t=t, z=z)[0].mean().backward()
        obj(ddp, x0, step=0, t=t, z=z)[0].mean().backward()
        for a, b in zip(net.parameters(), ddp.module.parameters()):
            torch.testing.assert_close(a.grad, b.grad)
        del ddp  # its reducer holds the process group: free it first (freed after the group, gloo's teardown can hang)
    finally:
        dist.destroy_process_group()


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="objective.tangent_norm"):
        SCMLoss("sct", tangent_norm="l3")
    with pytest.raises(ValueError, match="objective.kind"):
        SCMLoss("ect")
    with pytest.raises(ValueError, match="objective.teacher"):
        SCMLoss("scd")
    with pytest.raises(ValueError, match="jvp"):
        SCMLoss("sct", jvp="magic")
