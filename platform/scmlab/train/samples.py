"""Sampling from trained weights, and sample grids as PNG: shared by the training loop and `scmlab sample`.

sCT / sCD students sample with multistep consistency sampling (2 steps: t_max, then 1.1); diffusion models by
integrating the PF-ODE (Heun). `generate` returns samples in model space, `sample_data` in data space (what
`scmlab sample` writes and evaluation scores). A guidance scale goes to a class-conditional diffusion model as
classifier-free guidance, and to an sCD student with a guidance input as that input.
"""

import logging
import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from .. import sampling
from ..config import SAMPLE_STEPS, Config, net_config
from ..data import Normalizer
from ..nets import build_net

log = logging.getLogger(__name__)


def build_model(config: Config, manifest: dict) -> torch.nn.Module:
    """The network of `config` for the data described by `manifest` (shape, number of classes)."""
    return build_net(net_config(config.model, config.objective.sigma_d), data_shape=tuple(manifest["shape"]),
                     num_classes=int(manifest.get("num_classes", 0)))


def ema_model(ckpt: dict) -> torch.nn.Module:
    """The EMA network of a loaded checkpoint, in eval mode with gradients off."""
    net = build_model(Config.from_dict(ckpt["config"]), ckpt["manifest"])
    net.load_state_dict(ckpt["ema"])
    return net.eval().requires_grad_(False)


def guidance_scale(config: Config, num_classes: int, guidance: float | None = None) -> float:
    """The guidance scale to sample at: `guidance`, else train.sample_guidance, else the training scale
    objective.guidance_scale (1 = unguided). Only a class-conditional diffusion model (classifier-free guidance) and
    an sCD student with a guidance input take a scale other than 1."""
    w = next(g for g in (guidance, config.train.sample_guidance, config.objective.guidance_scale) if g is not None)
    if w != 1.0 and not (config.model.guidance_input or (config.objective.kind == "diffusion" and num_classes)):
        raise ValueError(f"guidance {w}: only a class-conditional diffusion model (classifier-free guidance) or an "
                         "sCD student trained with model.guidance_input takes a guidance scale")
    if config.objective.guidance_max > 1 and not 1 <= w <= config.objective.guidance_max:
        log.warning("guidance %s lies outside the scales the student was trained on, [1, %s]", w,
                    config.objective.guidance_max)
    return w


@torch.no_grad()
def generate(net, config: Config, noise: torch.Tensor, *, steps: int | None = None, class_labels=None,
             guidance: float | None = None, generator=None) -> torch.Tensor:
    """Samples in model space from standard-normal `noise` (B, ...); steps=None takes the kind's default, guidance
    (see guidance_scale) the run's."""
    kind, sigma_d = config.objective.kind, config.objective.sigma_d
    steps = steps or SAMPLE_STEPS[kind]
    w = guidance_scale(config, net.num_classes if class_labels is not None else 0, guidance)
    if kind == "diffusion":
        return sampling.pf_ode_sample(net, noise, sigma_d=sigma_d, num_steps=steps, class_labels=class_labels,
                                      guidance_scale=w)
    inputs = torch.full((noise.shape[0],), w, device=noise.device, dtype=noise.dtype) \
        if config.model.guidance_input else None
    return sampling.consistency_sample(net, noise, sigma_d=sigma_d, times=sampling.consistency_times(steps, sigma_d),
                                       class_labels=class_labels, guidance=inputs, generator=generator)


def class_labels(n: int, num_classes: int, device=None, start: int = 0) -> torch.Tensor | None:
    """The default labels of samples start .. start + n - 1: 0, 1, ..., num_classes - 1, 0, ... (None when the model
    is unconditional), so that every class is drawn equally often."""
    return torch.arange(start, start + n, device=device) % num_classes if num_classes else None


def sample_data(net, config: Config, manifest: dict, noise: torch.Tensor, **kwargs) -> torch.Tensor:
    """`generate` (same arguments) mapped to data space, float32 on the noise's device: images clipped to the pixel
    range [-1, 1], vectors in original units (de-normalized with the manifest's statistics)."""
    x = Normalizer(manifest).to_data(generate(net, config, noise, **kwargs).float())
    return x.clamp(-1, 1) if manifest["kind"] == "image" else x


def save_grid(samples: np.ndarray, path: str, kind: str) -> None:
    """Write a PNG: images (N, C, H, W) in [-1, 1] as a square grid, vectors (N, D) as a scatter of dims 0 and 1."""
    image = _image_grid(samples) if kind == "image" else _scatter(samples)
    image.save(path)


def _image_grid(x: np.ndarray, pad: int = 1) -> Image.Image:
    n, c, h, w = x.shape
    x = x[:, :3] if c >= 3 else x[:, :1]  # latents: show the first three channels
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pixels = ((np.clip(x, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    tiles = np.full((rows * cols, pixels.shape[1], h + pad, w + pad), 128, np.uint8)  # gray lines between tiles
    tiles[:n, :, pad:, pad:] = pixels
    H, W = rows * (h + pad) + pad, cols * (w + pad) + pad
    grid = np.full((H, W, pixels.shape[1]), 128, np.uint8)
    grid[:-pad, :-pad] = tiles.reshape(rows, cols, -1, h + pad, w + pad).transpose(0, 3, 1, 4, 2).reshape(
        H - pad, W - pad, -1)  # (rows, h, cols, w, C) -> (H, W, C)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    scale = max(1, 384 // max(H, W))  # small images (8x8 digits) enlarged, pixels kept sharp
    return image.resize((W * scale, H * scale), Image.NEAREST)


def _scatter(x: np.ndarray, size: int = 512) -> Image.Image:
    xy = x[:, :2] if x.shape[1] >= 2 else np.concatenate([x, np.zeros_like(x)], axis=1)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    pad = 0.05 * (hi - lo + 1e-8)
    uv = (xy - lo + pad) / (hi - lo + 2 * pad) * (size - 1)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for u, v in uv:
        draw.ellipse((u - 1.5, size - 1 - v - 1.5, u + 1.5, size - 1 - v + 1.5), fill=(30, 60, 160))
    return image
