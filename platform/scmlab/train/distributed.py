"""Ray Train: the training loop on `train.workers` processes with DDP (gloo on CPU, NCCL on GPU), fault tolerant.

`fit` builds a `ray.train.torch.TorchTrainer` from the config: one worker per replica (`train.cpus_per_worker` CPUs,
and one GPU each when training on CUDA), the global batch train.batch_size split evenly over the workers, run
storage `run.storage`/`run.name` (a shared directory or s3://, through a pyarrow S3 filesystem with the data's
endpoint settings), `CheckpointConfig(num_to_keep=train.keep_checkpoints)` and
`FailureConfig(max_failures=train.max_failures)`. Each worker runs `scmlab.train.loop.train` with
`RayCheckpoints`: rank 0 writes the checkpoint, every rank calls `ray.train.report` at the same steps (it is a
barrier), and a restarted worker group resumes from `ray.train.get_checkpoint()` (also a driver restarted with the
same storage and name). The fused sCM step (objective.jvp=fused) is one call through the DDP wrapper, its tangent
outside the graph; with a separate JVP pass (autograd, fd) the JVP runs on the module inside the wrapper
(scmlab.objectives), so forward-mode AD never meets DDP's hooks; theta^- is a stop-gradient, which makes that exact.

A run whose loss keeps diverging, or whose data or config the workers cannot use, is not retried (it would fail the
same way again): the workers return the error (`NOT_RETRIED`), and `fit` raises it with the message of rank 0.
"""

import dataclasses
import functools
import logging
import os
import tempfile

import torch

from ..config import Config, ConfigError
from ..data import DataError
from . import checkpoint, mlflow_run
from .loop import TrainingDiverged, train

log = logging.getLogger(__name__)

CHECKPOINT_FILE = checkpoint.RAY_FILE
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../scmlab


def location(config: Config) -> tuple[str, object, str]:
    """(storage_path, storage_filesystem, URI of the run directory) for Ray's RunConfig. s3:// storage gets a pyarrow
    S3FileSystem whose endpoint and region come from the same variables as the data's boto3 client; credentials are
    left to the AWS chain of each process, so none is pickled into the filesystem that Ray ships and records."""
    storage = (config.run.storage or os.path.dirname(os.path.abspath(config.run.dir))).rstrip("/")
    uri = f"{storage}/{config.run.name}"
    if not storage.startswith("s3://"):
        return os.path.abspath(storage), None, os.path.join(os.path.abspath(storage), config.run.name)
    from pyarrow.fs import S3FileSystem

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return storage.removeprefix("s3://"), S3FileSystem(endpoint_override=endpoint, region=region), uri


# Failures that would recur on every restart (a diverging run, data that cannot be read, a config the data refuses):
# the workers return them instead of raising, so that Ray Train does not spend train.max_failures restarts on them.
NOT_RETRIED = (TrainingDiverged, DataError, ConfigError)


def not_retried(failed: dict) -> Exception:
    """The exception a worker returned as {"type", "message"} (see `worker`)."""
    return {cls.__name__: cls for cls in NOT_RETRIED}[failed["type"]](failed["message"])


def failure_reason(error: Exception) -> str:
    """One line for a failed Ray Train run: the first worker's own error (its last line, e.g. `DataError: ...`),
    not Ray's "Training failed due to worker errors:" header."""
    failures = getattr(error, "worker_failures", None) or {}
    text = str(next(iter(failures.values()))) if failures else str(error)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


class RayCheckpoints:
    """The loop's checkpoint store on a Ray Train worker: Ray's run storage, `step-NNNNNNNNN/checkpoint.pt`."""

    def __init__(self, rank: int, run_uri: str):
        import ray.train

        self.rank, self.run_uri = rank, run_uri
        found = ray.train.get_checkpoint()
        self.found = found
        self.latest = f"{run_uri}/{os.path.basename(found.path)}" if found is not None else None

    def restore(self, map_location="cpu") -> dict | None:
        if self.found is None:
            return None
        log.info("resuming from %s", self.latest)
        with self.found.as_directory() as directory:
            return torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location=map_location, weights_only=True)

    def save(self, state, step: int, metrics: dict) -> str:
        import ray.train

        name = f"step-{step:09d}"
        with tempfile.TemporaryDirectory() as directory:
            report = None
            if self.rank == 0:
                torch.save(state(), os.path.join(directory, CHECKPOINT_FILE))
                report = ray.train.Checkpoint.from_directory(directory)
            # Every rank, the same number of times: a barrier. Ray registers the checkpoint once it is whole in
            # storage, so an upload cut short is never the one a restart resumes from.
            # loss/mean for ASHA; eval/ scores for CheckpointConfig's checkpoint_score_attribute (eval.best)
            ray.train.report({"step": step, **{k: v for k, v in metrics.items()
                                               if k == "loss/mean" or k.startswith("eval/")}},
                             checkpoint=report, checkpoint_dir_name=name)
        self.latest = f"{self.run_uri}/{name}"
        return self.latest

    def last(self) -> str | None:
        return self.latest


