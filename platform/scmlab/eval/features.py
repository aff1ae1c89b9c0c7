"""Feature extractors, and what a set of samples gives each one: Gaussian statistics, the features themselves (for
the metrics that need them), the classifier's accuracy against the requested labels.

An extractor is a callable `x -> (features (B, D), logits (B, classes) or None)` on data-space batches, with a
`name`, a `dim` and the `sha256` of its weights (which keys cached reference statistics):
- `inception`: Inception-v3 pool3 (scmlab.eval.inception), for fid and kid;
- `classifier`: the dataset's own small CNN (scmlab.eval.classifier), for fd, prdc and cls_acc;
- `raw`: the samples themselves, flattened (data space: vectors in original units), for energy and swd.
"""

from dataclasses import dataclass

import torch

from .frechet import GaussianStats


class Raw:
    name, sha256 = "raw", ""

    def __init__(self, dim: int, device="cpu"):
        self.dim, self.device = dim, torch.device(device)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x.to(self.device).flatten(1).float(), None


def load_extractor(name: str, reference_url: str, manifest: dict, *, device="cpu", inception: str | None = None,
                   progress: bool = False):
    """The extractor `name` for samples scored against the dataset at `reference_url`."""
    if name == "inception":
        from .inception import InceptionV3

        return InceptionV3(inception, device)
    if name == "classifier":
        from .classifier import Classifier

        return Classifier(reference_url, device, progress)
    if name == "raw":
        return Raw(int(torch.tensor(manifest["shape"]).prod()), device)
    raise ValueError(f"unknown feature extractor {name!r}")


@dataclass
class Features:
    """What a set of samples gives one extractor. `kept`: the features themselves (some metrics need them; None
    when none does); `accuracy`: the classifier's accuracy against the samples' labels (None without)."""
    stats: GaussianStats
    kept: torch.Tensor | None = None
    accuracy: float | None = None


class Accumulator:
    """Collects one extractor's features of a stream of batches. `keep`: hold the features (with each sample's
    global index, so that the ranks' shares come back in one order)."""

    def __init__(self, dim: int, device, keep: bool):
        self.stats = GaussianStats(dim, device)
        self.keep, self.kept, self.index = keep, [], []
        self.correct = torch.zeros(2, dtype=torch.float64, device=device)  # (correct, labelled)

    def update(self, features: torch.Tensor, logits: torch.Tensor | None, labels: torch.Tensor | None,
               index: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Add a batch: features (B, D), logits (B, classes) or None, labels (B,) or None, the samples' global
        indices (B,); `keep`: a boolean mask of the rows to hold (default: all, when this accumulator keeps any)."""
        self.stats.update(features)
        if self.keep:
            rows = slice(None) if keep is None else keep.to(features.device)
            self.kept.append(features[rows].float())
            self.index.append(index.to(features.device)[rows])
        if logits is not None and labels is not None:
            self.correct += torch.tensor([float((logits.argmax(1) == labels.to(logits.device)).sum()),
                                          float(labels.numel())], dtype=torch.float64, device=self.correct.device)

    def result(self, distributed: bool = False) -> Features:
        """The collected Features; with `distributed`, those of every rank of the default process group (a
        collective: every rank calls it, and every rank gets the whole)."""
        dim = self.stats.s1.shape[0]
        kept = torch.cat(self.kept) if self.kept else torch.zeros(0, dim, device=self.stats.s1.device)
        index = torch.cat(self.index) if self.index else torch.zeros(0, dtype=torch.long, device=kept.device)
        if distributed:
            self.stats.all_reduce()
            torch.distributed.all_reduce(self.correct)
            if self.keep:
                kept, index = _all_gather(kept), _all_gather(index)
        if self.keep:
            kept = kept[index.argsort()]
        accuracy = float(self.correct[0] / self.correct[1]) if self.correct[1] > 0 else None
        return Features(self.stats, kept if self.keep else None, accuracy)


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `t` along dim 0 (ranks may hold different counts: padded for the collective)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([t.shape[0]], device=t.device))
    most = int(max(c.item() for c in counts))
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(c.item())] for p, c in zip(parts, counts)])
