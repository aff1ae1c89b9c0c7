"""WebDataset tar shards: encode, write, read back and decode samples.

A sample is a group of tar members sharing a key: `KEY.png` (an image, uint8, 1 or 3 channels) or `KEY.npy`
(a float32 vector in original units), and optionally `KEY.cls` (the class index as text). Shards are plain tar
files, so stock webdataset and `tar -tf` read them. Reading checks what a streaming reader cannot see by itself: a
shard that ends early (its sample count against the manifest's) and samples whose shape disagrees with the manifest;
every error names the shard URL and the sample key. Storage that cannot be reached (or refuses the credentials) is
not a data error: its StorageError / PermissionError passes through as raised.
"""

import io
import tarfile
from collections.abc import Iterator

import numpy as np
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext

from .s3 import StorageError
from .storage import open_url


class DataError(ValueError):
    """A dataset that cannot be read as its manifest describes."""


def encode(x: np.ndarray, label: int | None) -> dict[str, bytes]:
    """Tar members of one sample: an (H, W, C) uint8 image -> png, a (D,) vector -> npy (float32)."""
    buf = io.BytesIO()
    if x.dtype == np.uint8:
        Image.fromarray(x[:, :, 0] if x.shape[2] == 1 else x).save(buf, format="png")
        member = "png"
    else:
        np.save(buf, x.astype(np.float32))
        member = "npy"
    return {member: buf.getvalue()} | ({"cls": str(int(label)).encode()} if label is not None else {})


def write_shard(path: str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write (key, members) pairs as one tar. A fixed integer mtime makes the same data give the same bytes (and
    sha256), and spares a pax header per member (tarfile writes one for a float mtime)."""
    with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as writer:
        for key, members in samples:
            writer.write({"__key__": key} | members)


def read_shard(url: str, count: int | None = None) -> Iterator[dict]:
    """Samples of one shard as dicts {"__key__", "__url__", member: bytes}, in stored order.

    With `count` (from the manifest), a shard holding fewer or more samples is an error: a tar cut at a member
    boundary reads cleanly to the cut, so the count is the only sign of truncation there.
    """
    key, sample, n = None, None, 0  # key: of the member being read
    try:
        with open_url(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                key, ext = base_plus_ext(member.name)
                if not member.isfile() or key is None:
                    continue
                data = tar.extractfile(member).read()
                if sample is None or key != sample["__key__"]:
                    if sample is not None:
                        yield sample
                        n += 1
                    sample = {"__key__": key, "__url__": url}
                sample[ext.lower()] = data
    except (StorageError, PermissionError):
        raise
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"shard {url}: unreadable at key {key!r}: {e} (truncated or corrupt; check it with "
                        f"scmlab.data.verify)") from e
    if sample is not None:
        yield sample
        n += 1
    if count is not None and n != count:
        raise DataError(f"shard {url}: {n} samples, the manifest says {count} (last key {key!r}); the shard is "
                        f"truncated or does not belong to this manifest")


def decode(sample: dict, shape: tuple[int, ...], num_classes: int) -> tuple[np.ndarray, int | None]:
    """(x, label) of a raw sample: images as (C, H, W) float32 in [-1, 1], vectors as float32 in original units.
    Errors name the shard and the key."""
    where = f"shard {sample['__url__']}, key {sample['__key__']!r}"
    try:
        if "png" in sample:
            with Image.open(io.BytesIO(sample["png"])) as img:
                pixels = np.asarray(img)
            pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
            x = pixels.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1  # (H, W, C) -> (C, H, W)
        elif "npy" in sample:
            x = np.load(io.BytesIO(sample["npy"]), allow_pickle=False).astype(np.float32)
        else:
            raise DataError(f"{where}: no png or npy member (members: {sorted(k for k in sample if k[0] != '_')})")
        if num_classes and "cls" not in sample:
            raise DataError(f"{where}: no cls member, but the manifest has {num_classes} classes")
        label = int(sample["cls"]) if num_classes else None
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{where}: corrupt sample: {e}") from e
    if x.shape != shape:
        raise DataError(f"{where}: shape {list(x.shape)} differs from the manifest's {list(shape)}")
    if label is not None and not 0 <= label < num_classes:
        raise DataError(f"{where}: class {label} outside [0, {num_classes})")
    return x, label
