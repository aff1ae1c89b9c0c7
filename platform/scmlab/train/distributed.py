"""Ray Train: the training loop on `train.workers` processes with DDP or FSDP2 (train.parallel; gloo on CPU, NCCL on
GPU), fault tolerant.

`fit` builds a `ray.train.torch.TorchTrainer` from the config: one worker per replica (`train.cpus_per_worker` CPUs,
and one GPU each when training on CUDA), the global batch train.batch_size split evenly over the workers, run
storage `run.storage`/`run.name` (a shared directory or s3://, through a pyarrow S3 filesystem with the data's
endpoint settings), `CheckpointConfig(num_to_keep=train.keep_checkpoints)` and `failure_config`. Each worker runs
`scmlab.train.loop.train` with `RayCheckpoints`: rank 0 writes the checkpoint, every rank calls `ray.train.report`
at the same steps (it is a barrier), and a restarted worker group resumes from `ray.train.get_checkpoint()` (also a
driver restarted with the same storage and name). The fused sCM step (objective.jvp=fused) is one call through the
DDP wrapper, its tangent outside the graph; with a separate JVP pass (autograd, fd) the JVP runs on the module
inside the wrapper (scmlab.objectives), so forward-mode AD never meets DDP's hooks; theta^- is a stop-gradient, which
makes that exact.
Under FSDP2 (scmlab.train.parallel) both run through fully_shard's hooks, which gather each block's weights.

A run whose loss keeps diverging, or whose data or config the workers cannot use, is not retried (it would fail the
same way again): the workers return the error (`NOT_RETRIED`), and `fit` raises it with the message of rank 0.
"""

import dataclasses
import functools
import hashlib
import logging
import os
import shutil
import tempfile

import torch

from ..config import Config, ConfigError
from ..data import DataError
from . import checkpoint, mlflow_run, parallel
from .loop import TrainingDiverged, train

log = logging.getLogger(__name__)

CHECKPOINT_FILE = checkpoint.RAY_FILE
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../scmlab


def location(config: Config) -> tuple[str, object, str]:
    """(storage_path, storage_filesystem, URI of the run directory) for Ray's RunConfig. s3:// storage gets a pyarrow
    S3FileSystem whose endpoint and region come from the same variables as the data's boto3 client; credentials are
    left to the AWS chain of each process, so none is pickled into the filesystem that Ray ships and records."""
    storage = _storage(config)
    if not storage.startswith("s3://"):
        return storage, None, run_uri(config)
    from pyarrow.fs import S3FileSystem

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    filesystem = S3FileSystem(endpoint_override=endpoint, region=s3_region(storage, endpoint))
    return storage.removeprefix("s3://"), filesystem, run_uri(config)


def _storage(config: Config) -> str:
    storage = (config.run.storage or os.path.dirname(os.path.abspath(config.run.dir))).rstrip("/")
    return storage if storage.startswith("s3://") else os.path.abspath(storage)


def run_uri(config: Config) -> str:
    """The URI of the Ray Train run's directory: s3://BUCKET/PREFIX/NAME or an absolute local path (no filesystem
    made, no network asked)."""
    storage = _storage(config)
    return f"{storage}/{config.run.name}" if storage.startswith("s3://") else os.path.join(storage, config.run.name)


def s3_region(storage: str, endpoint: str | None) -> str:
    """The region for pyarrow, which does not follow S3's region redirects: the SDK's chain (AWS_REGION,
    AWS_DEFAULT_REGION, the profile's config), else the bucket's own region asked of AWS (an EC2 node with an instance
    profile and no config), else us-east-1 for an S3-compatible endpoint of your own (which ignores it)."""
    import boto3

    region = os.environ.get("AWS_REGION") or boto3.session.Session().region_name  # boto3 reads AWS_DEFAULT_REGION
    if region:
        return region
    if endpoint:
        return "us-east-1"
    from pyarrow.fs import resolve_s3_region

    return resolve_s3_region(storage.removeprefix("s3://").split("/")[0])


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


