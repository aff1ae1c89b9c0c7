"""Tracker interface: in-memory recording, redaction of credentials, config flattening, MLflow runs and resumes."""

import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from mlflow import MlflowClient

from scmlab.tracking import (REDACTED, MemoryTracker, MLflowTracker, NullTracker, ensure_experiment, flatten,
                             make_tracker, redact)


def test_memory_tracker_records_everything():
    tracker = make_tracker("memory")
    assert isinstance(tracker, MemoryTracker) and tracker.run_id
    tracker.log_params({"optim": {"lr": 1e-4}, "model": {"arch": "mlp"}})
    tracker.log_metrics({"loss/train": 2.0, "tangent/norm": 0.5}, step=1)
    tracker.log_metrics({"loss/train": 1.0}, step=2)
    grid = np.zeros((4, 4, 3), np.uint8)
    tracker.log_image(grid, "samples", step=2)
    tracker.log_artifact("/tmp/ckpt.pt")
    tracker.set_tags({"objective": "sct"})
    tracker.finish()
    assert tracker.params == {"optim.lr": 1e-4, "model.arch": "mlp"}
    assert tracker.metrics == {"loss/train": [(1, 2.0), (2, 1.0)], "tangent/norm": [(1, 0.5)]}
    assert tracker.images == [("samples", 2, grid)]
    assert tracker.artifacts == ["/tmp/ckpt.pt"]
    assert tracker.tags == {"objective": "sct"}
    assert tracker.status == "FINISHED"


def test_context_manager_marks_failed_runs():
    with pytest.raises(RuntimeError):
        with MemoryTracker() as tracker:
            raise RuntimeError("NaN loss")
    assert tracker.status == "FAILED"


def test_registry():
    assert isinstance(make_tracker("none"), NullTracker)
    with pytest.raises(ValueError, match="mlflow"):
        make_tracker("wandb")


def test_flatten_nested_config():
    nested = {"data": {"train": "s3://b/x-{000..009}.tar"}, "optim": {"lr": 1e-4, "betas": [0.9, 0.99]},
              "model": {"unet": {"channels": 128}}, "seed": 0}
    assert flatten(nested) == {"data.train": "s3://b/x-{000..009}.tar", "optim.lr": 1e-4,
                               "optim.betas": [0.9, 0.99], "model.unet.channels": 128, "seed": 0}


def test_redact_masks_secret_keys_and_env_secret_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    monkeypatch.setenv("SHORT_PASSWORD", "abc")  # too short to recognise in values: "abc" is not masked below
    config = {
        "aws_secret_access_key": "x", "AWS_ACCESS_KEY_ID": "AKIA", "storage": {"secretKey": "y", "endpoint": "e"},
        "api_token": "z", "db_password": "p", "credentials": {"a": 1}, "apiKey": "k",
        "model": {"tokenizer": "bpe", "num_tokens": 256}, "note": "abc",
        "data": {"train": "https://user:wJalrXUtnFEMI/K7MDENG@host/x.tar"}, "hub": "hf_abcdefghijklmnop",
    }
    assert redact(config) == {
        "aws_secret_access_key": REDACTED, "AWS_ACCESS_KEY_ID": REDACTED,
        "storage": {"secretKey": REDACTED, "endpoint": "e"}, "api_token": REDACTED, "db_password": REDACTED,
        "credentials": REDACTED, "apiKey": REDACTED, "model": {"tokenizer": "bpe", "num_tokens": 256},
        "note": "abc", "data": {"train": REDACTED}, "hub": REDACTED,
    }
    tracker = MemoryTracker()
    tracker.log_params(config)
    tracker.set_tags({"launcher_token": "t", "hub": "hf_abcdefghijklmnop", "commit": "abc123"})
    assert tracker.params["storage.secretKey"] == REDACTED and tracker.params["storage.endpoint"] == "e"
    assert tracker.tags == {"launcher_token": REDACTED, "hub": REDACTED, "commit": "abc123"}


def test_tracking_imports_without_mlflow():
    code = "import sys, scmlab.tracking; assert 'mlflow' not in sys.modules, 'mlflow imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": ":".join(sys.path)})


