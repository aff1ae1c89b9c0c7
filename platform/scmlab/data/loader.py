"""make_loader: an endless, reproducible stream of model-space batches from a shard dataset.

Each (rank, DataLoader worker) pair is one slot. With at least as many shards as slots, slot s reads the shards
s, s + slots, ... (disjoint data per rank); with fewer, every slot reads every shard and keeps every slots-th sample.
Shards are drawn with replacement (resampled, so no rank runs dry and DDP never waits on a rank with fewer batches),
read whole, shuffled through a buffer, decoded and batched inside the pipeline. The shard draws and the shuffle come
from one RNG seeded by (seed, rank, worker, start_step): a run resumed at step k reads a fresh order rather than
replaying the batches of step 0 (there is no mid-epoch state to restore; resampling makes the restart statistically
equivalent, DESIGN section 7).

Built from webdataset stages rather than `wds.WebDataset(resampled=True)`, whose shard sampler seeds from the pid
and the clock and whose node split reads RANK / WORLD_SIZE from the environment instead of the arguments here.
"""

import functools
import random
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds

from .manifest import read_manifest, shard_list
from .normalize import Normalizer
from .shards import DataError, decode, read_shard

SHUFFLE_BUFFER = 2000  # samples; a shard is read in stored order, so this is the span over which order is mixed


def _slot_samples(shards: list[tuple[str, int]], seed: int, rank: int, world_size: int,
                  start_step: int) -> Iterator[dict]:
    """Raw samples for this (rank, worker) slot, endless and shuffled."""
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    slot, slots = rank * workers + worker, world_size * workers
    if len(shards) >= slots:
        mine, keep = shards[slot::slots], None
    elif max(count for _, count in shards) > slot:
        mine, keep = shards, slot
    else:
        raise DataError(f"{world_size} ranks x {workers} workers: more loader slots than samples in any of the "
                        f"{len(shards)} shards; use fewer data.num_workers")
    rng = random.Random(f"{seed}/{rank}/{worker}/{start_step}")

    def resampled():
        while True:
            url, count = rng.choice(mine)
            for i, sample in enumerate(read_shard(url, count)):
                if keep is None or i % slots == keep:
                    yield sample

    yield from wds.shuffle(SHUFFLE_BUFFER, SHUFFLE_BUFFER, rng=rng)(resampled())


def _collate(samples: list[tuple[np.ndarray, int | None]], normalizer: Normalizer):
    x = normalizer.to_model(torch.from_numpy(np.stack([x for x, _ in samples])))  # (B, C, H, W) or (B, D)
    labels = None if samples[0][1] is None else torch.tensor([y for _, y in samples], dtype=torch.long)
    return x, labels


def make_loader(url: str, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Endless batches (x, labels) from the dataset at `url` (see scmlab.data.manifest): x float32 in model space
    ((B, C, H, W) images in [-1, 1], or (B, D) normalized vectors), labels (B,) long or None (unconditional)."""
    manifest = read_manifest(url)
    shape, num_classes = tuple(manifest["shape"]), int(manifest["num_classes"])
    pipeline = wds.DataPipeline(
        functools.partial(_slot_samples, shard_list(url, manifest), seed, rank, world_size, start_step),
        wds.map(functools.partial(decode, shape=shape, num_classes=num_classes)),
        wds.batched(batch_size, collation_fn=functools.partial(_collate, normalizer=Normalizer(manifest)),
                    partial=False),
    )
    if num_workers == 0:
        return iter(pipeline)
    return iter(torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers))
