"""UNet for images in the DDPM++ / EDM2 layout, with the sCM paper's changes (Lu & Song 2024, sec. 4.1):
positional time embedding of c_noise(t) = t, adaptive double normalization in every residual block, dropout
(optionally only in the blocks at resolution <= dropout_max_res), and the learned weighting head w_phi(t).
Attention goes through ``scmlab.tangent.attention`` (a tangent for the fused sCM step; the explicit math form under
torch.func.jvp).

Shape legend: B batch, C channels, H x W resolution, E conditioning-embedding width, heads x d = C in attention,
N = H * W tokens.

Layout (as EDM's SongUNet and EDM2's UNet): an input conv, then per resolution level a downsampling block (levels
after the first) and ``num_blocks`` residual blocks; the decoder mirrors it with ``num_blocks + 1`` blocks per level
that each take one encoder activation by concatenation, two bottleneck blocks (the first with attention) at the
lowest resolution, and an upsampling block per level. Attention also runs in every non-resampling encoder and
decoder block at ``attn_resolutions``.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as nnF

from scmlab import tangent as T
from scmlab.nets.layers import AdaptiveNorm, Conditioning, LogVarHead, group_count, outputs

# Size presets: constructor arguments by name; ``dropout`` is the default when the model config leaves it None.
#  ci, small: debug / CPU-demo sizes (8x8 or 28x28 inputs).
#  cifar10: DDPM++ as EDM configures it for CIFAR-10 (Karras et al. 2022; 55.7M parameters), dropout 0.20 as sCT
#    on CIFAR-10 (Lu & Song 2024). Here 56.3M: attention in every decoder block at 16x16 (+1.0M, EDM2's rule;
#    DDPM++ has it in one), identity skips around resampling (-0.4M), a narrower embedding MLP (-0.2M).
#  S..XXL: EDM2's ImageNet sizes (Karras et al. 2024; 280/498/778/1119/1523M, the counts the sCM paper quotes),
#    dropout as EDM2. Here +4.0-4.2%: EDM2 modulates by a scale only, while the adaptive double norm also predicts
#    a shift (E x C more weights per block). Without those the counts are 0.8% under EDM2's: our encoder blocks
#    convolve from their input width (DDPM++) instead of after a 1x1 projection to the output width (EDM2).
_EDM2 = dict(channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(16, 8), channels_per_head=64)
UNET_PRESETS = {
    "ci": dict(model_channels=24, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), channels_per_head=24,
               dropout=0.0),
    "small": dict(model_channels=64, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(8,),
                  channels_per_head=64, dropout=0.1),
    "cifar10": dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,),
                    channels_per_head=256, dropout=0.2),
    "S": dict(model_channels=192, dropout=0.0, **_EDM2),
    "M": dict(model_channels=256, dropout=0.1, **_EDM2),
    "L": dict(model_channels=320, dropout=0.1, **_EDM2),
    "XL": dict(model_channels=384, dropout=0.1, **_EDM2),
    "XXL": dict(model_channels=448, dropout=0.1, **_EDM2),
}

SKIP_SCALE = math.sqrt(0.5)  # keeps the variance of (residual + branch) as DDPM++ does


def _residual(x, y):
    return (x + y) * SKIP_SCALE


def _zero_init(layer: nn.Module) -> nn.Module:
    """Residual branches and the output start at zero, so each block starts as its skip path and F as 0."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class SelfAttention(nn.Module):
    """x + proj(attention(q, k, v)) with q, k, v from a 1x1 conv of GroupNorm(x)."""

    def __init__(self, channels: int, channels_per_head: int):
        super().__init__()
        self.num_heads = max(1, channels // channels_per_head)
        self.norm = nn.GroupNorm(group_count(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x, dx=None):
        B, C, H, W = x.shape

        def heads(qkv):  # (B, 3C, H, W) -> (B, 3, heads, d, N) -> q, k, v: (B, heads, N, d) each
            return qkv.reshape(B, 3, self.num_heads, C // self.num_heads, H * W).transpose(-1, -2).unbind(1)

        qkv, dqkv = T.linear_map(heads, T.conv2d(self.qkv, *T.group_norm(self.norm, x, dx)))
        y, dy = T.attention(*qkv, *(dqkv or (None,) * 3))
        y, dy = T.linear_map(lambda a: a.transpose(-1, -2).reshape(B, C, H, W), (y, dy))  # -> (B, C, H, W)
        return T.linear_map(_residual, (x, dx), T.conv2d(self.proj, y, dy))


class Block(nn.Module):
    """Residual block: resample, then x + conv(Dropout(SiLU(AdaNorm(conv(SiLU(GroupNorm(x))), emb)))), then
    optional self-attention. ``resample`` is 'keep', 'down' (2x2 average) or 'up' (nearest), applied to both paths.
    """

    def __init__(self, in_channels, out_channels, emb_channels, *, resample="keep", attention=False,
                 channels_per_head=64, dropout=0.0, double_norm=True):
        super().__init__()
        self.out_channels = out_channels
        self.resample = resample
        self.dropout = dropout
        self.norm0 = nn.GroupNorm(group_count(in_channels), in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm1 = AdaptiveNorm(out_channels, emb_channels, double_norm=double_norm)
        self.conv1 = _zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.attn = SelfAttention(out_channels, channels_per_head) if attention else None

    def forward(self, x, emb, dx=None, demb=None):
        if self.resample == "down":
            x, dx = T.linear_map(lambda a: nnF.avg_pool2d(a, 2), (x, dx))
        elif self.resample == "up":
            x, dx = T.linear_map(lambda a: nnF.interpolate(a, scale_factor=2.0, mode="nearest"), (x, dx))
        y, dy = T.conv2d(self.conv0, *T.silu(*T.group_norm(self.norm0, x, dx)))
        y, dy = T.silu(*self.norm1(y, emb, dy, demb))
        y, dy = T.conv2d(self.conv1, *T.dropout(y, dy, self.dropout, self.training))
        skip = T.conv2d(self.skip, x, dx) if self.skip is not None else (x, dx)
        x, dx = T.linear_map(_residual, skip, (y, dy))
        return self.attn(x, dx) if self.attn is not None else (x, dx)


class UNet(nn.Module):
    """F_theta for images (B, C, H, W): x is already divided by sigma_d, t is TrigFlow time (B,); the call
    contract (tangent included) is scmlab.nets's."""

    def __init__(
        self,
        data_shape: tuple[int, ...],
        *,
        num_classes: int = 0,
        model_channels: int,
        channel_mult: tuple[int, ...],
        num_blocks: int,
        attn_resolutions: tuple[int, ...],
        channels_per_head: int,
        dropout: float,
        double_norm: bool = True,
        time_embedding: str = "positional",
        time_max_freq: float = 4.0,
        sigma_d: float = 0.5,
        label_dropout: float = 0.0,
        guidance_input: bool = False,
        logvar_channels: int = 128,
        dropout_max_res: int | None = None,
    ):
        super().__init__()
        if len(data_shape) != 3:
            raise ValueError(f"UNet needs image data (C, H, W), got data_shape {tuple(data_shape)}; use arch 'mlp'")
        img_channels, height, width = data_shape
        factor = 2 ** (len(channel_mult) - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"resolution {height}x{width} is not divisible by {factor} ({len(channel_mult)} levels); "
                "pick a preset with fewer levels"
            )
        self.data_shape = tuple(data_shape)
        self.num_classes = num_classes
        cblock = [model_channels * m for m in channel_mult]
        # E = the widest level's channels (EDM2's rule). DDPM++ uses 2x that, but predicts only a shift per block;
        # predicting scale and shift from an E this wide keeps DDPM++'s per-block conditioning parameter count.
        emb_channels = max(cblock)
        self.cond = Conditioning(
            emb_channels,
            num_features=model_channels,
            num_classes=num_classes,
            time_embedding_kind=time_embedding,
            time_max_freq=time_max_freq,
            sigma_d=sigma_d,
            label_dropout=label_dropout,
            guidance_input=guidance_input,
        )
        self.logvar = LogVarHead(time_embedding, logvar_channels, max_freq=time_max_freq, sigma_d=sigma_d)

        def block(cin, cout, res, **kwargs):
            # Dropout only at resolutions <= dropout_max_res (Lu & Song 2024, App. G.2, after Simple Diffusion / iCT).
            p = dropout if dropout_max_res is None or res <= dropout_max_res else 0.0
            kwargs.setdefault("attention", res in attn_resolutions)
            return Block(cin, cout, emb_channels, channels_per_head=channels_per_head, dropout=p,
                         double_norm=double_norm, **kwargs)

        self.conv_in = nn.Conv2d(img_channels, model_channels, 3, padding=1)
        self.enc = nn.ModuleList()
        skips = [model_channels]  # channels of each encoder activation the decoder concatenates
        cout = model_channels
        for level, channels in enumerate(cblock):
            res = height >> level
            if level > 0:
                self.enc.append(block(cout, cout, res, resample="down", attention=False))
                skips.append(cout)
            for _ in range(num_blocks):
                self.enc.append(block(cout, channels, res))
                cout = channels
                skips.append(cout)

        self.dec = nn.ModuleList()
        self.dec_concat = []  # per decoder block: whether it takes an encoder activation
        for level, channels in reversed(list(enumerate(cblock))):
            res = height >> level
            if level == len(cblock) - 1:
                self.dec.extend([block(cout, cout, res, attention=True), block(cout, cout, res, attention=False)])
                self.dec_concat.extend([False, False])
            else:
                self.dec.append(block(cout, cout, res, resample="up", attention=False))
                self.dec_concat.append(False)
            for _ in range(num_blocks + 1):
                self.dec.append(block(cout + skips.pop(), channels, res))
                self.dec_concat.append(True)
                cout = channels

        self.norm_out = nn.GroupNorm(group_count(cout), cout)
        self.conv_out = _zero_init(nn.Conv2d(cout, img_channels, 3, padding=1))

    def forward(self, x, t, class_labels=None, guidance=None, return_logvar=False, tangent=None):
        dx, dt = tangent if tangent is not None else (None, None)
        emb, demb = self.cond(t, class_labels, guidance, dt)  # (B, E)
        x, dx = T.conv2d(self.conv_in, x, dx)
        skips = [(x, dx)]
        for block in self.enc:
            x, dx = block(x, emb, dx, demb)
            skips.append((x, dx))
        for block, concat in zip(self.dec, self.dec_concat):
            if concat:  # (B, C + C_skip, H, W)
                x, dx = T.linear_map(lambda a, b: torch.cat([a, b], dim=1), (x, dx), skips.pop())
            x, dx = block(x, emb, dx, demb)
        F, dF = T.conv2d(self.conv_out, *T.silu(*T.group_norm(self.norm_out, x, dx)))
        return outputs(F, self.logvar(t) if return_logvar else None, dF)
