"""Data: dataset cards and readers -> WebDataset shards + manifest.json -> model-space batches.

    prepare("toy-gmm", out="shards/toy-gmm")          # datasets/toy-gmm.yaml; also npy:FILE, folder:DIR
    prepare("digits", out="s3://bucket/digits")       # uploaded; re-running resumes an interrupted upload
    loader = make_loader("s3://bucket/digits", batch_size=256, seed=0, rank=r, world_size=w, num_workers=2)
    x, labels = next(loader)                           # x in model space; Normalizer(manifest).to_data maps back

Dataset locations are URLs read through `open_url` (scmlab.data.storage): local paths, file:// and s3:// (boto3,
streamed; endpoint and credentials from the AWS environment, or `configure_s3`).
"""

from .cards import load_card
from .loader import Loader, make_loader, read_batches
from .manifest import checksum, read_manifest, verify
from .normalize import Normalizer
from .prepare import prepare
from .s3 import StorageError, configure_s3
from .shards import DataError
from .storage import join_url, open_url, register_scheme, write_bytes

__all__ = ["DataError", "Loader", "Normalizer", "StorageError", "checksum", "configure_s3", "join_url", "load_card",
           "make_loader", "open_url", "prepare", "read_batches", "read_manifest", "register_scheme", "verify",
           "write_bytes"]
