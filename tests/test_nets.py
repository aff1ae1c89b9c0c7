"""Networks: shapes and the call contract, parameter counts of the presets against the papers, forward-mode AD
against finite differences, conditioning switches, and label dropout. (Their tangents: tests/test_tangent.py.)"""

from types import SimpleNamespace

import pytest
import torch

from scmlab.nets import PRESETS, build_net, count_params
from scmlab.nets.dit import Attention as DiTAttention
from scmlab.nets.layers import AdaptiveNorm, FourierEmbedding, PositionalEmbedding
from scmlab.nets.unet import SelfAttention


def model_cfg(arch, size, **overrides):
    fields = dict(arch=arch, size=size, dropout=None, time_embedding="positional", time_max_freq=4.0,
                  double_norm=True, label_dropout=0.1, guidance_input=False, dropout_max_res=None, sigma_d=0.5)
    return SimpleNamespace(**{**fields, **overrides})


def randomize_(net, seed=0, std=0.05):
    """Perturb every parameter: the zero-initialized output and residual layers would otherwise make F == 0 and
    hide every path behind them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return net


def inputs(data_shape, batch=3, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *data_shape, generator=gen).to(dtype)
    t = (torch.rand(batch, generator=gen) * 1.5 + 0.02).to(dtype)
    return x, t


def test_time_embeddings_follow_their_definitions():
    t = torch.tensor([0.0, 0.7, 1.5], dtype=torch.float64)
    pos, _ = PositionalEmbedding(8, max_freq=4.0)(t)  # frequencies 4, 0.4, 0.04, 0.004 rad per unit t
    torch.testing.assert_close(pos[:, 0], torch.cos(4.0 * t))
    torch.testing.assert_close(pos[:, 7], torch.sin(0.004 * t))
    fourier = FourierEmbedding(8, sigma_d=0.5).double()
    c_noise = torch.log(0.5 * torch.tan(t[1:])) / 4  # EDM's c_noise(sigma) with sigma = sigma_d tan t
    torch.testing.assert_close(fourier(t[1:])[0][:, 0], torch.cos(2 * torch.pi * fourier.freqs[0] * c_noise))
    assert torch.isfinite(fourier(t)[0]).all()  # t = 0 (sigma = 0) is floored, not log(0)


@pytest.mark.parametrize("image", [True, False])
def test_adaptive_norm_equations(image):
    """Double: norm(x) * pnorm(s) + pnorm(b); plain AdaGN: norm(x) * (1 + s) + b (Lu & Song 2024, sec. 4.1)."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4) if image else torch.randn(2, 8)
    emb = torch.randn(2, 16)
    normalized = torch.nn.functional.group_norm(x, 2) if image else torch.nn.functional.layer_norm(x, (8,))

    def pnorm(v):
        return v / v.square().mean(1, keepdim=True).sqrt()

    def spatial(v):
        return v[:, :, None, None] if image else v

    for double_norm in (True, False):
        layer = AdaptiveNorm(8, 16, double_norm=double_norm, image=image)
        s, b = layer.affine(emb).chunk(2, dim=1)
        if double_norm:
            expected = normalized * spatial(pnorm(s)) + spatial(pnorm(b))
        else:
            expected = normalized * spatial(1 + s) + spatial(b)
        y, dy = layer(x, emb)
        torch.testing.assert_close(y, expected)
        assert dy is None  # a plain forward carries no tangent


CASES = [("mlp", "tiny", (3,)), ("unet", "ci", (1, 8, 8)), ("dit", "ci", (1, 8, 8)), ("unet", "ci", (3, 28, 28)),
         ("dit", "ci", (3, 28, 20))]


