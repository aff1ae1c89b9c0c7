"""make_loader: an endless, reproducible stream of model-space batches from a shard dataset.

Streams. Each (rank, DataLoader worker) pair is one stream: S = world_size x max(num_workers, 1) of them, stream
s = rank x workers + worker. Epoch e orders the selected shards by a permutation drawn from (seed, e), the same on
every rank, and lays their N samples end to end; stream s takes positions [s L, (s + 1) L), L = N // S. So within an
epoch the streams read disjoint samples and each yields exactly L of them: every rank yields the same number of
batches and DDP never waits on a rank that ran dry. The N mod S < S samples at the end of an epoch's order are left
to other epochs, whose orders differ. Epochs follow one another without end. A stream whose range starts inside a
shard reads and drops that shard's earlier samples (tar has no index): at most one shard per stream per epoch, so
keep several shards per stream (shards >= world size x workers at least).

Order within an epoch: each stream shuffles its L samples through a buffer (drained at the epoch's end, so epochs
stay disjoint) seeded by (seed, rank, worker, start_step). A run resumed at step k starts each stream at the
epoch and position that the uninterrupted run's worker would have reached after k steps (the DataLoader takes
batches from its workers in turn), so it does not replay the run's first batches; there is no other state to
restore, and the reseeded shuffle makes the restart statistically, not bitwise, equivalent (DESIGN section 7).

Bad samples (truncated or corrupt shards, undecodable or misshapen samples): on_error="raise" stops with a
DataError naming shard and key; on_error="skip" drops them, logs a warning, and counts them in `Loader.skipped`.
Object storage that stays unreachable past its retry budget always raises (scmlab.data.s3.StorageError).
"""

import contextlib
import logging
import random
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds

from .manifest import read_manifest, shard_list
from .normalize import Normalizer
from .shards import DataError, decode, read_shard

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 2000  # samples; a shard is read in stored order, so this is the span over which order is mixed
ON_ERROR = ("raise", "skip")


def epoch_order(shards: list[tuple[str, int]], seed: int, epoch: int) -> list[tuple[str, int]]:
    """The shards of `epoch` in reading order: a permutation drawn from (seed, epoch), equal on every rank."""
    order = list(shards)
    random.Random(f"{seed}/epoch/{epoch}").shuffle(order)
    return order


def pieces(order: list[tuple[str, int]], start: int, stop: int) -> Iterator[tuple[str, int, int, int]]:
    """(url, count, first, end): the samples first..end-1 of each shard that positions [start, stop) of `order`
    cover, the shards laid end to end."""
    position = 0
    for url, count in order:
        first, end = max(start - position, 0), min(stop - position, count)
        if first < end:
            yield url, count, first, end
        position += count


