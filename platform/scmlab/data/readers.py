"""Readers of raw datasets, keyed by the `reader.type` of a dataset card (datasets/*.yaml).

Each reader takes the card's reader arguments and returns a `Raw`: images as (H, W, C) uint8, vectors as (D,) float.
"""

import functools
import gzip
import os
import pickle
import struct
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from . import toys
from .raw import Raw
from .shards import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def local_path(path: str) -> str:
    """`path` with ~ and $VARS expanded; an error naming it if it does not exist."""
    expanded = os.path.expanduser(os.path.expandvars(str(path)))
    if not os.path.exists(expanded):
        raise FileNotFoundError(f"not found: {expanded}")
    return expanded


def _labels(labels, n: int, where: str) -> np.ndarray:
    """Class indices as (N,) int64, checked against the number of samples."""
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(labels) != n or (n and labels.min() < 0):
        raise DataError(f"{where}: expected {n} class indices >= 0, got {len(labels)} (min {labels.min(initial=0)})")
    return labels


def _idx_array(path: str) -> np.ndarray:
    """An IDX file of unsigned bytes (LeCun's MNIST format: 2 zero bytes, type 0x08, ndim, big-endian dims, data)."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != np.prod(dims):
        raise DataError(f"{path}: {body.size} bytes of data for dims {dims}; the file is truncated")
    return body.reshape(dims)


def idx(images: str, labels: str | None = None) -> Raw:
    """MNIST-format IDX files (optionally gzipped), e.g. Fashion-MNIST from the Debian package dataset-fashion-mnist."""
    x = _idx_array(local_path(images))[..., None]  # (N, H, W) -> (N, H, W, 1)
    if labels is None:
        return Raw(x)
    y = _labels(_idx_array(local_path(labels)), len(x), labels)
    return Raw(x, y, int(y.max()) + 1)


def cifar10(path: str, split: str = "train") -> Raw:
    """The official CIFAR-10 python archive (cifar-10-python.tar.gz): pickled batches data_batch_1..5 (train) and
    test_batch (test), each {b"data": (10000, 3072) uint8 rows of R, G, B planes, b"labels": [...]}.
    The batches are pickles, as published: they are read with `_BatchUnpickler`, which builds numpy arrays and
    plain values only, so a crafted archive cannot run code."""
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    if split not in names:
        raise DataError(f"cifar10: split must be one of {list(names)}, got {split!r}")
    with tarfile.open(local_path(path), "r:gz") as tar:
        members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
        missing = [n for n in names[split] if n not in members]
        if missing:
            raise DataError(f"{path}: no {missing} in the archive; is it cifar-10-python.tar.gz?")
        batches = [_cifar_batch(tar.extractfile(members[n]), f"{path}: {members[n].name}") for n in names[split]]
    x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # -> NHWC
    y = np.concatenate([b[b"labels"] for b in batches])
    return Raw(np.ascontiguousarray(x), _labels(y, len(x), path), 10)


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR-10 batches: the only globals it resolves are those that rebuild numpy arrays (as
    numpy 1 and 2 pickle them) and `_codecs.encode` (bytes in protocol-2 pickles written by Python 3). Anything else
    (os.system, builtins.eval, ...) is refused before it is called."""

    def find_class(self, module: str, name: str):
        allowed = _cifar_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return allowed[module, name]


@functools.cache
def _cifar_globals() -> dict:
    import codecs

    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 : numpy 1
    reconstruct, frombuffer = core.multiarray._reconstruct, core.numeric._frombuffer
    return {("numpy.core.multiarray", "_reconstruct"): reconstruct, ("numpy._core.multiarray", "_reconstruct"):
            reconstruct, ("numpy.core.numeric", "_frombuffer"): frombuffer, ("numpy._core.numeric", "_frombuffer"):
            frombuffer, ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"):
            codecs.encode}


def _cifar_batch(f, where: str) -> dict:
    """One batch, checked: {b"data": (N, 3072) uint8, b"labels": N integers, ...}."""
    try:
        batch = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{where}: not a CIFAR-10 batch: {e}") from None
    x = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3072):
        raise DataError(f"{where}: b'data' must be an (N, 3072) uint8 array")
    if not (isinstance(labels, list) and all(isinstance(k, int) for k in labels)):
        raise DataError(f"{where}: b'labels' must be a list of integers")
    return batch


