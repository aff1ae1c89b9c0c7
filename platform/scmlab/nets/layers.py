"""Building blocks shared by the MLP, the UNet and the DiT: time embeddings, adaptive (double) normalization, the
conditioning embedding and the learned adaptive weighting head w_phi(t).

Shape legend: B batch, C channels, E conditioning-embedding width, N feature count of a time embedding.

Every layer carries a tangent (scmlab.tangent): ``forward(x, ..., dx=None, ...)`` returns (y, dy), with dy = None
in a plain forward. Every layer is also safe under forward-mode AD (``torch.func.jvp``): no in-place ops on
activations, no BatchNorm, no buffer written in ``forward``.
"""

import math

import torch
import torch.nn as nn

from scmlab import tangent as T


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

    def forward(self, t: torch.Tensor, dt: torch.Tensor | None = None):  # (B,) -> (B, N)
        # Computed on the fly rather than stored: nothing to move between devices or load from checkpoints.
        half = self.num_channels // 2
        exponents = torch.arange(half, device=t.device, dtype=t.dtype) / max(half - 1, 1)
        freqs = self.max_freq * (1e-3**exponents)
        return _cos_sin(t[:, None] * freqs[None, :], None if dt is None else dt[:, None] * freqs[None, :])


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

    def forward(self, t: torch.Tensor, dt: torch.Tensor | None = None):  # (B,) -> (B, N)
        sigma_raw = self.sigma_d * torch.tan(t)
        c_noise = sigma_raw.clamp_min(self.sigma_min).log() / 4
        freqs = (2 * math.pi * self.freqs.to(t.dtype))[None, :]
        dc_noise = None
        if dt is not None:
            with torch.no_grad():  # d log(sigma_d tan t) / 4 = dt / (4 sin t cos t); 0 where sigma is floored
                dc_noise = torch.where(sigma_raw > self.sigma_min, dt / (4 * torch.sin(t) * torch.cos(t)), 0.0)
        return _cos_sin(c_noise[:, None] * freqs, None if dc_noise is None else dc_noise[:, None] * freqs)


def _cos_sin(angles: torch.Tensor, dangles: torch.Tensor | None):
    """Features [cos a, sin a] (B, N) of angles (B, N/2), and their tangent [-sin a da, cos a da]."""
    cos, sin = angles.cos(), angles.sin()
    y = torch.cat([cos, sin], dim=1)
    if dangles is None:
        return y, None
    with torch.no_grad():
        return y, torch.cat([-sin * dangles, cos * dangles], dim=1)


TIME_EMBEDDINGS = ("positional", "fourier_logsigma")


def time_embedding(kind: str, num_channels: int, *, max_freq: float, sigma_d: float) -> nn.Module:
    """The time-feature module named by the model config's ``time_embedding``."""
    if kind == "positional":
        return PositionalEmbedding(num_channels, max_freq=max_freq)
    if kind == "fourier_logsigma":
        return FourierEmbedding(num_channels, sigma_d=sigma_d)
    raise ValueError(f"time_embedding {kind!r} is not one of {', '.join(TIME_EMBEDDINGS)}")


class AdaptiveNorm(nn.Module):
    """Conditioning of a normalized activation on the embedding (Lu & Song 2024, sec. 4.1).

    double_norm=True (the paper's adaptive double normalization): y = norm(x) * pnorm(s(emb)) + pnorm(b(emb)).
    double_norm=False (plain AdaGN, as in ADM/EDM): y = norm(x) * (1 + s(emb)) + b(emb).
    ``norm`` is a parameter-free GroupNorm over the channels of images (B, C, H, W), or a LayerNorm over the last
    dimension of vectors (B, C) and tokens (B, N, C); s and b are (B, C), broadcast over the rest.
    """

    def __init__(self, channels: int, emb_channels: int, *, double_norm: bool = True, image: bool = True):
        super().__init__()
        self.double_norm = double_norm
        self.image = image
        self.norm = (
            nn.GroupNorm(group_count(channels), channels, affine=False)
            if image
            else nn.LayerNorm(channels, elementwise_affine=False)
        )
        self.affine = nn.Linear(emb_channels, 2 * channels)

    def forward(self, x, emb, dx=None, demb=None):
        n, dn = (T.group_norm if self.image else T.layer_norm)(self.norm, x, dx)
        s, ds = T.linear_map(lambda a: a.unflatten(1, (2, -1)), T.linear(self.affine, emb, demb))  # (B, 2, C)
        if self.double_norm:
            s, ds = T.pixel_norm(s, ds, dim=2)  # scale and shift each
        scale, shift = self._broadcast(s, x)
        if not self.double_norm:
            scale = 1 + scale
        y = n * scale + shift
        if dx is None:
            return y, None
        with torch.no_grad():  # the product rule: dn * scale + n * dscale + dshift
            dscale, dshift = self._broadcast(ds, x)
            return y, torch.addcmul(dshift, n, dscale).addcmul_(dn, scale)

    def _broadcast(self, s, x):
        """(B, 2, C) -> scale and shift shaped to broadcast over x: (B, C, 1, 1) for images, (B, 1, C) for tokens."""
        B, _, C = s.shape
        shape = (B, C, *[1] * (x.ndim - 2)) if self.image else (B, *[1] * (x.ndim - 2), C)
        return s[:, 0].reshape(shape), s[:, 1].reshape(shape)


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

    def forward(self, c, dc=None):  # (B,) -> (B, E)
        h, dh = self.features(c, dc)
        h, dh = T.silu(*T.linear(self.linear0, h, dh))
        return T.linear(self.linear1, h, dh)


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

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B,); only F's tangent is needed, not w_phi's
        features, _ = self.features(t)
        return self.linear1(nn.functional.silu(self.linear0(features))).squeeze(1)


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

    def forward(self, t, class_labels=None, guidance=None, dt=None):  # -> (B, E), its tangent
        # Labels and guidance scales are held fixed along the trajectory: only the time carries a tangent.
        emb, demb = self.time(t, dt)
        if self.label is not None:
            emb = emb + self.label(self._labels_with_null(class_labels, t))
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional network (num_classes = 0)")
        if self.guidance is not None:
            if guidance is None:
                raise ValueError("this network was built with guidance_input=True: pass guidance (B,)")
            emb = emb + self.guidance(torch.as_tensor(guidance, dtype=t.dtype, device=t.device).expand(t.shape))[0]
        elif guidance is not None:
            raise ValueError("guidance given to a network built with guidance_input=False")
        return T.silu(emb, demb)

    def _labels_with_null(self, class_labels, t):
        null = torch.full(t.shape, self.num_classes, dtype=torch.long, device=t.device)
        if class_labels is None:
            return null
        if self.training and self.label_dropout > 0:
            drop = torch.rand(t.shape, device=t.device) < self.label_dropout
            return torch.where(drop, null, class_labels)
        return class_labels


def outputs(F, logvar=None, dF=None):
    """A network's return value: F, then w_phi(t) when return_logvar, then F's tangent when a tangent was given."""
    out = (F, *(v for v in (logvar, dF) if v is not None))
    return out if len(out) > 1 else F