@pytest.mark.parametrize(
    "arch,size,data_shape,num_classes,guidance_input",
    [(*case, 0, False) for case in CASES[:3]] + [(*case, 4, True) for case in CASES],
)
def test_shapes_and_call_contract(arch, size, data_shape, num_classes, guidance_input):
    net = build_net(model_cfg(arch, size, guidance_input=guidance_input), data_shape=data_shape,
                    num_classes=num_classes)
    assert net.data_shape == data_shape and net.num_classes == num_classes
    x, t = inputs(data_shape)
    labels = torch.tensor([0, 3, 1]) if num_classes else None
    guidance = torch.tensor([1.0, 2.0, 4.5]) if guidance_input else None
    F = net(x, t, labels, guidance)
    assert F.shape == x.shape and F.dtype == x.dtype
    F2, logvar = net(x, t, labels, guidance, return_logvar=True)
    assert torch.equal(F, F2)
    assert logvar.shape == (3,)
    assert torch.all(logvar == 0)  # w_phi(t) starts at 0: unit weight
    assert torch.all(F == 0)  # zero-initialized output layer: F starts at 0
    F3, logvar3, dF = net(x, t, labels, guidance, return_logvar=True, tangent=(torch.ones_like(x), torch.ones_like(t)))
    assert torch.equal(F3, F) and torch.equal(logvar3, logvar) and dF.shape == x.shape
    assert len(net(x, t, labels, guidance, tangent=(x, t))) == 2  # (F, dF)


@pytest.mark.parametrize("arch,size,data_shape", CASES[:3])
def test_conditioning_inputs_change_the_output_and_are_checked(arch, size, data_shape):
    net = randomize_(build_net(model_cfg(arch, size, guidance_input=True), data_shape=data_shape, num_classes=4))
    net.eval()
    x, t = inputs(data_shape)
    g = torch.full((3,), 2.0)
    assert not torch.allclose(net(x, t, torch.tensor([0, 1, 2]), g), net(x, t, torch.tensor([3, 3, 3]), g))
    assert not torch.allclose(net(x, t, None, g), net(x, t, None, g + 1))
    assert torch.allclose(net(x, t, None, torch.tensor(2.0)), net(x, t, None, g))  # a scalar scale broadcasts
    with pytest.raises(ValueError, match="guidance"):
        net(x, t)
    unconditional = build_net(model_cfg(arch, size), data_shape=data_shape)
    with pytest.raises(ValueError, match="class_labels"):
        unconditional(x, t, torch.tensor([0, 1, 2]))


# Published parameter counts (millions); every preset must land within 5% of them.
# cifar10: DDPM++ in EDM (Karras et al. 2022, 55.7M). S..XXL: EDM2 (Karras et al. 2024), quoted by the sCM paper.
# The adaptive double norm adds a shift projection that EDM2 lacks (E x C weights per block, +4.0-4.2%); without
# it the counts must agree within 1% (they are 0.8% under: see the preset notes in nets/unet.py).
PAPER_COUNTS = [
    ("cifar10", (3, 32, 32), 0, 55.7),
    ("S", (3, 64, 64), 1000, 280.0),
    ("M", (3, 64, 64), 1000, 498.0),
    ("L", (3, 64, 64), 1000, 778.0),
    ("XL", (3, 64, 64), 1000, 1119.0),
    ("XXL", (4, 64, 64), 1000, 1523.0),
]


@pytest.mark.parametrize("size,data_shape,num_classes,paper_millions", PAPER_COUNTS)
def test_preset_parameter_counts_match_the_papers(size, data_shape, num_classes, paper_millions):
    cfg = model_cfg("unet", size)
    count = count_params(cfg, data_shape=data_shape, num_classes=num_classes) / 1e6
    assert abs(count / paper_millions - 1) < 0.05, count
    if size == "cifar10":
        return
    net = build_net(cfg, data_shape=data_shape, num_classes=num_classes, device="meta")
    shift = sum(m.affine.weight.numel() // 2 + m.affine.bias.numel() // 2
                for m in net.modules() if isinstance(m, AdaptiveNorm))
    assert abs((count - shift / 1e6) / paper_millions - 1) < 0.01, (count, shift)


# DiT (Peebles & Xie 2023, Table 1) at patch 2 on ImageNet 256 latents (4x32x32, 1000 classes), millions. Ours lack
# adaLN-Zero's two gates per block (2 x (C^2 + C) weights): 10-11% under; with them counted, within 0.5%.
DIT_PAPER_COUNTS = [("S", 33.0), ("B", 130.0), ("L", 458.0), ("XL", 675.0)]


