"""Reference statistics: the features of a dataset split, computed once and cached next to its shards.

`reference(url, extractor)` returns the split's Features (Gaussian statistics of every sample, a fixed random
subset of KEEP features for kid / prdc / energy / swd, and the classifier's accuracy on the split's labels). They are
stored at `URL/eval/reference-EXTRACTOR.npz`, locally or in S3 (one PUT: whole or absent), with their key: the
dataset checksum (scmlab.data.checksum: every shard's sha256), the split, the extractor and the sha256 of its
weights. Every evaluation and every worker reads that file; when the key no longer matches (the data were
prepared again, the classifier retrained, other Inception weights), the statistics are computed again and the
file replaced.
"""

import io
import json
import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import data
from ..data.manifest import location
from .features import Accumulator, Features
from .frechet import GaussianStats

log = logging.getLogger(__name__)

KEEP = 10_000  # features kept per split (the PRDC paper's sample size; KID draws subsets of 1000 from them)
FORMAT = "scmlab-reference/1"


def cache_url(url: str, extractor) -> str:
    return data.join_url(location(url), f"eval/reference-{extractor.name}.npz")


def key(manifest: dict, extractor) -> dict:
    return {"format": FORMAT, "dataset": data.checksum(manifest), "split": manifest.get("split", "train"),
            "extractor": extractor.name, "extractor_sha256": extractor.sha256}


def reference(url: str, extractor, *, batch_size: int = 256, progress: bool = False) -> Features:
    """The Features of the dataset at `url` under `extractor`: from the cache when its key matches, else computed
    (and stored)."""
    manifest = data.read_manifest(url)
    wanted, where = key(manifest, extractor), cache_url(url, extractor)
    try:
        with data.open_url(where) as f:
            found = np.load(io.BytesIO(f.read()), allow_pickle=False)
        if json.loads(str(found["key"])) == wanted:
            log.info("reference statistics %s (%d samples)", where, int(found["n"]))
            return _features(found, extractor.device)
        log.info("%s was computed for other data or features: computing it again", where)
    except FileNotFoundError:
        pass
    features = compute(url, extractor, manifest, batch_size=batch_size, progress=progress)
    blob = io.BytesIO()
    stats = features.stats.state_dict()
    np.savez(blob, key=json.dumps(wanted), n=stats["n"], s1=stats["s1"].numpy(), s2=stats["s2"].numpy(),
             kept=features.kept.cpu().numpy(), accuracy=np.nan if features.accuracy is None else features.accuracy)
    try:
        data.write_bytes(where, blob.getvalue())
        log.info("reference statistics of %s (%s) -> %s", url, extractor.name, where)
    except (OSError, ValueError) as e:  # a read-only dataset: evaluate anyway, recompute next time
        log.warning("could not cache the reference statistics at %s (%s); they will be computed again next time",
                    where, e)
    return features


def compute(url: str, extractor, manifest: dict, *, batch_size: int = 256, progress: bool = False) -> Features:
    """Features of every sample of the dataset (and of a fixed random subset of KEEP, seed 0)."""
    count = int(manifest["count"])
    chosen = torch.zeros(count, dtype=torch.bool)
    chosen[torch.randperm(count, generator=torch.Generator().manual_seed(0))[:KEEP]] = True
    accumulator = Accumulator(extractor.dim, extractor.device, keep=True)
    start = 0
    with tqdm(total=count, desc=f"reference {extractor.name} features", unit="sample", disable=not progress) as bar:
        for x, labels in data.read_batches(url, batch_size):
            index = torch.arange(start, start + len(x))
            accumulator.update(*extractor(x), labels, index, keep=chosen[index])
            start += len(x)
            bar.update(len(x))
    return accumulator.result()


def _features(found, device) -> Features:
    stats = GaussianStats.from_state_dict({"n": int(found["n"]), "s1": torch.from_numpy(found["s1"]),
                                           "s2": torch.from_numpy(found["s2"])}, device)
    accuracy = float(found["accuracy"])
    return Features(stats, torch.from_numpy(found["kept"]).to(device), None if np.isnan(accuracy) else accuracy)