def local_copies(run_uri: str) -> str:
    """Where rank 0 writes a run's checkpoints on its node before Ray uploads them: TMPDIR/scmlab-checkpoints/KEY,
    KEY the first 16 hex digits of the SHA-256 of the run's URI (`run_uri`). Ray deletes each copy once it is in
    storage; a worker killed before that leaves it behind, and the run's next workers clear the directory."""
    key = hashlib.sha256(run_uri.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "scmlab-checkpoints", key)


class RayCheckpoints:
    """The loop's checkpoint store on a Ray Train worker: Ray's run storage, `step-NNNNNNNNN/checkpoint.pt`.

    Made by every worker when it starts (before the loop's first collective), it deletes the local copies that an
    earlier worker group of the same run left on this node (`local_copies`): when Ray starts a worker group, the
    previous one of the run is gone, so none of them is still being uploaded. Other runs' copies are left alone."""

    def __init__(self, rank: int, run_uri: str):
        import ray.train

        self.rank, self.run_uri = rank, run_uri
        self.copies = local_copies(run_uri)
        shutil.rmtree(self.copies, ignore_errors=True)
        self.preemption_saved = False
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
        """Write the checkpoint locally and hand it to Ray, which uploads it in the background (training goes on)
        and deletes the local copy once it is in storage."""
        import ray.train

        name = f"step-{step:09d}"
        report = None
        if self.rank == 0:
            os.makedirs(self.copies, exist_ok=True)
            directory = tempfile.mkdtemp(prefix=f"{name}-", dir=self.copies)
            torch.save(state(), os.path.join(directory, CHECKPOINT_FILE))
            report = ray.train.Checkpoint.from_directory(directory)
        # Every rank, the same number of times: a barrier. Ray registers the checkpoint once it is whole in storage,
        # so an upload cut short is never the one a restart resumes from.
        # loss/mean for ASHA; eval/ scores for CheckpointConfig's checkpoint_score_attribute (eval.best)
        ray.train.report({"step": step, **{k: v for k, v in metrics.items()
                                           if k == "loss/mean" or k.startswith("eval/")}},
                         checkpoint=report, checkpoint_dir_name=name,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True)
        self.latest = f"{self.run_uri}/{name}"
        return self.latest

    def preempted(self) -> bool:
        """True once, when a node of this run has notice of its preemption (a spot reclaim): the loop then writes a
        just-in-time checkpoint, from which Ray Train resumes the run on the nodes it gets next. A collective: every
        rank calls it at the same steps."""
        import ray.train

        if self.preemption_saved:
            return False
        info = ray.train.get_preemption_info()
        if info is None:
            return False
        log.warning("preemption notice for ranks %s (deadline %s ms): writing a checkpoint now", info.preempted_ranks,
                    info.deadline_ms)
        self.preemption_saved = True
        return True

    def last(self) -> str | None:
        return self.latest


