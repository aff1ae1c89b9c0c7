"""The MLflow side of a training run: which run to log to, and the final EMA model.

The driver resolves the run before any worker starts (`resolve`): it creates the experiment if missing (once, here:
workers creating it concurrently race on the server's sqlite store) and finds the run tagged with the run's key (its
Ray storage location, or its run directory), or creates it. A restarted driver thus continues the same MLflow run,
and rank 0 writes the run id into every checkpoint, so a resumed worker logs to the run it started in (`open`). Steps
between the last checkpoint and a failure are logged again by the resumed run, at the same step numbers.

The final EMA weights are logged as an MLflow model (`log_ema_model`): a pyfunc (scmlab.train.mlflow_model) whose
artifact is the EMA weights with the config (no optimizer), with the scmlab package as its code, and whose `predict`
maps standard-normal noise to samples in data space, as `scmlab sample` does.
"""

import dataclasses
import logging
import os
import urllib.request

import numpy as np

from ..config import Config
from ..tracking import MLflowTracker, NullTracker, Tracker, ensure_experiment

log = logging.getLogger(__name__)

RUN_KEY_TAG = "scmlab.run"
MODEL_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mlflow_model.py")  # the pyfunc, from code
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../scmlab, shipped with the model
EMA_KEYS = ("ema", "step", "config", "manifest")  # what the model needs of a checkpoint (scmlab.train.samples)


@dataclasses.dataclass(frozen=True)
class Target:
    """Where rank 0 logs: plain values, shipped to the workers."""
    uri: str
    experiment_id: str
    run_id: str
    system_metrics: bool
    flush_timeout: float = 300.0


def resolve(config: Config, run_key: str) -> Target | None:
    """The experiment and run of `config` (None when tracking is off); call in the driver, before the workers."""
    if config.tracking.kind == "none":
        return None
    from mlflow import MlflowClient

    uri = config.tracking.uri
    experiment_id = ensure_experiment(uri, config.tracking.experiment)
    found = MlflowClient(uri).search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                                         order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        run_id = found[0].info.run_id
        log.info("continuing MLflow run %s (%s)", run_id, run_key)
    else:
        run_id = MLflowTracker(uri, experiment_id=experiment_id, run_name=config.run.name,
                               tags={RUN_KEY_TAG: run_key}).run_id
    return Target(uri, experiment_id, run_id, config.tracking.system_metrics, config.tracking.flush_timeout)


def open_tracker(target: Target | None, checkpoint_run_id: str | None) -> Tracker:
    """Rank 0's tracker: the run of the resumed checkpoint if it names one, else the driver's."""
    if target is None:
        return NullTracker()
    if checkpoint_run_id and checkpoint_run_id != target.run_id:
        log.warning("the checkpoint was logged to MLflow run %s, not %s: continuing %s", checkpoint_run_id,
                    target.run_id, checkpoint_run_id)
    return MLflowTracker(target.uri, run_id=checkpoint_run_id or target.run_id, system_metrics=target.system_metrics,
                         flush_timeout=target.flush_timeout)


def ui_url(target: Target) -> str:
    return f"{target.uri.rstrip('/')}/#/experiments/{target.experiment_id}/runs/{target.run_id}"


def reachable(uri: str) -> bool:
    """Whether the tracking server answers /health within 5 s (always True for a store without a server). The
    driver asks before its own calls at the end of a run, which the MLflow client would retry for minutes."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def fail(target: Target | None, status: str = "FAILED") -> None:
    """End the run as FAILED or KILLED (the driver, when training could not finish)."""
    if target is None:
        return
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        if not reachable(target.uri):
            raise OSError("no answer to /health")
        MlflowClient(target.uri).set_terminated(target.run_id, status=status)
    except (MlflowException, OSError) as e:
        log.warning("MLflow at %s: could not mark run %s %s (%s)", target.uri, target.run_id, status, e)


def log_ema_model(target: Target, checkpoint_path: str, manifest: dict, *, register: str = "",
                  alias: str = "candidate") -> str | None:
    """Log the EMA weights of a checkpoint file as the MLflow model `ema` of the run, loadable anywhere: its artifact
    holds the EMA weights, config and manifest only (not the raw weights or the optimizer), the scmlab package goes
    with it as code (`code_paths`: no scmlab install needed to load it) and its pip requirements resolve on PyPI.
    With `register`, the model becomes a new version of that registered model and `alias` points at it. Returns the
    model's URI (models:/NAME@alias when registered), or None with a warning when the server cannot take it (an
    outage costs the model entry, not the run)."""
    import tempfile

    import mlflow
    import torch
    from mlflow.exceptions import MlflowException

    from . import checkpoint

    ckpt = checkpoint.load(checkpoint_path)
    example = np.random.default_rng(0).standard_normal((2, *manifest["shape"])).astype(np.float32)
    # set_tracking_uri also sets MLFLOW_TRACKING_URI in this process's environment, where a config built later in
    # the same process would find it (a server long gone): set for this call only.
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(target.uri)
    try:
        if not reachable(target.uri):
            raise OSError("no answer to /health")
        # The run ends FINISHED when this block closes: it is called once training has finished.
        with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=target.run_id):
            weights = os.path.join(tmp, "ema.pt")
            torch.save({key: ckpt[key] for key in EMA_KEYS}, weights)
            info = mlflow.pyfunc.log_model(name="ema", python_model=MODEL_CODE, artifacts={"checkpoint": weights},
                                           code_paths=[PACKAGE_DIR], input_example=example,
                                           pip_requirements=["torch>=2.6", "numpy"])
        uri = info.model_uri
        if register:
            version = mlflow.register_model(uri, register)
            mlflow.MlflowClient(target.uri).set_registered_model_alias(register, alias, version.version)
            uri = f"models:/{register}@{alias}"
    except (MlflowException, OSError) as e:
        log.warning("MLflow at %s: the EMA model was not logged to run %s (%s); it is the checkpoint %s",
                    target.uri, target.run_id, e, checkpoint_path)
        return None
    finally:
        mlflow.set_tracking_uri(before)
    log.info("EMA model %s in MLflow run %s", uri, target.run_id)
    return uri
