"""DiT, the diffusion transformer (Peebles & Xie 2023), for images, with the sCM paper's changes (Lu & Song 2024,
sec. 4.1): each block conditioned through adaptive double normalization instead of adaLN-Zero, the positional time
embedding of c_noise(t) = t with small frequencies, optional dropout in the MLPs, and the learned weighting head
w_phi(t). Attention goes through ``scmlab.tangent.attention``.

Shape legend: B batch, C_img x H x W the image, p the patch size, N = (H / p) (W / p) tokens, C hidden width
(= E, the conditioning-embedding width), heads x d = C in attention.

Layout: patchify (a p x p convolution with stride p) plus fixed 2-D sine-cosine position embeddings; ``depth``
blocks of x + attn(AdaNorm(x, emb)), x + MLP(AdaNorm(x, emb)) (MLP C -> 4C -> C with GELU); a final AdaNorm and
a linear map to p x p x C_img per token, unpatchified. The residual branches' output layers and the final linear
start at zero (as adaLN-Zero starts each block at the identity and F at 0).
"""

import torch
import torch.nn as nn

from scmlab import tangent as T
from scmlab.nets.layers import AdaptiveNorm, Conditioning, LogVarHead, outputs

# Size presets: constructor arguments by name; ``dropout`` is the default when the model config leaves it None.
#  ci, small: debug / CPU sizes (8x8 digits, 28x28 Fashion-MNIST).
#  S, B, L, XL: DiT's sizes at patch 2 (Peebles & Xie 2023, Table 1: 33M / 130M / 458M / 675M parameters on
#    ImageNet 256 latents, 4x32x32, 1000 classes). Here 10-11% fewer: the double norm predicts a scale and a shift
#    for each of the two norms of a block (4 C^2 weights), where adaLN-Zero also predicts two gates (6 C^2).
#    Counted with those gates, the counts agree within 0.5% (tests/test_nets.py).
DIT_PRESETS = {
    "ci": dict(hidden=64, depth=2, num_heads=2, patch_size=2, dropout=0.0),
    "small": dict(hidden=192, depth=6, num_heads=3, patch_size=2, dropout=0.0),
    "S": dict(hidden=384, depth=12, num_heads=6, patch_size=2, dropout=0.0),
    "B": dict(hidden=768, depth=12, num_heads=12, patch_size=2, dropout=0.0),
    "L": dict(hidden=1024, depth=24, num_heads=16, patch_size=2, dropout=0.0),
    "XL": dict(hidden=1152, depth=28, num_heads=16, patch_size=2, dropout=0.0),
}
MLP_RATIO = 4
TIME_FEATURES = 256  # DiT's frequency-embedding size


def _zero_init(layer: nn.Module) -> nn.Module:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def position_embedding(channels: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine embedding of the token grid (h, w) -> (h w, C), as DiT's (MAE's): half the channels
    encode the row, half the column, each [sin, cos] at frequencies 10000^(-i / (C / 4))."""
    if channels % 4:
        raise ValueError(f"hidden width must be a multiple of 4, got {channels}")
    omega = 1.0 / 10000 ** (torch.arange(channels // 4, dtype=torch.float64) / (channels // 4))  # (C/4,)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")

    def encode(pos):  # (h, w) -> (h w, C/2)
        angles = pos.reshape(-1, 1) * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class Attention(nn.Module):
    """Multi-head self-attention over tokens (B, N, C): qkv and output projections; the output starts at zero."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = _zero_init(nn.Linear(channels, channels))

    def forward(self, x, dx=None):
        B, N, C = x.shape

        def heads(qkv):  # (B, N, 3C) -> (3, B, heads, N, d) -> q, k, v
            return qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)

        qkv, dqkv = T.linear_map(heads, T.linear(self.qkv, x, dx))
        y, dy = T.attention(*qkv, *(dqkv or (None,) * 3))  # (B, heads, N, d)
        y, dy = T.linear_map(lambda a: a.transpose(1, 2).reshape(B, N, C), (y, dy))
        return T.linear(self.proj, y, dy)


