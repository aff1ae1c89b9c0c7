"""One evaluation setup (`Suite`): metrics, their feature extractors, the reference features and the real-vs-real
floor, built once; `score` then rates a stream of samples (a sampler's), alone or across the ranks of a process
group.

The floor is each metric of the reference's test split (`scmlab prepare CARD --split test`) scored as if it were
generated, against the same train reference: what two real sets of the data score. It is logged beside every score
as `eval/<key>/floor`. Its sample count is the test split's, which matters for the metrics that are biased in the
number of samples (fid and fd grow as n shrinks; kid is unbiased).
"""

import logging
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from .. import data
from . import EvalError
from .features import Accumulator, load_extractor
from .metrics import FEATURES, KEEPS, score, unusable
from .reference import reference

log = logging.getLogger(__name__)


class Suite:
    """`metrics` (scmlab.eval.metrics) of samples against the dataset at `reference_url`. `test_url`: its test split,
    for the floor. `references=False` (the ranks other than 0 of a distributed evaluation) loads the extractors
    only: such a suite collects features for `score` and returns the metrics that rank 0 computes."""

    def __init__(self, metrics: list[str], reference_url: str, *, test_url: str = "", inception: str | None = None,
                 device="cpu", batch_size: int = 256, seed: int = 0, progress: bool = False, references: bool = True):
        self.manifest = data.read_manifest(reference_url)
        for metric in metrics:
            if metric not in FEATURES:
                raise EvalError(f"metric {metric!r}: not one of {', '.join(FEATURES)}")
            if why := unusable(metric, self.manifest):
                raise EvalError(f"metric {metric}: {why}")
        self.metrics, self.seed, self.batch_size, self.url = list(metrics), seed, batch_size, reference_url
        names = sorted({FEATURES[m] for m in metrics})
        self.extractors = {name: load_extractor(name, reference_url, self.manifest, device=device,
                                                inception=inception, progress=progress) for name in names}
        self.references = {name: reference(reference_url, ext, batch_size=batch_size, progress=progress)
                           for name, ext in self.extractors.items()} if references else {}
        self.test_url, self.floor = test_url, {}
        if test_url and references:
            test = data.read_manifest(test_url)
            for field in ("kind", "shape", "num_classes"):
                if test.get(field) != self.manifest.get(field):
                    raise EvalError(f"{test_url}: its {field} {test.get(field)} differs from the reference's "
                                    f"{self.manifest.get(field)} ({reference_url}); give the same dataset's test split")
            self.floor = self._metrics({name: reference(test_url, ext, batch_size=batch_size, progress=progress)
                                        for name, ext in self.extractors.items()}, "floor")

    def score(self, batches: Iterable, sampler: str, *, distributed: bool = False, progress: bool = False,
              total: int | None = None) -> dict[str, float]:
        """{eval/<key>/<sampler>: value} of the samples in `batches` ((x, labels, index) in data space). With
        `distributed`, every rank of the default process group calls it with its share, and every rank gets the
        metrics of all the samples."""
        keep = {FEATURES[m] for m in self.metrics if m in KEEPS}
        accumulators = {name: Accumulator(ext.dim, ext.device, name in keep) for name, ext in self.extractors.items()}
        for x, labels, index in tqdm(batches, desc=f"{sampler}: generate + features", unit="batch", total=total,
                                     disable=not progress):
            for name, extractor in self.extractors.items():
                accumulators[name].update(*extractor(x), labels, index)
        features = {name: a.result(distributed) for name, a in accumulators.items()}
        metrics = self._metrics(features, sampler) if self.references else {}
        if distributed:
            shared = [metrics]
            torch.distributed.broadcast_object_list(shared, src=0)
            metrics = shared[0]
        return metrics

    def _metrics(self, features: dict, sampler: str) -> dict[str, float]:
        values = {}
        for metric in self.metrics:
            name = FEATURES[metric]
            for key, value in score(metric, features[name], self.references[name], self.seed).items():
                values[f"eval/{key}/{sampler}"] = value
        return values

    def describe(self) -> dict:
        """What the scores are measured against: the reference dataset and the extractors (for the JSON)."""
        extractors = {}
        for name, ext in self.extractors.items():
            extractors[name] = {"sha256": ext.sha256, **({"path": ext.path} if hasattr(ext, "path") else {}),
                                **({"held_out_accuracy": ext.info["accuracy"]} if hasattr(ext, "info") else {})}
        return {"data": self.url, "dataset": data.checksum(self.manifest), "split": self.manifest.get("split", "train"),
                "count": self.manifest["count"], "test": self.test_url or None, "extractors": extractors}
