"""The driver of a training run (`scmlab train`, jobs/train.py): everything that happens once per run, around the
loop. In order: check the inputs (before any worker or MLflow run exists, so a bad config, a missing dataset or a
run directory holding another run costs nothing and names the field, URL or checkpoint), make what evaluation reads
(scmlab.eval.training.prepare), take the run's lock (one driver per run directory and Ray run: scmlab.train.lock),
resolve the MLflow run, train in this process (train.workers = 0) or on Ray Train workers (scmlab.train.distributed),
log the final EMA weights as an MLflow model.
"""

import dataclasses
import functools
import logging

from ..config import Config
from ..eval.training import prepare as prepare_eval
from . import checkpoint, lock, mlflow_run
from .loop import check_inputs, train

log = logging.getLogger(__name__)


def run(config: Config, *, progress: bool = False) -> dict:
    """Train `config` to the end; returns the loop's summary plus, when tracked, "mlflow_run_id", "mlflow_url" and
    "model_uri" (the EMA model). See scmlab.train.loop.train and scmlab.train.distributed.fit."""
    config = config.with_absolute_paths()  # the same meaning on every Ray worker as here
    manifest = check_inputs(config)
    directories = [config.run.dir]
    if config.train.workers:
        from . import distributed

        distributed.connect()
        config = distributed.placed(config)  # before any MLflow run exists
        _, filesystem, run_key = distributed.location(config)
        directories += [run_key] if filesystem is None else []  # a local Ray run directory
    else:
        run_key = config.run.dir
    for directory in directories:  # the loop checks the checkpoint it restores too (an s3:// Ray run)
        if stored := checkpoint.peek(directory):
            checkpoint.check_resume(stored[0], config, manifest, stored[1])
    prepare_eval(config)  # the fd classifier and reference statistics, made once here rather than on a worker
    with lock.held(config):  # one driver per run at a time
        return _run(config, manifest, run_key, progress)


def _run(config: Config, manifest: dict, run_key: str, progress: bool) -> dict:
    target = mlflow_run.resolve(config, run_key)
    if target is not None:
        log.info("MLflow run: %s", mlflow_run.ui_url(target))
    try:
        if config.train.workers:
            from . import distributed

            summary = distributed.fit(config, target)
        else:
            summary = train(config, progress=progress, tracker=functools.partial(mlflow_run.open_tracker, target))
    except BaseException as e:
        mlflow_run.fail(target, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    if target is not None:
        target = dataclasses.replace(target, run_id=summary["mlflow_run_id"])  # the checkpoint's, if it differed
        summary["mlflow_url"] = mlflow_run.ui_url(target)
        summary["model_uri"] = mlflow_run.log_ema_model(target, summary["checkpoint"], manifest,
                                                        register=config.tracking.register,
                                                        alias=config.tracking.register_alias)
    return summary
