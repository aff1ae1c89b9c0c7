"""Samples to score: a model's samples drawn in batches shared out over ranks, or samples from a file; images
quantized to 8 bits, as the PNGs of the reference data are.

Sample i belongs to batch b = i // batch_size, whose noise (and re-noising) comes from a generator seeded by
(seed, b) alone, and whose labels are the default 0, 1, ..., classes - 1, 0, ... of i; rank r draws the batches
b = r, r + world_size, ... So the n samples are the same whatever the number of ranks, and the same at every
evaluation of a run (comparable across steps).
"""

import math
from collections.abc import Iterator

import numpy as np
import torch

from ..config import Config
from ..train.loop import step_seed
from ..train.samples import class_labels, sample_data
from . import EvalError

Batch = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]  # (x in data space, labels or None, global indices)


def quantize(x: torch.Tensor, manifest: dict) -> torch.Tensor:
    """Images as a saved PNG holds them (uint8 pixels, mapped back to [-1, 1]), as the reference images are: every
    metric scores what a user would save and look at. Vectors pass through."""
    if manifest["kind"] != "image":
        return x
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


@torch.no_grad()
def generated(net, config: Config, manifest: dict, *, n: int, steps: int, seed: int, batch_size: int, device,
              rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
    """This rank's share of n samples of `net` (in eval mode) at `steps` sampling steps, in data space."""
    num_classes = int(manifest.get("num_classes", 0))
    for b in range(rank, math.ceil(n / batch_size), world_size):
        start = b * batch_size
        size = min(batch_size, n - start)
        generator = torch.Generator(device=device).manual_seed(step_seed(seed, 0, b))
        noise = torch.randn((size, *manifest["shape"]), generator=generator, device=device)
        labels = class_labels(size, num_classes, device, start)
        x = sample_data(net, config, manifest, noise, steps=steps, class_labels=labels, generator=generator)
        yield quantize(x, manifest), labels, torch.arange(start, start + size, device=device)


def from_file(path: str, manifest: dict, *, batch_size: int, n: int | None = None, device="cpu") -> Iterator[Batch]:
    """Batches of an .npz that `scmlab sample` writes (`samples`: float32 data space, images NCHW in [-1, 1];
    optional `labels`), checked against the dataset: errors name the file and the key."""
    samples, labels = load_samples(path, manifest, n)
    for start in range(0, len(samples), batch_size):
        x = quantize(torch.from_numpy(samples[start:start + batch_size]).to(device), manifest)
        y = None if labels is None else torch.from_numpy(labels[start:start + batch_size]).to(device)
        yield x, y, torch.arange(start, start + len(x), device=device)


def load_samples(path: str, manifest: dict, n: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(samples, labels or None) of a sample file, validated: the shape of the dataset's samples, finite values,
    images in [-1, 1], at least 2 samples (and at least n when n is given), labels (if any) one per sample."""
    with np.load(path, allow_pickle=False) as z:
        if "samples" not in z.files:
            raise EvalError(f"{path}: no `samples` array (found {z.files}); write it with `scmlab sample`")
        samples = z["samples"]
        labels = z["labels"] if "labels" in z.files else None
    shape = tuple(manifest["shape"])
    if samples.ndim != len(shape) + 1 or tuple(samples.shape[1:]) != shape:
        raise EvalError(f"{path}: `samples` has shape {samples.shape}, the dataset {manifest['name']} holds "
                         f"(N, {', '.join(map(str, shape))})")
    if not np.isfinite(samples).all():
        raise EvalError(f"{path}: `samples` holds non-finite values")
    lo, hi = float(samples.min()), float(samples.max())
    if manifest["kind"] == "image" and (lo < -1 - 1e-3 or hi > 1 + 1e-3):
        raise EvalError(f"{path}: `samples` values lie in [{lo:.4g}, {hi:.4g}]; images must be in [-1, 1] (data "
                         f"space, as `scmlab sample` writes them; uint8 pixels p map to p / 127.5 - 1)")
    if len(samples) < max(2, n or 0):
        raise EvalError(f"{path}: `samples` holds {len(samples)} samples; the evaluation needs at least "
                         f"{max(2, n or 0)}")
    if labels is not None:
        if labels.shape != (len(samples),):
            raise EvalError(f"{path}: `labels` has shape {labels.shape}, expected ({len(samples)},): one per sample")
        num_classes = int(manifest.get("num_classes", 0))
        if labels.min() < 0 or labels.max() >= max(num_classes, 1):
            raise EvalError(f"{path}: `labels` must be classes in [0, {num_classes}), found {labels.min()}.."
                             f"{labels.max()}")
    if n:
        samples, labels = samples[:n], None if labels is None else labels[:n]
    return samples.astype(np.float32), None if labels is None else labels.astype(np.int64)