def worker(loop_config: dict) -> dict:
    """A Ray Train worker: the loop on this rank's share of the batch, DDP-wrapped."""
    config = Config.from_dict(loop_config["config"])
    import ray.train
    from torch.nn.parallel import DistributedDataParallel

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("scmlab").setLevel(logging.INFO)  # the step lines; libraries stay at WARNING
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    target = mlflow_run.Target(**loop_config["target"]) if loop_config["target"] else None
    try:
        return train(config, rank=rank, world_size=world_size, wrap=DistributedDataParallel if world_size > 1 else None,
                     checkpoints=RayCheckpoints(rank, loop_config["run_uri"]),
                     tracker=functools.partial(mlflow_run.open_tracker, target))
    except NOT_RETRIED as e:  # every rank stops here at the same step (the loop agrees on it)
        log.error("%s", e)
        return {"failed": {"type": type(e).__name__, "message": str(e)}}


def connect() -> None:
    """Join the Ray cluster of RAY_ADDRESS (set inside `ray job submit` jobs), else a running local one, else start
    one in this process (ray.init's own order). The job ships the scmlab package this driver imported (a submitted
    working tree, or the installed one) to its workers, so they run the same code. A Ray that the caller started
    already is used as it is."""
    import ray

    if not ray.is_initialized():
        ray.init(runtime_env={"py_modules": [PACKAGE_DIR]})


def use_gpu(config: Config) -> bool:
    import ray

    if config.train.device != "auto":
        return config.train.device == "cuda"
    return ray.cluster_resources().get("GPU", 0) > 0


def checkpoint_config(config: Config):
    """train.keep_checkpoints checkpoints: the newest, or with eval.best the best scored (lowest) ones. Ray never
    deletes the latest checkpoint, which a restart resumes from (Ray 2.60's CheckpointManager keeps
    `latest_checkpoint_result` out of the deletions and hands it to the restarted workers)."""
    from ray.train import CheckpointConfig

    keep = config.train.keep_checkpoints or None
    if not config.eval.best:
        return CheckpointConfig(num_to_keep=keep)
    return CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute=config.eval.best,
                            checkpoint_score_order="min")


def trainer(config: Config, target: dict | None, callbacks=()):
    """The TorchTrainer of a run (config.run.dir already absolute): `worker` on train.workers processes, storage,
    checkpoint retention and restarts from the config. `target` is the MLflow run (mlflow_run.Target as a dict)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, filesystem, run_uri = location(config)
    gpu = use_gpu(config)
    log.info("Ray Train: %d worker(s) x %s, batch %d each, run %s", config.train.workers,
             "1 GPU" if gpu else f"{config.train.cpus_per_worker:g} CPU",
             config.train.batch_size // config.train.workers, run_uri)
    return TorchTrainer(
        worker,
        train_loop_config={"config": config.to_dict(), "run_uri": run_uri, "target": target},
        scaling_config=ScalingConfig(num_workers=config.train.workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": config.train.cpus_per_worker}),
        run_config=RunConfig(
            name=config.run.name, storage_path=storage_path, storage_filesystem=filesystem,
            checkpoint_config=checkpoint_config(config),
            failure_config=FailureConfig(max_failures=config.train.max_failures), callbacks=list(callbacks)),
    )


def fit(config: Config, target: mlflow_run.Target | None) -> dict:
    """Train on Ray; returns the loop's summary from rank 0, with "checkpoint" the final checkpoint copied into
    run.dir/checkpoints (what `scmlab sample` and the MLflow model read) and "ray_checkpoint" its URI in the run
    storage. Raises TrainingDiverged, or Ray's TrainingFailedError once train.max_failures restarts are spent."""
    config = config.with_absolute_paths()  # workers start in directories of Ray's
    connect()
    result = trainer(config, dataclasses.asdict(target) if target else None).fit()
    summary = result.return_value
    if "failed" in summary:
        raise not_retried(summary["failed"])
    with result.checkpoint.as_directory() as directory:
        state = torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    summary["ray_checkpoint"] = summary["checkpoint"]
    summary["checkpoint"] = checkpoint.save(config.run.dir, state, keep=config.train.keep_checkpoints)
    return summary
