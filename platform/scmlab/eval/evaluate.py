"""`scmlab evaluate`: score a checkpoint's samplers, or a sample file, against a dataset; the result as a dict
(the CLI's JSON) and a short table.

A consistency checkpoint (sct / scd) is scored per number of steps (`1step`, `2step`), a diffusion checkpoint with
its PF-ODE sampler at each number of Heun steps (`ode18`), a sample file as `samples`. The EMA weights sample, in
eval mode, from noise fixed by the seed (scmlab.eval.generate).
"""

import logging
import math

from .. import data
from ..config import Config, samplers
from ..train import checkpoint
from ..train.samples import ema_model
from . import EvalError
from .generate import from_file, generated
from .metrics import default_metrics
from .suite import Suite

log = logging.getLogger(__name__)


def check_same_data(trained_on: dict, url: str, manifest: dict) -> None:
    """A checkpoint scored against the data at `url` must have been trained on that dataset (kind, shape,
    classes, name); other shards of it (another checksum) are only worth a warning."""
    for field in ("name", "kind", "shape", "num_classes"):
        if trained_on.get(field) != manifest.get(field):
            raise EvalError(f"--data {url}: the checkpoint was trained on {trained_on.get('name')} "
                            f"({trained_on.get('kind')} {trained_on.get('shape')}, {trained_on.get('num_classes')} "
                            f"classes); {url} holds {manifest.get('name')} ({manifest.get('kind')} "
                            f"{manifest.get('shape')}, {manifest.get('num_classes')} classes): its {field} differs")
    if data.checksum(trained_on) != data.checksum(manifest):
        log.warning("--data %s holds other shards of %s than the checkpoint was trained on (another checksum)", url,
                    manifest["name"])


def evaluate(data_url: str, *, checkpoint_path: str | None = None, samples: str | None = None,
             steps: list[int] | None = None, metrics: list[str] | None = None, n: int | None = None, seed: int = 0,
             test_url: str = "", inception: str | None = None, batch_size: int = 256, device="cpu",
             progress: bool = False) -> dict:
    """Scores of a checkpoint (`checkpoint_path`: a file, run directory or s3:// Ray checkpoint) or of a sample file
    (`samples`) against the dataset at `data_url`: {"metrics": {eval/<key>/<sampler>: value}, "floor":
    {eval/<key>/floor: value} (empty without `test_url`), "n", "seed", "samplers", "reference", "checkpoint",
    "step", "samples"}."""
    if (checkpoint_path is None) == (samples is None):
        raise EvalError("give exactly one of --checkpoint and --samples")
    manifest = data.read_manifest(data_url)
    suite = Suite(metrics or default_metrics(manifest), data_url, test_url=test_url, inception=inception,
                  device=device, batch_size=batch_size, seed=seed, progress=progress)
    result = {"metrics": {}, "floor": suite.floor, "seed": seed, "reference": suite.describe(), "checkpoint": None,
              "step": None, "samples": samples}
    if samples is not None:
        batches = list(from_file(samples, manifest, batch_size=batch_size, n=n, device=device))
        result["metrics"] = suite.score(batches, "samples", progress=progress)
        result.update(n=sum(len(b[0]) for b in batches), samplers={"samples": None})
        return result
    ckpt = checkpoint.load(checkpoint_path, map_location=device)
    check_same_data(ckpt["manifest"], data_url, manifest)
    config = Config.from_dict(ckpt["config"])
    n, chosen = n or 1000, samplers(config.objective.kind, steps or [])
    net = ema_model(ckpt).to(device)
    for name, s in chosen.items():
        batches = generated(net, config, ckpt["manifest"], n=n, steps=s, seed=seed, batch_size=batch_size,
                            device=device)
        result["metrics"].update(suite.score(batches, name, progress=progress, total=math.ceil(n / batch_size)))
    result.update(n=n, samplers=chosen, checkpoint=checkpoint_path, step=int(ckpt["step"]))
    return result


def table(result: dict) -> str:
    """The scores as a small table: a row per metric key, a column per sampler, and the floor."""
    columns = list(result["samplers"]) + (["floor"] if result["floor"] else [])
    values = {**result["metrics"], **result["floor"]}
    keys = list(dict.fromkeys(k.split("/")[1] for k in values))
    rows = [["metric", *columns]] + [[key, *(_fmt(values.get(f"eval/{key}/{c}")) for c in columns)] for key in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns) + 1)]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"
