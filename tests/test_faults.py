"""Faults on real services: the MLflow server killed mid-run (and back 20 s later, or never), a whole Ray node lost,
a sweep driver SIGKILLed mid-trial, a job submitted from another directory with relative paths. Each run either
completes or stops with one clear message, and nothing already written is lost."""

import os
import signal
import threading
import time

import pytest
from mlflow import MlflowClient

from scmlab import services
from scmlab.train.driver import run

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def logged_steps(client: MlflowClient, experiment: str, key: str = "train/step") -> list:
    """The metric history of `key` in the (one) run of `experiment`, [] while there is none."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return client.get_metric_history(runs[0].info.run_id, key) if runs else []


def kill_mlflow_at(home, experiment: str, step: int, events: dict, restart_after: float | None) -> threading.Thread:
    """A thread that SIGKILLs the MLflow server of `home` once `experiment`'s run has logged `step`, and starts it
    again (same port, same store) `restart_after` seconds later (never when None). `events` gets the times."""
    state = services.services_status(home)["mlflow"]
    client = MlflowClient(state["tracking_uri"])

    def watch():
        deadline = time.monotonic() + 180
        while not any(m.value >= step for m in logged_steps(client, experiment)):
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        os.killpg(state["pid"], signal.SIGKILL)
        events["killed"] = time.time()
        if restart_after is not None:
            time.sleep(restart_after)
            events["restarting"] = time.time()
            events["restarted"] = services.mlflow_up(home)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_mlflow_outage_neither_stalls_training_nor_fails_the_run(ray_cluster, toy_shards, make_config, tmp_path,
                                                                 caplog):
    home = tmp_path / "services"  # a server of this test's own: the session's keeps serving the other tests
    uri = services.services_up(home)["mlflow"]["tracking_uri"]
    client = MlflowClient(uri)
    try:
        # Killed at step 100, started again 20 s later on the same port and store: the 2 workers train on, what
        # rank 0 logged meanwhile arrives once the server is back, and the run ends FINISHED.
        steps, every, events = 1500, 10, {}
        config = make_config(toy_shards, tmp_path / "outage", train={"steps": steps, "batch_size": 16, "workers": 2,
                                                                      "log_every": every, "checkpoint_every": 500},
                             tracking={"kind": "mlflow", "uri": uri, "experiment": "outage"})
        watcher = kill_mlflow_at(home, "outage", 100, events, restart_after=20)
        summary = run(config)
        watcher.join(timeout=120)
        assert "killed" in events, "the run ended before the server was killed"
        assert summary["step"] == steps and events["restarted"]["tracking_uri"] == uri
        run_info = client.get_run(summary["mlflow_run_id"])
        assert run_info.info.status == "FINISHED" and summary["model_uri"]
        assert "scmlab.tracking.dropped" not in run_info.data.tags
        history = client.get_metric_history(summary["mlflow_run_id"], "train/step")
        assert sorted(m.step for m in history) == list(range(every, steps + 1, every))  # every metric arrived
        during = [m.step for m in history if events["killed"] * 1000 < m.timestamp < events["restarting"] * 1000]
        assert len(during) >= 5, "training did not go on while the server was down"
        step_s = [m.value for m in client.get_metric_history(summary["mlflow_run_id"], "time/step_s")]
        assert max(step_s) < 1.0, f"a step waited on the server: {max(step_s):.1f} s"

        # A server that never comes back: a warning, not the run.
        config = make_config(toy_shards, tmp_path / "gone", train={"steps": 200, "log_every": every,
                                                                    "checkpoint_every": 100},
                             tracking={"kind": "mlflow", "uri": uri, "experiment": "gone", "flush_timeout": 2,
                                       "system_metrics": False})
        watcher = kill_mlflow_at(home, "gone", 30, {}, restart_after=None)
        with caplog.at_level("WARNING"):
            summary = run(config)
        watcher.join(timeout=10)
        assert summary["step"] == 200 and summary["model_uri"] is None
        assert "within 2 s (tracking.flush_timeout): they are dropped" in caplog.text
        assert "the EMA model was not logged" in caplog.text
    finally:
        services.services_down(home)
