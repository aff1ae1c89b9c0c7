"""Experiment tracking: one small `Tracker` interface, with no-op, in-memory (tests) and MLflow implementations.

Rank 0 logs; other ranks get a `NullTracker`. Configs are logged as flat dotted params (`optim.lr`), metrics under
namespaced keys (`loss/`, `time/`, `tangent/`). Everything logged as params or tags goes through `redact` first.
MLflow is imported inside `MLflowTracker` only, so this module (and the core) import with torch alone.
"""

import collections
import functools
import logging
import os
import re
import threading
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

    A new run needs `experiment_id` (from `ensure_experiment`) and is created at once (the server must answer);
    `run_id` continues an existing run instead, so a restarted job continues the same run (its status goes back to
    RUNNING). `parent_run_id` nests the run under a sweep's parent run. `system_metrics` samples CPU / memory / GPU
    use into the run (needs psutil; GPUs need nvidia-ml-py).

    Logging never waits for the server: everything after creation (resuming, params, metrics, tags, images,
    artifacts, the end of the run) goes in order through a queue that one background thread sends. While the server
    is unreachable, the thread keeps retrying the item at the head of the queue (the MLflow client's own retries,
    then backoff up to RETRY_MAX_S), so training on rank 0, and with it every rank waiting at its next all-reduce,
    never stalls, and what was logged meanwhile reaches the run once the server is back. Items beyond QUEUE_SIZE
    and items the server refuses (4xx) are dropped and counted (`dropped`). `finish` waits up to `flush_timeout`
    seconds for the queue to drain; what is still undelivered then is counted as dropped, with a warning, and the run
    is tagged `scmlab.tracking.dropped` when the server can still take it.
    """

    QUEUE_SIZE = 10_000
    RETRY_MAX_S = 10.0
    DROPPED_TAG = "scmlab.tracking.dropped"

    def __init__(self, tracking_uri: str, *, experiment_id: str | None = None, run_id: str | None = None,
                 run_name: str | None = None, parent_run_id: str | None = None, tags: Mapping | None = None,
                 system_metrics: bool = False, flush_timeout: float = 300.0):
        from mlflow import MlflowClient

        self._client, self._uri, self.flush_timeout = MlflowClient(tracking_uri), tracking_uri, flush_timeout
        self.dropped = 0
        self._items: collections.deque = collections.deque()
        self._pending = 0  # queued or being sent
        self._cond = threading.Condition()
        self._thread = None
        self._give_up = self._finished = self._full = False
        self._unreachable_since: float | None = None
        self._monitor = None
        if run_id is not None:
            self.run_id = run_id
            self._put("resume", self._resume, control=True)
        elif experiment_id is not None:
            run_tags = {**(tags or {}), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
            run = self._client.create_run(experiment_id, run_name=run_name, tags=redact(run_tags))
            self.run_id = run.info.run_id
            log.info("MLflow run %s in experiment %s at %s", self.run_id, experiment_id, tracking_uri)
        else:
            raise ValueError("MLflowTracker needs experiment_id (a new run; see ensure_experiment) or run_id "
                             "(resume a run)")
        if system_metrics:
            self._put("system metrics", self._start_monitor, run_id is not None, control=True)

    # -- what the caller logs: queued, never waited for

    def log_params(self, params):
        self._put("params", self._log_params, redact(flatten(params)))

    def log_metrics(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # when it was logged, not when it reaches the server
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._put(f"metrics of step {step}", functools.partial(self._client.log_batch, self.run_id, metrics=batch))

    def log_image(self, image, name, step):
        self._put(f"image {name} of step {step}", self._log_image, image if isinstance(image, (str, os.PathLike))
                  else image.copy(), name, step)

    def log_artifact(self, path):
        self._put(f"artifact {path}", self._log_artifact, path)

    def set_tags(self, tags):
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in redact(tags).items()]
        self._put("tags", functools.partial(self._client.log_batch, self.run_id, tags=batch))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything logged so far was sent (or dropped); False if `timeout` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def finish(self, status="FINISHED"):
        """Queue the end of the run, and wait up to flush_timeout for the queue to drain (see the class)."""
        if self._finished:
            return
        self._finished = True
        self._put("system metrics", self._stop_monitor, control=True)
        self._put("dropped count", self._tag_dropped, control=True)
        self._put(f"end of the run ({status})", self._client.set_terminated, self.run_id, status, control=True)
        delivered = self.flush(self.flush_timeout)
        with self._cond:
            self._give_up = True  # what is left is dropped, without more attempts
            self._cond.notify_all()
            left = self._pending
        if not delivered:
            log.warning("MLflow at %s did not take the last %d logged item(s) of run %s within %g s "
                        "(tracking.flush_timeout): they are dropped, and the run is not marked %s there",
                        self._uri, left, self.run_id, self.flush_timeout, status)
        elif self.dropped:
            log.warning("%d logged item(s) of MLflow run %s were dropped (see the warnings above)", self.dropped,
                        self.run_id)

    # -- the sender

    def _put(self, what: str, send, *args, control: bool = False) -> None:
        with self._cond:
            if self._finished and not control:
                return
            if not control and len(self._items) >= self.QUEUE_SIZE:
                self.dropped += 1
                if not self._full:
                    self._full = True
                    log.warning("MLflow queue of run %s is full (%d items not yet sent): dropping new items (%s "
                                "first), counted", self.run_id, self.QUEUE_SIZE, what)
                return
            self._items.append((what, send, args))
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._send, name=f"mlflow-{self.run_id[:8]}", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _send(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._items or (self._give_up and not self._pending))
                if not self._items:
                    return
                what, send, args = self._items.popleft()
            self._deliver(what, send, args)
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()

    def _deliver(self, what: str, send, args) -> None:
        """send(*args) until it succeeds, fails for good (the server refuses it: 4xx; any error that is not the
        server's or the network's), or finish gave up; the last two count as dropped."""
        from mlflow.exceptions import MlflowException

        delay = 1.0
        while not self._give_up:
            try:
                send(*args)
            except Exception as e:
                if not (isinstance(e, OSError) or isinstance(e, MlflowException) and e.get_http_status_code() >= 500):
                    log.warning("MLflow: %s of run %s failed (%s: %s); dropped", what, self.run_id, type(e).__name__,
                                _first_line(e))
                    break
                if self._unreachable_since is None:
                    self._unreachable_since = time.time()
                    log.warning("MLflow at %s is unreachable (%s); %s and what follows stay queued and are sent "
                                "when it answers again; training goes on", self._uri, _first_line(e), what)
                with self._cond:
                    self._cond.wait_for(lambda: self._give_up, delay)
                delay = min(2 * delay, self.RETRY_MAX_S)
                continue
            if self._unreachable_since is not None:
                log.warning("MLflow at %s answers again after %.0f s; sending the %d queued item(s)", self._uri,
                            time.time() - self._unreachable_since, len(self._items) + 1)
                self._unreachable_since = None
            return
        with self._cond:
            self.dropped += 1

    def _resume(self) -> None:
        run = self._client.get_run(self.run_id)
        if run.info.status != "RUNNING":
            self._client.update_run(self.run_id, status="RUNNING")
        log.info("resuming MLflow run %s", self.run_id)

    def _log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        # MLflow params are immutable: a resumed run re-logs its config; values that changed are kept as they were.
        logged = self._client.get_run(self.run_id).data.params
        new = {}
        for key, value in params.items():
            value = str(value)
            if key not in logged:
                new[key] = value
            elif logged[key] != value:
                log.warning("param %s is %r in run %s; not changed to %r", key, logged[key], self.run_id, value)
        self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in new.items()])

    def _log_image(self, image, name, step) -> None:
        if isinstance(image, (str, os.PathLike)):
            from PIL import Image

            with Image.open(image) as opened:
                image = opened.convert("RGB")
        self._client.log_image(self.run_id, image, key=name, step=step)

    def _log_artifact(self, path) -> None:
        if Path(path).is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path=Path(path).name)
        else:
            self._client.log_artifact(self.run_id, str(path))

    def _tag_dropped(self) -> None:
        if self.dropped:
            self._client.set_tag(self.run_id, self.DROPPED_TAG, str(self.dropped))

    def _start_monitor(self, resumed: bool) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resumed, tracking_uri=self._uri)
        self._monitor.start()

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


TRACKERS = {"none": NullTracker, "memory": MemoryTracker, "mlflow": MLflowTracker}


def make_tracker(kind: str, **kwargs) -> Tracker:
    """A tracker by type name: 'none', 'memory' or 'mlflow' (keyword arguments go to its constructor)."""
    if kind not in TRACKERS:
        raise ValueError(f"unknown tracker {kind!r}; choose one of {sorted(TRACKERS)}")
    return TRACKERS[kind](**kwargs)