def worker(loop_config: dict) -> dict:
    """A Ray Train worker: the loop on this rank's share of the batch, its network a DDP replica or FSDP2 shards
    (train.parallel)."""
    config = Config.from_dict(loop_config["config"])
    import ray.train

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("scmlab").setLevel(logging.INFO)  # the step lines; libraries stay at WARNING
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    target = mlflow_run.Target(**loop_config["target"]) if loop_config["target"] else None
    try:
        return train(config, rank=rank, world_size=world_size,
                     wrap=parallel.wrapper(config.train.parallel) if world_size > 1 else None,
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


def capacity() -> list[dict]:
    """The resources of every node the cluster can ever hold: an autoscaling cluster's configured node types (the
    autoscaler's config at $SCMLAB_CLUSTER_CONFIG, which cluster.yaml's head sets: the head once, each worker type
    max_workers times within the cluster's max_workers), else the nodes alive now. Decisions taken from this (GPU or
    not, how many trials at once, whether train.workers can ever start) do not depend on what happens to be up at
    submit time: cluster.yaml starts with no GPU node."""
    path = os.environ.get("SCMLAB_CLUSTER_CONFIG")
    if path:
        import yaml

        with open(os.path.expanduser(path)) as f:
            return configured_nodes(yaml.safe_load(f), path)
    import ray

    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def configured_nodes(cluster: dict, source: str) -> list[dict]:
    """The nodes of a Ray cluster config at full scale (see `capacity`); node types must state their CPU and GPU."""
    types = cluster["available_node_types"]
    for name, node_type in types.items():
        if not {"CPU", "GPU"} <= set(node_type.get("resources") or {}):
            raise ConfigError(f"{source}: available_node_types.{name}.resources must state CPU and GPU (e.g. "
                              "{CPU: 4, GPU: 1}): scmlab decides GPU use and trial concurrency from them")
    nodes = [types[cluster["head_node_type"]]["resources"]]
    room = cluster.get("max_workers", 2)
    for name, node_type in types.items():
        count = min(node_type.get("max_workers", 0) if name != cluster["head_node_type"] else 0, room)
        nodes += [node_type["resources"]] * count
        room -= count
    return nodes


def use_gpu(config: Config, nodes: list[dict]) -> bool:
    """train.device, `auto`: GPU workers when the cluster can ever have a GPU (see `capacity`)."""
    if config.train.device != "auto":
        return config.train.device == "cuda"
    return any(node.get("GPU", 0) > 0 for node in nodes)


def check_fits(config: Config, nodes: list[dict], gpu: bool) -> None:
    """Refuse train.workers that the cluster can never place (Ray would wait for them forever)."""
    need = {"CPU": config.train.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    fits = sum(int(min(node.get(key, 0) // amount for key, amount in need.items())) for node in nodes)
    if config.train.workers > fits:
        raise ConfigError(
            f"train.workers: {config.train.workers} workers of {need} each can never run on this cluster, which holds "
            f"at most {fits} ({len(nodes)} node(s) at full scale, {total(nodes)}); lower train.workers or "
            "train.cpus_per_worker, or raise the node types' max_workers in cluster.yaml")


def placed(config: Config) -> Config:
    """`config` with train.device decided for the cluster it will run on (`auto`: see `use_gpu`), once its
    train.workers are known to fit (`check_fits`): decided by the driver, so that the workers and every sweep trial,
    wherever Ray runs them, agree."""
    nodes = capacity()
    gpu = use_gpu(config, nodes)
    check_fits(config, nodes, gpu)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, device="cuda" if gpu else "cpu"))


def total(nodes: list[dict]) -> dict:
    """The summed resources of `nodes`."""
    summed = {}
    for node in nodes:
        for key, amount in node.items():
            summed[key] = summed.get(key, 0) + amount
    return {key: summed[key] for key in ("CPU", "GPU") if key in summed}


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


def failure_config(config: Config):
    """Restarts: train.max_failures for failures, and no limit for preemptions, which Ray 2.60 counts apart
    (`FailureConfig.max_preemption_failures`). A node drained for preemption (the GCS call behind `ray drain-node
    --reason DRAIN_NODE_REASON_PREEMPTION`, which scmlab.spot makes on an AWS spot notice) reaches the workers
    through `get_preemption_info`: they write a checkpoint at the next log step (`RayCheckpoints.preempted`) and go
    on training until the notice's deadline, when Ray Train stops them and restarts the group, from that checkpoint,
    on other nodes; a node that dies after its deadline counts as preempted too. A reclaim is not the run's fault and loses only the steps between its notice and its deadline, so none is
    refused. A node lost before its deadline or without notice counts as a failure."""
    from ray.train import FailureConfig

    return FailureConfig(max_failures=config.train.max_failures, max_preemption_failures=-1)


def trainer(config: Config, target: dict | None, callbacks=()):
    """The TorchTrainer of a run (config.run.dir already absolute): `worker` on train.workers processes, storage,
    checkpoint retention and restarts from the config. `target` is the MLflow run (mlflow_run.Target as a dict)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, filesystem, run_uri = location(config)
    gpu = use_gpu(config, capacity())
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
            failure_config=failure_config(config), callbacks=list(callbacks)),
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
    with result.checkpoint.as_directory() as directory:  # copied, not loaded: it may not fit the driver's memory
        path = checkpoint.save(config.run.dir, None, keep=config.train.keep_checkpoints, step=summary["step"],
                               source=os.path.join(directory, CHECKPOINT_FILE))
    summary["ray_checkpoint"], summary["checkpoint"] = summary["checkpoint"], path
    return summary