class _Stream(torch.utils.data.IterableDataset):
    """The batches of one rank; in each DataLoader worker, that worker's stream (see the module docstring). Yields
    (x, labels, worker, skipped), `skipped` the worker's running count of dropped samples."""

    def __init__(self, url: str, *, batch_size: int, seed: int, rank: int, world_size: int, start_step: int,
                 on_error: str):
        manifest = read_manifest(url)
        self.shards = shard_list(url, manifest)
        self.shape, self.num_classes = tuple(manifest["shape"]), int(manifest["num_classes"])
        self.normalizer = Normalizer(manifest)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.start_step, self.on_error, self.skipped = start_step, on_error, 0

    def _skip(self, error: DataError, lost: int = 1) -> None:
        if self.on_error == "raise":
            raise error
        self.skipped += lost
        log.warning("skipped %d sample(s) (%d so far): %s", lost, self.skipped, error)

    def _piece(self, url: str, count: int, first: int, end: int) -> Iterator[dict]:
        """Raw samples first..end-1 of a shard. A shard that cannot be read to `end` loses the samples not read."""
        index = 0  # of the next sample the shard yields
        try:
            with contextlib.closing(read_shard(url, count)) as samples:
                for sample in samples:
                    if index >= end:
                        break
                    if index >= first:
                        yield sample
                    index += 1
        except DataError as e:
            self._skip(e, lost=end - max(index, first))

    def _raw(self, stream: int, streams: int, position: int, rng: random.Random) -> Iterator[dict]:
        """Raw samples of `stream` from its `position` (samples since epoch 0) on, shuffled within each epoch."""
        total = sum(count for _, count in self.shards)
        length = total // streams  # L: samples per stream per epoch
        if length == 0:
            raise DataError(f"{self.world_size} ranks x {streams // self.world_size} workers = {streams} streams, "
                            f"but the dataset holds only {total} samples; use fewer data.num_workers")
        epoch, offset = divmod(position, length)
        while True:
            order = epoch_order(self.shards, self.seed, epoch)
            start = stream * length
            epoch_samples = (s for piece in pieces(order, start + offset, start + length) for s in self._piece(*piece))
            yield from wds.shuffle(SHUFFLE_BUFFER, SHUFFLE_BUFFER, rng=rng)(epoch_samples)
            epoch, offset = epoch + 1, 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batch k from worker k mod workers: after start_step steps this worker has delivered
        # ceil((start_step - worker) / workers) batches.
        delivered = max(0, -(-(self.start_step - worker) // workers))
        rng = random.Random(f"{self.seed}/{self.rank}/{worker}/{self.start_step}")
        raw = self._raw(self.rank * workers + worker, self.world_size * workers, delivered * self.batch_size, rng)
        batch = []
        for sample in raw:
            try:
                batch.append(decode(sample, self.shape, self.num_classes))
            except DataError as e:
                self._skip(e)
            if len(batch) == self.batch_size:
                yield (*self._collate(batch), worker, self.skipped)
                batch = []

    def _collate(self, samples: list[tuple[np.ndarray, int | None]]):
        x, labels = _stack(samples)
        return self.normalizer.to_model(x), labels  # (B, C, H, W) or (B, D)


class Loader:
    """Endless batches (x, labels) from make_loader. `skipped`: samples dropped under on_error="skip", summed over
    the DataLoader workers, as of the batches delivered so far (report it with the training metrics)."""

    def __init__(self, stream: _Stream, num_workers: int, pin_memory: bool = False):
        # Pinned (page-locked) batches copy to a GPU asynchronously: the DataLoader's pinning thread does it for
        # worker processes, __next__ for batches made in this process.
        self._pin_here = pin_memory and num_workers == 0
        self._batches = iter(stream) if num_workers == 0 else iter(
            torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory))
        self._skipped: dict[int, int] = {}  # worker -> its count in the latest batch it delivered

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, labels, worker, skipped = next(self._batches)
        self._skipped[int(worker)] = int(skipped)
        if self._pin_here:
            x, labels = x.pin_memory(), None if labels is None else labels.pin_memory()
        return x, labels

    @property
    def skipped(self) -> int:
        return sum(self._skipped.values())


def make_loader(url: str, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                start_step: int = 0, on_error: str = "raise", pin_memory: bool = False) -> Loader:
    """Endless batches (x, labels) from the dataset at `url` (a local path or s3:// URL; see
    scmlab.data.manifest): x float32 in model space ((B, C, H, W) images in [-1, 1], or (B, D) normalized vectors),
    labels (B,) long or None (unconditional). `on_error`: "raise" or "skip" bad samples (counted in `.skipped`).
    `pin_memory`: page-locked batches, for training on CUDA."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    stream = _Stream(url, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, start_step=start_step,
                     on_error=on_error)
    return Loader(stream, num_workers, pin_memory)


def read_batches(url: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Every sample of the dataset at `url` once, in stored order, in data space (images (B, C, H, W) in [-1, 1],
    vectors (B, D) in original units), with labels (B,) or None: what evaluation computes reference statistics of."""
    manifest = read_manifest(url)
    shape, num_classes = tuple(manifest["shape"]), int(manifest["num_classes"])
    batch = []
    for shard, count in shard_list(url, manifest):
        for sample in read_shard(shard, count):
            batch.append(decode(sample, shape, num_classes))
            if len(batch) == batch_size:
                yield _stack(batch)
                batch = []
    if batch:
        yield _stack(batch)


def _stack(samples: list[tuple[np.ndarray, int | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = torch.from_numpy(np.stack([x for x, _ in samples]))
    labels = None if samples[0][1] is None else torch.tensor([y for _, y in samples], dtype=torch.long)
    return x, labels
