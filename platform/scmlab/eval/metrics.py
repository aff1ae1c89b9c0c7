"""The metrics, by name: which features each one needs, the keys it logs, and how it compares generated features
with reference features.

| metric | features | logs (eval/KEY/SAMPLER) | better |
| fid | inception | fid: Frechet distance of Inception pool3 statistics (Heusel et al. 2017) | lower |
| kid | inception | kid: unbiased polynomial-kernel MMD^2 (Binkowski et al. 2018) | lower |
| fd | classifier | fd: Frechet distance of the dataset classifier's features; cls_acc for labelled samples | lower |
| prdc | classifier | precision, recall (Kynkaanniemi et al. 2019), density, coverage (Naeem et al. 2020) | higher |
| energy | raw | energy: energy distance of the samples themselves (Szekely & Rizzo) | lower |
| swd | raw | swd: sliced 2-Wasserstein distance of the samples themselves | lower |
"""

from ..config import EVAL_METRICS
from .distances import energy_distance, sliced_wasserstein
from .features import Features
from .frechet import frechet_of
from .kid import kid
from .prdc import prdc

FEATURES = {"fid": "inception", "kid": "inception", "fd": "classifier", "prdc": "classifier", "energy": "raw",
            "swd": "raw"}
KEEPS = ("kid", "prdc", "energy", "swd")  # need the features themselves, not only their statistics
assert set(FEATURES) == set(EVAL_METRICS)


def score(metric: str, generated: Features, reference: Features, seed: int = 0) -> dict[str, float]:
    """{key: value} of `metric` for generated features against reference features (the same extractor's)."""
    if metric in ("fid", "fd"):
        values = {metric: frechet_of(generated.stats, reference.stats)}
        if metric == "fd" and generated.accuracy is not None:
            values["cls_acc"] = generated.accuracy
        return values
    g, r = generated.kept, reference.kept.to(generated.kept.device)
    if metric == "kid":
        return {"kid": kid(g, r, seed=seed)}
    if metric == "prdc":
        return prdc(r, g)
    if metric == "energy":
        return {"energy": energy_distance(g, r)}
    if metric == "swd":
        m = min(len(g), len(r))  # the 1-D W2 pairs sorted projections: equal counts
        return {"swd": sliced_wasserstein(g[:m], r[:m], seed=seed)}
    raise ValueError(f"unknown metric {metric!r}; metrics: {', '.join(FEATURES)}")


def default_metrics(manifest: dict) -> list[str]:
    """What eval.metrics = [] means: fd for labelled images, energy for anything else."""
    return ["fd"] if manifest["kind"] == "image" and manifest.get("num_classes") else ["energy"]


def unusable(metric: str, manifest: dict) -> str | None:
    """Why `metric` cannot score samples of this dataset (None if it can)."""
    if FEATURES.get(metric) == "inception" and (manifest["kind"] != "image" or manifest["shape"][0] not in (1, 3)):
        return f"{metric} scores images with 1 or 3 channels (Inception-v3), not {manifest['kind']}s " \
               f"{manifest['shape']}; use energy or swd"
    if FEATURES.get(metric) == "classifier" and (manifest["kind"] != "image" or not manifest.get("num_classes")):
        return f"{metric} uses a classifier trained on the dataset's labels: it needs labelled images, not " \
               f"{manifest['kind']}s with {manifest.get('num_classes', 0)} classes; use energy or swd"
    return None