def test_mlflow_tracker_resumes_the_same_run(tmp_path):
    # The client talks to a sqlite store directly here; tests/test_services.py runs the real server.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = ensure_experiment(uri, "resume")
    assert ensure_experiment(uri, "resume") == experiment_id
    client = MlflowClient(uri)

    first = MLflowTracker(uri, experiment_id=experiment_id, run_name="train", tags={"objective": "sct"})
    first.log_params({"optim": {"lr": 1e-4}, "train": {"steps": 100}})
    first.log_metrics({"loss/train": 1.0}, step=1)
    first.finish("KILLED")  # the job died

    resumed = MLflowTracker(uri, run_id=first.run_id)
    assert resumed.run_id == first.run_id
    assert resumed.flush(timeout=30)  # logging is asynchronous: the resume is the first item sent
    assert client.get_run(first.run_id).info.status == "RUNNING"
    # Re-logging the config is harmless; a changed value keeps the first one (MLflow params are immutable).
    resumed.log_params({"optim": {"lr": 1e-4}, "train": {"steps": 200}, "resume": {"count": 1}})
    resumed.log_metrics({"loss/train": 0.5}, step=2)
    resumed.finish()

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"optim.lr": "0.0001", "train.steps": "100", "resume.count": "1"}
    assert run.data.tags["objective"] == "sct"
    history = client.get_metric_history(first.run_id, "loss/train")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]
    assert len(client.search_runs([experiment_id])) == 1


def test_mlflow_tracker_never_waits_for_an_unreachable_server(tmp_path, monkeypatch, caplog):
    """Nothing listens at the URI: logging returns at once, finish waits flush_timeout and says what it dropped.
    (tests/test_faults.py kills and restarts a real server mid-run.)"""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the client's own retries, not under test here
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    tracker = MLflowTracker(uri, run_id="0" * 32, system_metrics=True, flush_timeout=1.0)
    started = time.perf_counter()
    for step in range(1, 101):
        tracker.log_metrics({"loss/train": 1.0 / step}, step=step)
    tracker.set_tags({"checkpoint.latest": "x"})
    tracker.log_image(np.zeros((4, 4, 3), np.uint8), "samples", step=100)
    assert time.perf_counter() - started < 0.5
    with caplog.at_level("WARNING"):
        tracker.finish()
    assert time.perf_counter() - started < 10
    assert f"MLflow at {uri} is unreachable" in caplog.text
    assert "within 1 s (tracking.flush_timeout): they are dropped" in caplog.text


def test_mlflow_tracker_drops_what_the_server_refuses_and_counts_a_full_queue(tmp_path, monkeypatch, caplog):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = ensure_experiment(uri, "refused")
    tracker = MLflowTracker(uri, experiment_id=experiment_id, run_name="refused")
    tracker.log_params({"bad!name": 1})  # a name MLflow refuses (400): dropped at once, not retried
    tracker.set_tags({"kept": "yes"})
    assert tracker.flush(timeout=30)
    monkeypatch.setattr(MLflowTracker, "QUEUE_SIZE", 0)  # a queue that is full: new items are counted, not kept
    tracker.log_metrics({"loss/train": 1.0}, step=1)
    with caplog.at_level("WARNING"):
        tracker.finish()
    assert tracker.dropped == 2
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert (run.info.status, run.data.tags["kept"], run.data.tags[MLflowTracker.DROPPED_TAG]) == ("FINISHED", "yes",
                                                                                                  "2")
    assert "params of run" in caplog.text and "is full" in caplog.text and run.data.params == {}


def test_mlflow_tracker_nests_sweep_children(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = ensure_experiment(uri, "sweep")
    with MLflowTracker(uri, experiment_id=experiment_id, run_name="sweep") as parent:
        with MLflowTracker(uri, experiment_id=experiment_id, parent_run_id=parent.run_id) as child:
            child.log_metrics({"loss/train": 0.1}, step=1)
    client = MlflowClient(uri)
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert [r.info.run_id for r in children] == [child.run_id]
    with pytest.raises(ValueError, match="ensure_experiment"):
        MLflowTracker(uri)
