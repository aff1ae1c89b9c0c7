"""prepare(SOURCE, out=DIR or s3://bucket/prefix): raw data -> WebDataset shards NAME-000000.tar, ... and
manifest.json, written last."""

import itertools
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import urlparse

import numpy as np
from PIL import Image
from tqdm import tqdm

from . import s3
from .cards import TRAIN, load_card
from .manifest import FORMAT, MANIFEST, write_manifest
from .raw import Raw
from .readers import READERS
from .shards import DataError, encode, write_shard
from .storage import digest, file_path, join_url

log = logging.getLogger(__name__)


class Moments:
    """Running mean and variance per group (channel or dimension), merged batch by batch (Chan, Golub & LeVeque
    1979), so large offsets do not cancel as in sum-of-squares."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: np.ndarray) -> None:
        """values: (G, k), k new values for each of G groups."""
        k = values.shape[1]
        mean = values.mean(axis=1)
        m2 = ((values - mean[:, None]) ** 2).sum(axis=1)
        n = self.n + k
        delta = mean - self.mean
        self.mean = self.mean + delta * (k / n)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * k / n)
        self.n = n

    def stats(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": np.sqrt(self.m2 / self.n).tolist()}


def conform(x: np.ndarray, resolution: int | None, channels: int | None) -> np.ndarray:
    """An (H, W, C) uint8 image with the card's channels (grayscale <-> RGB) and resolution (center crop to a square,
    then Lanczos resize); unchanged when it already has them."""
    if x.shape[:2] == (resolution or x.shape[0], resolution or x.shape[1]) and x.shape[2] == (channels or x.shape[2]):
        return x
    img = Image.fromarray(x[:, :, 0] if x.shape[2] == 1 else x)
    if channels:
        img = img.convert("L" if channels == 1 else "RGB")
    if resolution and img.size != (resolution, resolution):
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.LANCZOS)
    pixels = np.asarray(img)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def _load(raw: Raw, i: int, card: dict) -> np.ndarray:
    """Sample i: an (H, W, C) uint8 image conformed to the card, or a (D,) vector."""
    x = np.asarray(raw.x[i])
    return conform(x, card.get("resolution"), card.get("channels")) if x.dtype == np.uint8 else x


def _samples(raw: Raw, n: int, card: dict, shape: tuple, num_classes: int, moments: Moments,
             bar: tqdm) -> Iterator[tuple[str, dict]]:
    """(key, tar members) of samples 0..n-1, each checked against `shape`; updates the moments and the progress."""
    for i in range(n):
        x = _load(raw, i, card)
        if x.shape != shape:
            raise DataError(f"dataset {card['name']}: sample {i} has shape {x.shape}, sample 0 {shape}; set "
                            f"`resolution` and `channels` in a card to resize images")
        if x.dtype == np.uint8:
            moments.update(x.reshape(-1, x.shape[2]).T / 127.5 - 1)  # (H, W, C) -> (C, H*W) in [-1, 1]
        else:
            moments.update(x.astype(np.float64)[:, None])  # (D,) -> (D, 1)
        bar.update()
        yield f"{i:08d}", encode(x, int(raw.labels[i]) if num_classes else None)


def _num_classes(raw: Raw, card: dict) -> int:
    num_classes = int(card.get("num_classes", raw.num_classes))
    if num_classes and raw.labels is None:
        raise DataError(f"dataset {card['name']}: num_classes is {num_classes}, but the reader gives no labels")
    if num_classes and raw.labels.max() >= num_classes:
        raise DataError(f"dataset {card['name']}: label {raw.labels.max()} >= num_classes {num_classes}")
    return num_classes


class _Directory:
    """Output to a local directory: shards written in place, the manifest (an old one removed first) last."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(os.path.join(directory, MANIFEST)):
            os.remove(os.path.join(directory, MANIFEST))

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def add(self, name: str, sha256: str, size: int) -> None:
        pass

    def finish(self, manifest: dict) -> None:
        write_manifest(self.directory, manifest)

    def close(self) -> None:
        pass