class Block(nn.Module):
    """x + attn(AdaNorm(x, emb)), then x + fc1(Dropout(GELU(fc0(AdaNorm(x, emb)))))."""

    def __init__(self, channels: int, num_heads: int, *, dropout: float, double_norm: bool):
        super().__init__()
        self.dropout = dropout
        self.norm0 = AdaptiveNorm(channels, channels, double_norm=double_norm, image=False)
        self.attn = Attention(channels, num_heads)
        self.norm1 = AdaptiveNorm(channels, channels, double_norm=double_norm, image=False)
        self.fc0 = nn.Linear(channels, MLP_RATIO * channels)
        self.fc1 = _zero_init(nn.Linear(MLP_RATIO * channels, channels))

    def forward(self, x, emb, dx=None, demb=None):  # (B, N, C), (B, E) -> (B, N, C), and the tangent
        x, dx = T.linear_map(torch.add, (x, dx), self.attn(*self.norm0(x, emb, dx, demb)))
        y, dy = T.gelu(*T.linear(self.fc0, *self.norm1(x, emb, dx, demb)))
        y, dy = T.dropout(y, dy, self.dropout, self.training)
        return T.linear_map(torch.add, (x, dx), T.linear(self.fc1, y, dy))


class DiT(nn.Module):
    """F_theta for images (B, C_img, H, W): x is already divided by sigma_d, t is TrigFlow time (B,); the call
    contract (tangent included) is scmlab.nets's."""

    def __init__(
        self,
        data_shape: tuple[int, ...],
        *,
        num_classes: int = 0,
        hidden: int,
        depth: int,
        num_heads: int,
        patch_size: int,
        dropout: float,
        double_norm: bool = True,
        time_embedding: str = "positional",
        time_max_freq: float = 4.0,
        sigma_d: float = 0.5,
        label_dropout: float = 0.0,
        guidance_input: bool = False,
        logvar_channels: int = 128,
    ):
        super().__init__()
        if len(data_shape) != 3:
            raise ValueError(f"DiT needs image data (C, H, W), got data_shape {tuple(data_shape)}; use arch 'mlp'")
        img_channels, height, width = data_shape
        if height % patch_size or width % patch_size:
            raise ValueError(f"resolution {height}x{width} is not divisible by the patch size {patch_size}")
        if hidden % num_heads:
            raise ValueError(f"hidden width {hidden} is not divisible by {num_heads} heads")
        self.data_shape = tuple(data_shape)
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.cond = Conditioning(
            hidden,
            num_features=TIME_FEATURES,
            num_classes=num_classes,
            time_embedding_kind=time_embedding,
            time_max_freq=time_max_freq,
            sigma_d=sigma_d,
            label_dropout=label_dropout,
            guidance_input=guidance_input,
        )
        self.logvar = LogVarHead(time_embedding, logvar_channels, max_freq=time_max_freq, sigma_d=sigma_d)
        self.patchify = nn.Conv2d(img_channels, hidden, patch_size, stride=patch_size)
        # Fixed, so not in the state dict; built on the module's device (meta when only counting).
        self.register_buffer("pos", position_embedding(hidden, height // patch_size, width // patch_size),
                             persistent=False)
        self.blocks = nn.ModuleList(
            Block(hidden, num_heads, dropout=dropout, double_norm=double_norm) for _ in range(depth)
        )
        self.norm_out = AdaptiveNorm(hidden, hidden, double_norm=double_norm, image=False)
        self.linear_out = _zero_init(nn.Linear(hidden, patch_size * patch_size * img_channels))

    def forward(self, x, t, class_labels=None, guidance=None, return_logvar=False, tangent=None):
        dx, dt = tangent if tangent is not None else (None, None)
        B, C_img, H, W = x.shape
        p = self.patch_size
        emb, demb = self.cond(t, class_labels, guidance, dt)  # (B, E)
        h, dh = T.linear_map(lambda a: a.flatten(2).transpose(1, 2), T.conv2d(self.patchify, x, dx))  # (B, N, C)
        h = h + self.pos.to(h.dtype)  # a constant: the tangent is unchanged
        for block in self.blocks:
            h, dh = block(h, emb, dh, demb)
        h, dh = T.linear(self.linear_out, *self.norm_out(h, emb, dh, demb))  # (B, N, p p C_img)

        def unpatchify(a):  # (B, N, p p C_img) -> (B, H/p, W/p, p, p, C_img) -> (B, C_img, H, W)
            a = a.reshape(B, H // p, W // p, p, p, C_img)
            return torch.einsum("bhwpqc->bchpwq", a).reshape(B, C_img, H, W)

        F, dF = T.linear_map(unpatchify, (h, dh))
        return outputs(F, self.logvar(t) if return_logvar else None, dF)

