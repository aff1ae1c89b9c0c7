"""Experiment tracking: one small `Tracker` interface, with no-op, in-memory (tests) and MLflow implementations.

Rank 0 logs; other ranks get a `NullTracker`. Configs are logged as flat dotted params (`optim.lr`), metrics under
namespaced keys (`loss/`, `time/`, `tangent/`). Everything logged as params or tags goes through `redact` first.
MLflow is imported inside `MLflowTracker` only, so this module (and the core) import with torch alone.
"""

import logging
import os
import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

REDACTED = "***"
# Key fragments that mark a credential (compared on the key upper-cased, without separators). TOKEN is matched only
# at the end of a word so that `tokenizer` or `num_tokens` stay visible.
_SECRET_FRAGMENTS = ("SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "ACCESSKEY", "KEYID", "APIKEY", "PRIVATEKEY")
_TOKEN = re.compile(r"TOKEN(?![A-Z])")
# Environment values shorter than this are not treated as secrets: they would match ordinary words and numbers.
_MIN_SECRET_LEN = 8


def is_secret_key(key: str) -> bool:
    upper = key.upper()
    return any(f in re.sub(r"[^A-Z0-9]", "", upper) for f in _SECRET_FRAGMENTS) or bool(_TOKEN.search(upper))


def redact(mapping: Mapping) -> dict:
    """A copy of `mapping` (nested mappings too) with credentials masked: values under keys that name a credential,
    and values that contain the value of a credential variable of the current environment."""
    env_secrets = [v for k, v in os.environ.items() if is_secret_key(k) and len(v) >= _MIN_SECRET_LEN]

    def clean(key, value):
        if is_secret_key(str(key)):
            return REDACTED
        if isinstance(value, Mapping):
            return {k: clean(k, v) for k, v in value.items()}
        if any(secret in str(value) for secret in env_secrets):
            return REDACTED
        return value

    return {k: clean(k, v) for k, v in mapping.items()}


def flatten(nested: Mapping, prefix: str = "") -> dict:
    """{"optim": {"lr": 1e-4}} -> {"optim.lr": 1e-4}; lists and other values are kept as they are."""
    flat = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class Tracker:
    """What the training loop and the sweeps log. Use as a context manager to finish with FAILED on an exception."""

    run_id: str | None = None

    def log_params(self, params: Mapping) -> None:
        """Log a (nested) config as flat dotted params, redacted."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar metrics at a training step."""

    def log_image(self, image, name: str, step: int) -> None:
        """Log an image (an HWC uint8 array, or a path to a PNG) as step `step` of the image series `name`."""

    def log_artifact(self, path: str | os.PathLike) -> None:
        """Upload a file or a directory as run artifacts."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags, redacted."""

    def finish(self, status: str = "FINISHED") -> None:
        """End the run: FINISHED, FAILED or KILLED."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.finish("FINISHED" if exc_type is None else "KILLED" if exc_type is KeyboardInterrupt else "FAILED")


class NullTracker(Tracker):
    """Logs nothing: non-zero ranks, and runs with tracking off."""


class MemoryTracker(Tracker):
    """Keeps everything in memory, for tests that assert what was logged without a server."""

    def __init__(self, run_id: str | None = None):
        self.run_id = run_id or uuid.uuid4().hex
        self.params: dict = {}
        self.metrics: dict[str, list[tuple[int, float]]] = {}  # key -> [(step, value), ...]
        self.images: list[tuple[str, int, object]] = []  # (name, step, array or path)
        self.artifacts: list[str] = []
        self.tags: dict = {}
        self.status: str | None = None

    def log_params(self, params):
        self.params.update(redact(flatten(params)))

    def log_metrics(self, metrics, step):
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append((step, float(value)))

    def log_image(self, image, name, step):
        self.images.append((name, step, image))

    def log_artifact(self, path):
        self.artifacts.append(str(path))

    def set_tags(self, tags):
        self.tags.update(redact(tags))

    def finish(self, status="FINISHED"):
        self.status = status


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The id of experiment `name`, created if missing. Call it once, in the driver, before workers start: workers
    creating it concurrently race on the server's sqlite store ("database is locked")."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    log.info("creating MLflow experiment %r at %s", name, tracking_uri)
    artifacts = None
    if tracking_uri.startswith("sqlite:///"):  # no server: keep artifacts beside the store, not in ./mlruns
        artifacts = Path(tracking_uri.removeprefix("sqlite:///")).parent.joinpath("artifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


class MLflowTracker(Tracker):
    """Logs to an MLflow tracking server with the MLflow client (no global `mlflow.start_run` state, so several
    trackers can live in one process).

    A new run needs `experiment_id` (from `ensure_experiment`); `run_id` resumes an existing run instead, so a
    restarted job continues the same run (its status goes back to RUNNING). `parent_run_id` nests the run under a
    sweep's parent run. `system_metrics` samples CPU / memory / GPU use into the run (needs psutil; GPUs need
    nvidia-ml-py).
    """

    def __init__(self, tracking_uri: str, *, experiment_id: str | None = None, run_id: str | None = None,
                 run_name: str | None = None, parent_run_id: str | None = None, tags: Mapping | None = None,
                 system_metrics: bool = False):
        from mlflow import MlflowClient

        self._client = MlflowClient(tracking_uri)
        if run_id is not None:
            run = self._client.get_run(run_id)
            if run.info.status != "RUNNING":
                self._client.update_run(run_id, status="RUNNING")
            log.info("resuming MLflow run %s", run_id)
        elif experiment_id is not None:
            run_tags = {**(tags or {}), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
            run = self._client.create_run(experiment_id, run_name=run_name, tags=redact(run_tags))
            log.info("MLflow run %s in experiment %s at %s", run.info.run_id, experiment_id, tracking_uri)
        else:
            raise ValueError("MLflowTracker needs experiment_id (a new run; see ensure_experiment) or run_id "
                             "(resume a run)")
        self.run_id = run.info.run_id
        self._monitor = None
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=run_id is not None,
                                                 tracking_uri=tracking_uri)
            self._monitor.start()

    def log_params(self, params):
        from mlflow.entities import Param

        # MLflow params are immutable: a resumed run re-logs its config; values that changed are kept as they were.
        logged = self._client.get_run(self.run_id).data.params
        new = {}
        for key, value in redact(flatten(params)).items():
            value = str(value)
            if key not in logged:
                new[key] = value
            elif logged[key] != value:
                log.warning("param %s is %r in run %s; not changed to %r", key, logged[key], self.run_id, value)
        self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in new.items()])

    def log_metrics(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_image(self, image, name, step):
        if isinstance(image, (str, os.PathLike)):
            from PIL import Image

            with Image.open(image) as opened:
                image = opened.convert("RGB")
        self._client.log_image(self.run_id, image, key=name, step=step)

    def log_artifact(self, path):
        if Path(path).is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path=Path(path).name)
        else:
            self._client.log_artifact(self.run_id, str(path))

    def set_tags(self, tags):
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in redact(tags).items()])

    def finish(self, status="FINISHED"):
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self._client.set_terminated(self.run_id, status=status)


TRACKERS = {"none": NullTracker, "memory": MemoryTracker, "mlflow": MLflowTracker}


def make_tracker(kind: str, **kwargs) -> Tracker:
    """A tracker by type name: 'none', 'memory' or 'mlflow' (keyword arguments go to its constructor)."""
    if kind not in TRACKERS:
        raise ValueError(f"unknown tracker {kind!r}; choose one of {sorted(TRACKERS)}")
    return TRACKERS[kind](**kwargs)
