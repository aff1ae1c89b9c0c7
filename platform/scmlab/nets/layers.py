"""JVP-safe building blocks shared by the MLP and the UNet: time embeddings, pixel norm, adaptive (double)
normalization and the learned adaptive weighting head w_phi(t).

Shape legend: B batch, C channels, E conditioning-embedding width, N feature count of a time embedding.

Every layer is safe under forward-mode AD (``torch.func.jvp`` and ``torch.autograd.forward_ad``): no in-place
ops on activations, no BatchNorm, no buffer written in ``forward``.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as nnF


class PositionalEmbedding(nn.Module):
    """Sinusoidal features of c_noise(t) = t (the sCM paper's time conditioning, Lu & Song 2024 sec. 4.1).

    Angular frequencies are geometrically spaced from ``max_freq`` (rad per unit t) down to max_freq / 1000.
    A small max_freq keeps dF/dt bounded; EDM-scale frequencies make the tangent blow up (DESIGN.md sec. 2).
    """

    def __init__(self, num_channels: int, max_freq: float = 4.0):
        super().__init__()
        if num_channels % 2:
            raise ValueError(f"num_channels must be even, got {num_channels}")
        self.num_channels = num_channels
        self.max_freq = max_freq

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, N)
        # Computed on the fly rather than stored: nothing to move between devices or load from checkpoints.
        half = self.num_channels // 2
        exponents = torch.arange(half, device=t.device, dtype=t.dtype) / max(half - 1, 1)
        freqs = self.max_freq * (1e-3**exponents)
        angles = t[:, None] * freqs[None, :]  # (B, N/2)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """EDM's time conditioning, for the ablation: c_noise = log(sigma) / 4 with sigma = sigma_d tan t, and
    features cos/sin(2 pi f c_noise) at fixed random frequencies f ~ N(0, scale^2) (Karras et al. 2022, Table 1).

    sigma is floored at ``sigma_min`` so that t = 0 (where the consistency function ignores F) stays finite.
    """

    def __init__(self, num_channels: int, sigma_d: float = 0.5, scale: float = 16.0, sigma_min: float = 1e-4):
        super().__init__()
        if num_channels % 2:
            raise ValueError(f"num_channels must be even, got {num_channels}")
        self.sigma_d = sigma_d
        self.sigma_min = sigma_min
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, N)
        sigma = (self.sigma_d * torch.tan(t)).clamp_min(self.sigma_min)
        c_noise = sigma.log() / 4
        angles = c_noise[:, None] * (2 * math.pi * self.freqs.to(t.dtype))[None, :]  # (B, N/2)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


TIME_EMBEDDINGS = ("positional", "fourier_logsigma")


def time_embedding(kind: str, num_channels: int, *, max_freq: float, sigma_d: float) -> nn.Module:
    """The time-feature module named by the model config's ``time_embedding``."""
    if kind == "positional":
        return PositionalEmbedding(num_channels, max_freq=max_freq)
    if kind == "fourier_logsigma":
        return FourierEmbedding(num_channels, sigma_d=sigma_d)
    raise ValueError(f"time_embedding {kind!r} is not one of {', '.join(TIME_EMBEDDINGS)}")


def pixel_norm(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """x / sqrt(mean(x^2 over the channel dim) + eps) (Karras et al. 2018, Eq. 2)."""
    # Statistics in at least float32: a mean of squares in fp16 under autocast overflows / underflows.
    mean_square = x.to(torch.promote_types(x.dtype, torch.float32)).square().mean(dim=dim, keepdim=True)
    return x * torch.rsqrt(mean_square + eps).to(x.dtype)


def _expand_like(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B, C, 1, ...) to broadcast over x's trailing (spatial) dims."""
    return v.reshape(*v.shape, *([1] * (x.ndim - v.ndim)))


class AdaptiveNorm(nn.Module):
    """Conditioning of a normalized activation on the embedding (Lu & Song 2024, sec. 4.1).

    double_norm=True (the paper's adaptive double normalization): y = norm(x) * pnorm(s(emb)) + pnorm(b(emb)).
    double_norm=False (plain AdaGN, as in ADM/EDM): y = norm(x) * (1 + s(emb)) + b(emb).
    ``norm`` is a parameter-free GroupNorm for images (B, C, H, W) and LayerNorm for vectors (B, C).
    """

    def __init__(self, channels: int, emb_channels: int, *, double_norm: bool = True, image: bool = True):
        super().__init__()
        self.double_norm = double_norm
        self.norm = (
            nn.GroupNorm(group_count(channels), channels, affine=False)
            if image
            else nn.LayerNorm(channels, elementwise_affine=False)
        )
        self.affine = nn.Linear(emb_channels, 2 * channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.affine(emb).chunk(2, dim=1)  # (B, C) each
        if self.double_norm:
            scale, shift = pixel_norm(scale), pixel_norm(shift)
        else:
            scale = 1 + scale
        return self.norm(x) * _expand_like(scale, x) + _expand_like(shift, x)


def group_count(channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """GroupNorm group count as in EDM: up to 32 groups of at least 4 channels."""
    return max(1, min(max_groups, channels // min_channels_per_group))


class ConditionMLP(nn.Module):
    """Scalar condition (time or guidance scale) -> features -> 2-layer MLP -> (B, E) embedding (DDPM++ mapping)."""

    def __init__(self, features: nn.Module, num_features: int, emb_channels: int):
        super().__init__()
        self.features = features
        self.linear0 = nn.Linear(num_features, emb_channels)
        self.linear1 = nn.Linear(emb_channels, emb_channels)

    def forward(self, c: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, E)
        return self.linear1(nnF.silu(self.linear0(self.features(c))))


class LogVarHead(nn.Module):
    """The learned adaptive weighting w_phi(t) of the sCM loss (Lu & Song 2024, Eq. 8), as EDM2's uncertainty
    u(sigma): its own time features, a small MLP, one scalar per sample. The last layer starts at zero, so
    w_phi(t) = 0 (unit weight) at initialization.
    """

    def __init__(self, kind: str, num_channels: int, *, max_freq: float, sigma_d: float):
        super().__init__()
        self.features = time_embedding(kind, num_channels, max_freq=max_freq, sigma_d=sigma_d)
        self.linear0 = nn.Linear(num_channels, num_channels)
        self.linear1 = nn.Linear(num_channels, 1)
        nn.init.zeros_(self.linear1.weight)
        nn.init.zeros_(self.linear1.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B,)
        return self.linear1(nnF.silu(self.linear0(self.features(t)))).squeeze(1)


class Conditioning(nn.Module):
    """The conditioning embedding shared by the MLP and the UNet: time, optional class label, optional guidance
    scale, summed at width E and passed through SiLU.

    Class labels index a table with num_classes + 1 rows; the last row is the null (unconditional) label, used when
    class_labels is None and, in training mode, for a ``label_dropout`` fraction of the batch (classifier-free
    guidance training, Ho & Salimans 2022).
    """

    def __init__(
        self,
        emb_channels: int,
        *,
        num_features: int,
        num_classes: int,
        time_embedding_kind: str,
        time_max_freq: float,
        sigma_d: float,
        label_dropout: float,
        guidance_input: bool,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.label_dropout = label_dropout
        features = time_embedding(time_embedding_kind, num_features, max_freq=time_max_freq, sigma_d=sigma_d)
        self.time = ConditionMLP(features, num_features, emb_channels)
        self.label = nn.Embedding(num_classes + 1, emb_channels) if num_classes else None
        # The guidance scale is a plain positive number (about 1-10), not a TrigFlow time: always sinusoidal.
        self.guidance = (
            ConditionMLP(PositionalEmbedding(num_features, max_freq=time_max_freq), num_features, emb_channels)
            if guidance_input
            else None
        )

    def forward(self, t, class_labels=None, guidance=None) -> torch.Tensor:  # -> (B, E)
        emb = self.time(t)
        if self.label is not None:
            emb = emb + self.label(self._labels_with_null(class_labels, t))
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional network (num_classes = 0)")
        if self.guidance is not None:
            if guidance is None:
                raise ValueError("this network was built with guidance_input=True: pass guidance (B,)")
            emb = emb + self.guidance(torch.as_tensor(guidance, dtype=t.dtype, device=t.device).expand(t.shape))
        elif guidance is not None:
            raise ValueError("guidance given to a network built with guidance_input=False")
        return nnF.silu(emb)

    def _labels_with_null(self, class_labels, t):
        null = torch.full(t.shape, self.num_classes, dtype=torch.long, device=t.device)
        if class_labels is None:
            return null
        if self.training and self.label_dropout > 0:
            drop = torch.rand(t.shape, device=t.device) < self.label_dropout
            return torch.where(drop, null, class_labels)
        return class_labels