DIGITS_TEST = 297  # held out: 1500 train images remain


def digits_test_index() -> np.ndarray:
    """The held-out digits: DIGITS_TEST indices of the 1797, drawn once at random with seed 0 (sorted), so that test
    and train come from the same writers and the same collection (a real-vs-real floor, not a shift)."""
    return np.sort(np.random.default_rng(0).permutation(1797)[:DIGITS_TEST])


def digits(split: str = "train") -> Raw:
    """scikit-learn's 8x8 digits (1797 images, 10 classes); pixel values 0..16 scaled to 0..255. There is no published
    split of this copy (it is UCI's test set): `test` is a fixed random slice of DIGITS_TEST images
    (`digits_test_index`), `train` the other 1500, `all` the 1797; each in stored order."""
    from sklearn.datasets import load_digits

    test = np.zeros(1797, bool)
    test[digits_test_index()] = True
    slices = {"train": ~test, "test": test, "all": np.ones(1797, bool)}
    if split not in slices:
        raise DataError(f"digits: split must be one of {list(slices)}, got {split!r}")
    data = load_digits()
    x = np.round(data.images * (255 / 16)).astype(np.uint8)[..., None]  # (N, 8, 8) -> (N, 8, 8, 1)
    return Raw(x[slices[split]], data.target.astype(np.int64)[slices[split]], 10)


class ImageFiles(Sequence):
    """Image files as (H, W, C) uint8 arrays, loaded on indexing; grayscale stays 1 channel, all else becomes RGB."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        with Image.open(self.paths[i]) as img:
            pixels = np.asarray(img.convert("L" if img.mode in ("1", "L", "I", "I;16", "F") else "RGB"))
        return pixels[:, :, None] if pixels.ndim == 2 else pixels


def folder(path: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> Raw:
    """A folder of images; with subfolders, each is a class (sorted names -> 0, 1, ...; files found recursively),
    without, the images are unlabeled."""
    root = Path(local_path(path))

    def images(d: Path) -> list[Path]:
        return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in extensions)

    classes = sorted(d for d in root.iterdir() if d.is_dir())
    if not classes:
        files = images(root)
        labels, num_classes = None, 0
    else:
        per_class = [images(d) for d in classes]
        files = [p for ps in per_class for p in ps]
        labels = np.concatenate([np.full(len(ps), k, np.int64) for k, ps in enumerate(per_class)])
        num_classes = len(classes)
    if not files:
        raise DataError(f"{root}: no images with extensions {list(extensions)}")
    return Raw(ImageFiles(files), labels, num_classes)


def npy(path: str, labels: str | None = None) -> Raw:
    """An .npy array: (N, D) vectors, or uint8 images (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3;
    optional labels from a second .npy of N class indices."""
    x = np.load(local_path(path), allow_pickle=False)
    if x.ndim == 2:
        with np.errstate(over="ignore"):  # values beyond float32's range become Inf, refused below
            x = x.astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if len(bad):
            raise DataError(f"{path}: row {bad[0]} (and {len(bad) - 1} more) holds NaN or Inf (as float32); "
                            f"drop or fix those rows")
    elif x.ndim in (3, 4):
        if x.dtype != np.uint8:
            raise DataError(f"{path}: images must be uint8 (0..255), got {x.dtype}")
        if x.ndim == 3:
            x = x[..., None]
        elif x.shape[-1] not in (1, 3):
            if x.shape[1] not in (1, 3):
                raise DataError(f"{path}: shape {x.shape} has no channel axis of size 1 or 3")
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # NCHW -> NHWC
    else:
        raise DataError(f"{path}: shape {x.shape}; expected (N, D) vectors or (N, H, W[, C]) images")
    if labels is None:
        return Raw(x)
    y = _labels(np.load(local_path(labels), allow_pickle=False), len(x), labels)
    return Raw(x, y, int(y.max()) + 1)


READERS = {
    "idx": idx,
    "cifar10": cifar10,
    "digits": digits,
    "folder": folder,
    "npy": npy,
    "gaussian": toys.gaussian,
    "gmm": toys.gmm,
    "moons": toys.moons,
    "rings": toys.rings,
}
