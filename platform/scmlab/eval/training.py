"""Evaluation during training (the `eval` config section): the training loop's hook, and what the driver checks and
prepares before any worker starts.

Every eval.every steps (and at the last step) each rank draws its share of eval.n samples per sampler from the EMA
network in eval mode, with noise fixed by eval.seed (the same samples' noise at every evaluation and for any number
of ranks; scmlab.eval.generate), computes their features, and the statistics and features are gathered
(all_reduce of the float64 sums, all_gather of kept features), so evaluation time falls with the number of workers.
Rank 0 computes the metrics against the cached reference statistics, every rank gets them (they are reported to
Ray Train with the checkpoint, whose `CheckpointConfig(checkpoint_score_attribute=eval.best, "min")` keeps the
best), and rank 0 logs them to MLflow at the step, with the floor and `time/eval_s`. When eval.best improves, the
run is tagged `checkpoint.best` (URI), `checkpoint.best_step`, `checkpoint.best_metric` and `checkpoint.best_value`;
the best so far is stored in every checkpoint, so a resumed run keeps it.
"""

import logging
import time

import torch

from .. import data
from ..config import Config, ConfigError
from . import EvalError
from .generate import generated
from .metrics import FEATURES, default_metrics, unusable
from .suite import Suite

log = logging.getLogger(__name__)


def reference_url(config: Config) -> str:
    return config.eval.reference or config.data.train


def metrics(config: Config, manifest: dict) -> list[str]:
    return config.eval.metrics or default_metrics(manifest)


def check(config: Config, manifest: dict) -> None:
    """What evaluation needs, checked before any worker starts (errors name the eval field): the reference and
    test datasets hold data like data.train's, the metrics suit them, eval.best is one of the logged keys, the
    Inception weights exist."""
    e = config.eval
    for field, url in (("eval.reference", e.reference), ("eval.test", e.test)):
        if url:
            other = data.read_manifest(url)
            for key in ("kind", "shape", "num_classes"):
                if other.get(key) != manifest.get(key):
                    raise ConfigError(f"{field}: {url} holds {key} {other.get(key)}, data.train "
                                      f"{manifest.get(key)}; give the same dataset (or its test split)")
    chosen = metrics(config, manifest)
    for metric in chosen:
        if why := unusable(metric, manifest):
            raise ConfigError(f"eval.metrics: {why}")
    if e.best and (key := e.best.split("/")[1]) not in chosen:  # EvalConfig admits only keys named as their metric
        raise ConfigError(f"eval.best: {e.best} is not logged: eval.metrics is {chosen}; add {key}")
    if any(FEATURES[m] == "inception" for m in chosen):
        from .inception import InceptionV3, default_weights

        try:
            if e.inception:
                InceptionV3(e.inception)
            else:
                default_weights()
        except FileNotFoundError as error:
            raise ConfigError(f"eval.inception: {error}") from None


def prepare(config: Config) -> None:
    """Make what evaluations read, once, in the driver: the fd classifier and its reference (and test) statistics,
    cached next to the shards, so that no worker computes them. Inception statistics are left to the first
    evaluation, on rank 0's device: a driver on a CPU head would take hours where a GPU takes a minute."""
    if not config.eval.every:
        return
    chosen = [m for m in metrics(config, data.read_manifest(reference_url(config))) if FEATURES[m] != "inception"]
    if chosen:
        log.info("evaluation: the cached classifier and reference statistics of %s", reference_url(config))
        Suite(chosen, reference_url(config), test_url=config.eval.test, batch_size=config.eval.batch_size,
              progress=True)


class TrainingEval:
    """The loop's evaluation hook on one rank (every rank builds one: it takes part in the collectives)."""

    def __init__(self, config: Config, manifest: dict, *, rank: int, world_size: int, device: torch.device):
        self.config, self.manifest, self.rank, self.device = config, manifest, rank, device
        self.world_size = world_size
        self.distributed = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        self.samplers = config.eval_samplers()
        url, e = reference_url(config), config.eval
        chosen = metrics(config, data.read_manifest(url))

        def suite(references: bool) -> Suite:
            return Suite(chosen, url, test_url=e.test, inception=e.inception or None, device=device,
                         batch_size=e.batch_size, seed=e.seed, references=references)

        self.suite = suite(True) if rank == 0 else None  # rank 0 first: it makes the classifier if it is missing
        if self.distributed:
            torch.distributed.barrier()
        self.suite = self.suite or suite(False)
        self.best: dict | None = None  # {"value", "step", "checkpoint"}
        self.improved = False

    def due(self, step: int, done: bool) -> bool:
        return step % self.config.eval.every == 0 or done

    def __call__(self, net: torch.nn.Module, step: int, run) -> dict[str, float]:
        """Score the EMA network `net` at `step` (a collective); rank 0 logs to `run`. Returns the metrics."""
        e, t0 = self.config.eval, time.perf_counter()
        was_training = net.training
        net.eval()
        values = {}
        try:
            for name, steps in self.samplers.items():
                batches = generated(net, self.config, self.manifest, n=e.n, steps=steps, seed=e.seed,
                                    batch_size=e.batch_size, device=self.device, rank=self.rank,
                                    world_size=self.world_size)
                values.update(self.suite.score(batches, name, distributed=self.distributed))
        finally:
            net.train(was_training)
        values["time/eval_s"] = time.perf_counter() - t0
        if self.rank == 0:
            values.update(self.suite.floor)
            log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in values.items()))
            run.log_metrics(values, step=step)
        self.improved = False
        if e.best:
            if e.best not in values:
                raise EvalError(f"eval.best: {e.best} was not computed (got {sorted(values)})")
            if self.best is None or values[e.best] < self.best["value"]:
                self.best, self.improved = {"value": values[e.best], "step": step, "checkpoint": None}, True
        return values

    def saved(self, step: int, uri: str | None, run) -> None:
        """After the checkpoint of `step` is saved (as `uri`): tag it in MLflow if its score is the best so far."""
        if self.improved and self.best["step"] == step:
            self.best["checkpoint"] = uri
            if self.rank == 0:
                run.set_tags({"checkpoint.best": uri, "checkpoint.best_step": str(step),
                              "checkpoint.best_metric": self.config.eval.best,
                              "checkpoint.best_value": f"{self.best['value']:.6g}"})

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict | None) -> None:
        self.best = (state or {}).get("best")
