"""Residual MLP for vector data, conditioned on time (and optionally class and guidance scale) through adaptive
(double) normalization.

Shape legend: B batch, D data dimension, W hidden width, E conditioning-embedding width.
"""

import torch
import torch.nn as nn

from scmlab import tangent as T
from scmlab.nets.layers import AdaptiveNorm, Conditioning, LogVarHead, outputs

# Size presets: constructor arguments by name. 'tiny' is for CI (~15k parameters at D = 2).
MLP_PRESETS = {
    "tiny": dict(width=32, num_blocks=2, emb_channels=32, num_features=32, logvar_channels=32, dropout=0.0),
    "small": dict(width=128, num_blocks=3, emb_channels=128, num_features=64, logvar_channels=64, dropout=0.0),
    "base": dict(width=512, num_blocks=6, emb_channels=512, num_features=128, logvar_channels=128, dropout=0.0),
}


class ResidualBlock(nn.Module):
    """x + Linear(Dropout(SiLU(Linear(SiLU(AdaNorm(x, emb)))))); the last Linear starts at zero."""

    def __init__(self, width: int, emb_channels: int, *, dropout: float, double_norm: bool):
        super().__init__()
        self.norm = AdaptiveNorm(width, emb_channels, double_norm=double_norm, image=False)
        self.linear0 = nn.Linear(width, width)
        self.linear1 = nn.Linear(width, width)
        self.dropout = dropout
        nn.init.zeros_(self.linear1.weight)
        nn.init.zeros_(self.linear1.bias)

    def forward(self, x, emb, dx=None, demb=None):  # (B, W), (B, E) -> (B, W), and the tangent
        y, dy = T.silu(*self.norm(x, emb, dx, demb))
        y, dy = T.silu(*T.linear(self.linear0, y, dy))
        y, dy = T.dropout(y, dy, self.dropout, self.training)
        return T.linear_map(torch.add, (x, dx), T.linear(self.linear1, y, dy))


class MLP(nn.Module):
    """F_theta for vectors (B, D): x is already divided by sigma_d, t is TrigFlow time (B,); the call contract
    (tangent included) is scmlab.nets's."""

    def __init__(
        self,
        data_shape: tuple[int, ...],
        *,
        num_classes: int = 0,
        width: int,
        num_blocks: int,
        emb_channels: int,
        num_features: int,
        logvar_channels: int,
        dropout: float,
        double_norm: bool = True,
        time_embedding: str = "positional",
        time_max_freq: float = 4.0,
        sigma_d: float = 0.5,
        label_dropout: float = 0.0,
        guidance_input: bool = False,
    ):
        super().__init__()
        if len(data_shape) != 1:
            raise ValueError(f"MLP needs vector data (D,), got data_shape {tuple(data_shape)}; use arch 'unet'")
        self.data_shape = tuple(data_shape)
        self.num_classes = num_classes
        self.cond = Conditioning(
            emb_channels,
            num_features=num_features,
            num_classes=num_classes,
            time_embedding_kind=time_embedding,
            time_max_freq=time_max_freq,
            sigma_d=sigma_d,
            label_dropout=label_dropout,
            guidance_input=guidance_input,
        )
        self.logvar = LogVarHead(time_embedding, logvar_channels, max_freq=time_max_freq, sigma_d=sigma_d)
        self.linear_in = nn.Linear(data_shape[0], width)
        self.blocks = nn.ModuleList(
            ResidualBlock(width, emb_channels, dropout=dropout, double_norm=double_norm) for _ in range(num_blocks)
        )
        self.norm_out = nn.LayerNorm(width)
        self.linear_out = nn.Linear(width, data_shape[0])
        nn.init.zeros_(self.linear_out.weight)
        nn.init.zeros_(self.linear_out.bias)

    def forward(self, x, t, class_labels=None, guidance=None, return_logvar=False, tangent=None):
        dx, dt = tangent if tangent is not None else (None, None)
        emb, demb = self.cond(t, class_labels, guidance, dt)  # (B, E)
        h, dh = T.linear(self.linear_in, x, dx)  # (B, W)
        for block in self.blocks:
            h, dh = block(h, emb, dh, demb)
        h, dh = T.silu(*T.layer_norm(self.norm_out, h, dh))
        F, dF = T.linear(self.linear_out, h, dh)  # (B, D)
        return outputs(F, self.logvar(t) if return_logvar else None, dF)
