"""Data: dataset cards and readers -> WebDataset shards + manifest.json -> model-space batches.

    prepare("toy-gmm", out="shards/toy-gmm")          # datasets/toy-gmm.yaml; also npy:FILE, folder:DIR
    loader = make_loader("shards/toy-gmm", batch_size=256, seed=0)
    x, labels = next(loader)                           # x in model space; Normalizer(manifest).to_data maps back

Dataset locations are URLs read through `open_url` (scmlab.data.storage); object stores plug in there.
"""

from .cards import load_card
from .loader import make_loader
from .manifest import read_manifest, verify
from .normalize import Normalizer
from .prepare import prepare
from .shards import DataError
from .storage import open_url, register_scheme

__all__ = ["DataError", "Normalizer", "load_card", "make_loader", "open_url", "prepare", "read_manifest",
           "register_scheme", "verify"]