@pytest.mark.parametrize("size,paper_millions", DIT_PAPER_COUNTS)
def test_dit_parameter_counts_match_the_paper(size, paper_millions):
    cfg = model_cfg("dit", size)
    count = count_params(cfg, data_shape=(4, 32, 32), num_classes=1000) / 1e6
    assert 0.87 < count / paper_millions < 0.91, count
    net = build_net(cfg, data_shape=(4, 32, 32), num_classes=1000, device="meta")
    C = net.patchify.out_channels
    gates = len(net.blocks) * 2 * (C * C + C)
    assert abs((count + gates / 1e6) / paper_millions - 1) < 0.005, (count, gates)


def test_small_presets_are_small():
    assert 10e3 <= count_params(model_cfg("mlp", "tiny"), data_shape=(2,)) <= 20e3
    assert 1e5 <= count_params(model_cfg("unet", "ci"), data_shape=(1, 28, 28), num_classes=10) <= 1e6
    assert 1e5 <= count_params(model_cfg("dit", "ci"), data_shape=(1, 8, 8), num_classes=10) <= 1e6
    assert set(PRESETS) == {"mlp", "unet", "dit"} and {"ci", "cifar10", "XXL"} <= set(PRESETS["unet"])
    assert {"ci", "S", "B", "L", "XL"} <= set(PRESETS["dit"])