class _Upload:
    """Output to s3://bucket/prefix: each shard is written to a scratch directory and uploaded in the background
    while the next one is written (at most IN_FLIGHT at once, each deleted once stored). A shard already stored
    with the same sha256 is not sent again, so re-running an interrupted prepare resumes it; the manifest (an old
    one deleted first) is stored after every shard."""

    IN_FLIGHT = 2

    def __init__(self, url: str, progress: bool):
        self.url, self.uploaded, self.stored = url, 0, 0
        self.scratch = tempfile.TemporaryDirectory(prefix="scmlab-prepare-")
        s3.delete(join_url(url, MANIFEST))
        self.pool = ThreadPoolExecutor(self.IN_FLIGHT)
        self.pending: list[Future] = []
        self.bar = tqdm(total=0, desc=f"upload to {url}", unit="B", unit_scale=True, position=1,
                        disable=not progress)

    def path(self, name: str) -> str:
        return os.path.join(self.scratch.name, name)

    def add(self, name: str, sha256: str, size: int) -> None:
        while len(self.pending) >= self.IN_FLIGHT:
            self._collect()
        self.bar.total += size
        self.pending.append(self.pool.submit(self._put, name, sha256, size))

    def _put(self, name: str, sha256: str, size: int) -> bool:
        path = self.path(name)
        uploaded = s3.put_file(join_url(self.url, name), path, sha256=sha256, size=size, callback=self.bar.update)
        if not uploaded:
            self.bar.update(size)
        os.remove(path)
        return uploaded

    def _collect(self) -> None:
        self.uploaded += self.pending.pop(0).result()
        self.stored += 1

    def finish(self, manifest: dict) -> None:
        while self.pending:
            self._collect()
        write_manifest(self.url, manifest)
        log.info("%s: %d shards uploaded, %d already stored", self.url, self.uploaded, self.stored - self.uploaded)

    def close(self) -> None:
        """Wait for the uploads under way (stored shards are what a re-run skips), then drop the scratch files."""
        self.pool.shutdown(wait=True)  # at most IN_FLIGHT: a shard queued but not yet started is finished too
        self.bar.close()
        self.scratch.cleanup()


def _output(out: str, progress: bool) -> _Directory | _Upload:
    path = file_path(out)
    if path is not None:
        return _Directory(path)
    if urlparse(out).scheme == "s3":
        return _Upload(out, progress)
    raise DataError(f"{out}: cannot write a dataset there (local directories and s3:// prefixes only)")


def prepare(source: str, out: str, *, shard_size: int | None = None, limit: int | None = None,
            progress: bool = True, options: Mapping | None = None, split: str = TRAIN) -> dict:
    """Write the dataset SOURCE (a card name, a card file, or TYPE:PATH; see scmlab.data.cards) as shards in `out`
    (a local directory or an s3://bucket/prefix) and return the manifest. `split`: `train`, or a split the card
    lists (`test`), recorded in the manifest. `limit` keeps the first samples only; `options` override card fields
    or reader arguments; `progress` shows progress bars. Bad arguments, cards and source data (a shard size or
    limit < 1, a name that would leave `out`, non-finite vectors) are refused before `out` is touched. An old
    manifest in `out` is removed first, so an interrupted run leaves no manifest and cannot be mistaken for a whole
    dataset; re-running it into object storage uploads only the shards not already stored."""
    for flag, value in (("--shard-size", shard_size), ("--limit", limit)):
        if value is not None and int(value) < 1:
            raise DataError(f"{flag}: must be >= 1, got {value}")
    card = load_card(source, options, split)
    name, shard_size = card["name"], int(shard_size or card["shard_size"])
    reader = dict(card["reader"])
    try:
        raw = READERS[reader.pop("type")](**reader)
    except FileNotFoundError as e:
        raise DataError(f"dataset {name}: {e}. {card.get('description', '')}".strip()) from None
    n = len(raw.x) if limit is None else min(int(limit), len(raw.x))
    if n == 0:
        raise DataError(f"dataset {name}: no samples")
    num_classes = _num_classes(raw, card)
    first = _load(raw, 0, card)
    kind = "image" if first.dtype == np.uint8 else "vector"
    if kind == "vector" and first.ndim != 1:
        raise DataError(f"dataset {name}: vectors must be 1-D, got shape {first.shape}")

    output = _output(out, progress)
    try:
        moments = Moments()
        shards = []
        with tqdm(total=n, desc=f"prepare {name}", unit="sample", disable=not progress) as bar:
            samples = _samples(raw, n, card, first.shape, num_classes, moments, bar)
            for index, start in enumerate(range(0, n, shard_size)):
                shard = f"{name}-{index:06d}.tar"
                write_shard(output.path(shard), itertools.islice(samples, shard_size))
                sha256, size = digest(output.path(shard))
                output.add(shard, sha256, size)
                shards.append({"name": shard, "count": min(shard_size, n - start), "sha256": sha256, "bytes": size})
        manifest = {
            "format": FORMAT, "name": name, "source": source, "split": split, "kind": kind,
            "shape": [first.shape[2], first.shape[0], first.shape[1]] if kind == "image" else list(first.shape),
            "num_classes": num_classes, "count": n, "sigma_d": float(card["sigma_d"]), "shards": shards,
            "stats": moments.stats(), "card": card,
        }
        output.finish(manifest)
    finally:
        output.close()
    log.info("%s: %d samples in %d shards -> %s", name, n, len(shards), out)
    return manifest