@pytest.mark.parametrize("arch,attention", [("unet", SelfAttention), ("dit", DiTAttention)])
def test_jvp_matches_central_differences_in_fp64(arch, attention):
    """torch.func.jvp through the whole UNet / DiT (attention included) equals central finite differences, for a
    tangent along x and one along t (any other is their linear combination); its primal, computed with the math
    attention, equals the plain forward, computed with SDPA."""
    torch.manual_seed(0)
    net = build_net(model_cfg(arch, "ci", guidance_input=True), data_shape=(1, 8, 8), num_classes=3)
    net = randomize_(net.double()).eval()
    assert any(isinstance(m, attention) for m in net.modules())
    x, t = inputs((1, 8, 8), batch=2, dtype=torch.float64)
    labels, guidance = torch.tensor([0, 2]), torch.tensor([1.5, 3.0], dtype=torch.float64)

    def F(x, t):
        return net(x, t, labels, guidance)

    gen = torch.Generator().manual_seed(1)
    dx = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    dt = torch.randn(t.shape, generator=gen, dtype=torch.float64)
    eps = 1e-5  # central differences: O(eps^2) truncation, O(1e-16 / eps) rounding in fp64
    with torch.no_grad():
        for tangent in [(dx, torch.zeros_like(t)), (torch.zeros_like(x), dt)]:
            primal, jvp = torch.func.jvp(F, (x, t), tangent)
            fd = (F(x + eps * tangent[0], t + eps * tangent[1]) - F(x - eps * tangent[0], t - eps * tangent[1]))
            fd = fd / (2 * eps)
            assert jvp.abs().max() > 1e-3  # the tangent is not trivially zero
            torch.testing.assert_close(jvp, fd, rtol=1e-6, atol=1e-8)
            _, fused = net(x, t, labels, guidance, tangent=tangent)  # the fused step's tangent, too
            torch.testing.assert_close(fused, fd, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(primal, F(x, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch,size,data_shape", CASES[:3])
def test_double_norm_and_time_embeddings_are_finite_and_differ(arch, size, data_shape):
    x, t = inputs(data_shape)
    t = torch.cat([t, torch.tensor([0.0, torch.pi / 2])])  # the ends of the TrigFlow interval
    x = torch.cat([x, x[:2]])
    outputs = []
    for double_norm, embedding in [(True, "positional"), (False, "positional"), (True, "fourier_logsigma")]:
        torch.manual_seed(0)
        cfg = model_cfg(arch, size, double_norm=double_norm, time_embedding=embedding)
        net = randomize_(build_net(cfg, data_shape=data_shape)).eval()
        F, logvar = net(x, t, return_logvar=True)
        assert torch.isfinite(F).all() and torch.isfinite(logvar).all()
        outputs.append(F)
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-4)
    assert not torch.allclose(outputs[0], outputs[2], atol=1e-4)


def test_label_dropout_only_in_training_and_eval_is_deterministic():
    def net_with(dropout):
        cfg = model_cfg("unet", "ci", label_dropout=0.5, dropout=dropout)
        return build_net(cfg, data_shape=(1, 8, 8), num_classes=4)

    net = randomize_(net_with(0.3)).eval()
    x, t = inputs((1, 8, 8), batch=32)
    labels = torch.arange(32) % 4
    with torch.no_grad():
        cond, null = net(x, t, labels), net(x, t)
        assert torch.equal(cond, net(x, t, labels))  # eval: deterministic (neither kind of dropout)
        assert not torch.allclose(cond, null, atol=1e-5)

        # Train mode, same weights, no activation dropout: each sample gets its conditional or its null output.
        train_net = net_with(0.0)
        train_net.load_state_dict(net.state_dict())
        torch.manual_seed(0)
        mixed = train_net.train()(x, t, labels)
    is_cond = torch.isclose(mixed, cond, atol=1e-5).flatten(1).all(1)
    is_null = torch.isclose(mixed, null, atol=1e-5).flatten(1).all(1)
    assert torch.all(is_cond ^ is_null)
    assert 4 <= int(is_null.sum()) <= 28  # about half of the 32 labels dropped


def test_dropout_is_active_in_training_only():
    net = randomize_(build_net(model_cfg("mlp", "tiny", dropout=0.5), data_shape=(3,)))
    x, t = inputs((3,))
    net.train()
    assert not torch.equal(net(x, t), net(x, t))
    net.eval()
    assert torch.equal(net(x, t), net(x, t))


def test_dropout_only_at_low_resolutions():
    """dropout_max_res: dropout in the blocks at resolution <= it, none above (the paper's ImageNet students: 16).
    UNet 'ci' on 8x8: encoder 8, 4 (down), 4; decoder 4, 4 (bottleneck), 4, 4, 8 (up), 8, 8."""
    def dropouts(**kw):
        net = build_net(model_cfg("unet", "ci", dropout=0.5, **kw), data_shape=(1, 8, 8), device="meta")
        return [block.dropout for block in [*net.enc, *net.dec]]

    assert dropouts(dropout_max_res=4) == [0.0, 0.5, 0.5] + [0.5] * 4 + [0.0] * 3
    assert dropouts(dropout_max_res=8) == dropouts() == [0.5] * 10
    net = randomize_(build_net(model_cfg("unet", "ci", dropout=0.5, dropout_max_res=2), data_shape=(1, 8, 8)))
    x, t = inputs((1, 8, 8))
    assert torch.equal(net.train()(x, t), net(x, t))  # no block at resolution <= 2: no dropout at all


def test_build_net_rejects_unknown_names_and_applies_dropout_override():
    with pytest.raises(ValueError, match="arch"):
        build_net(model_cfg("vit", "ci"), data_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="patch size"):
        build_net(model_cfg("dit", "ci"), data_shape=(1, 9, 8))
    with pytest.raises(ValueError, match="ci, small"):
        build_net(model_cfg("unet", "huge"), data_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        build_net(model_cfg("unet", "small"), data_shape=(1, 10, 10))
    with pytest.raises(ValueError, match="time_embedding"):
        build_net(model_cfg("mlp", "tiny", time_embedding="learned"), data_shape=(2,))
    default = build_net(model_cfg("unet", "cifar10"), data_shape=(3, 32, 32), device="meta")
    override = build_net(model_cfg("unet", "cifar10", dropout=0.05), data_shape=(3, 32, 32), device="meta")
    assert default.enc[0].dropout == PRESETS["unet"]["cifar10"]["dropout"] == 0.2
    assert override.enc[0].dropout == 0.05
