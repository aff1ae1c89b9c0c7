"""Ray Train for real: a local Ray head (`ray start --head`), 2 CPU workers, DDP, tiny models, the session's MLflow
server and S3 store. A worker SIGKILLed mid-run, a diverging run, checks before any worker starts, `ray job submit`,
and no credential in MLflow or in a log."""

import dataclasses
import glob
import json
import os
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.request

import mlflow
import numpy as np
import psutil
import pytest
import torch
from conftest import RAY_SECRET, client_env, ray_workers
from mlflow import MlflowClient

from scmlab import services
from scmlab.config import ConfigError
from scmlab.data import DataError
from scmlab.train import TrainingDiverged, checkpoint, distributed
from scmlab.train.driver import run
from scmlab.train.mlflow_run import RUN_KEY_TAG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.ray


def tracked(local_services, experiment: str) -> dict:
    return {"kind": "mlflow", "uri": local_services["mlflow"]["tracking_uri"], "experiment": experiment}


def test_bad_config_or_missing_data_fail_before_ray_starts(local_services, toy_shards, make_config, tmp_path,
                                                           monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("a Ray resource was requested")

    monkeypatch.setattr(distributed, "connect", no_ray)
    monkeypatch.setattr(distributed, "fit", no_ray)
    config = make_config(toy_shards, tmp_path, train={"workers": 2})
    for missing in (str(tmp_path / "no-such-shards"), "s3://scmlab/no-such-shards"):
        with client_env(local_services), pytest.raises((DataError, FileNotFoundError), match=missing):
            run(dataclasses.replace(config, data=dataclasses.replace(config.data, train=missing)))
    with pytest.raises(ConfigError, match="objective.sigma_d: 1.0 differs"):
        run(make_config(toy_shards, tmp_path, train={"workers": 2}, objective={"sigma_d": 1.0}))
    with pytest.raises(ConfigError, match="objective.teacher: .*no-teacher"):
        run(make_config(toy_shards, tmp_path, train={"workers": 2},
                        objective={"kind": "scd", "teacher": str(tmp_path / "no-teacher")}))
    with pytest.raises(ConfigError, match="train.batch_size: 8 does not split evenly over train.workers=3"):
        make_config(toy_shards, tmp_path, train={"workers": 3})


def test_run_storage_is_run_dir_or_s3_with_the_data_endpoint(local_services, toy_shards, make_config, tmp_path):
    config = make_config(toy_shards, tmp_path / "runs" / "a")
    assert distributed.location(config) == (str(tmp_path / "runs"), None, str(tmp_path / "runs" / "a"))
    config = make_config(toy_shards, tmp_path / "runs" / "a", run={"storage": "s3://scmlab/ray/", "name": "b"})
    with client_env(local_services):
        path, filesystem, uri = distributed.location(config)
        assert (path, uri) == ("scmlab/ray", "s3://scmlab/ray/b")
        with filesystem.open_output_stream("scmlab/tests/probe") as f:  # the local server, with multipart-capable
            f.write(b"probe")                                            # credentials from the environment
        with filesystem.open_input_stream("scmlab/tests/probe") as f:
            assert f.read() == b"probe"


def test_worker_killed_mid_run_resumes_in_the_same_mlflow_run(ray_cluster, local_services, toy_shards, make_config,
                                                             tmp_path, monkeypatch, caplog):
    steps, every = 100, 20
    config = make_config(toy_shards, tmp_path / "killed", tracking=tracked(local_services, "ray-tests"),
                         train={"steps": steps, "batch_size": 16, "workers": 2, "log_every": 5,
                                "checkpoint_every": every, "keep_checkpoints": 2, "max_failures": 2})
    monkeypatch.setenv(*RAY_SECRET)  # the driver's environment holds it too
    killed = []

    def registered(step: int) -> bool:
        """Ray's controller has registered the checkpoint of `step` (written, then recorded in its snapshot): a
        restart resumes from it or a later one."""
        try:
            snapshot = json.loads((tmp_path / "killed" / "checkpoint_manager_snapshot.json").read_text())
        except (OSError, ValueError):
            return False
        return any(c["checkpoint_dir_name"] == f"step-{step:09d}" for c in snapshot["checkpoint_results"])

    def kill_a_worker_after_the_second_checkpoint():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            if registered(2 * every):
                for worker in ray_workers(ray_cluster)[:1]:
                    worker.kill()  # SIGKILL
                    killed.append(worker.pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker_after_the_second_checkpoint, daemon=True)
    killer.start()
    with caplog.at_level("INFO"):
        summary = run(config)
    killer.join()
    assert killed, "no worker was killed: the run ended first"

    # The run completed from a checkpoint: every optimizer step applied once, the final checkpoint at `steps`.
    final = checkpoint.load(summary["checkpoint"])
    assert summary["step"] == final["step"] == steps
    assert all(s["step"] == steps for s in final["optimizer"]["state"].values())
    assert summary["ray_checkpoint"] == f"{tmp_path / 'killed'}/step-{steps:09d}"

    # One MLflow run, continued: its step axis covers every logged step once the restart re-logs its few steps.
    client = MlflowClient(config.tracking.uri)
    experiment = client.get_experiment_by_name("ray-tests")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`{RUN_KEY_TAG}` = '{tmp_path / 'killed'}'")
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]] == [final["mlflow_run_id"]]
    run_id = summary["mlflow_run_id"]
    logged = sorted({m.step for m in client.get_metric_history(run_id, "train/step")})
    assert logged == list(range(5, steps + 1, 5))
    resumed = client.get_metric_history(run_id, "train/resumed_from")
    assert len(resumed) == 1 and resumed[0].value % every == 0 and 2 * every <= resumed[0].value < steps
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED"
    assert info.data.params["train.workers"] == "2" and info.data.tags["checkpoint.latest"] == summary["ray_checkpoint"]
    assert any(k.startswith("system/") for k in info.data.metrics)

    # The final EMA weights as an MLflow model that samples.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", config.tracking.uri)  # where runs:/ and models:/ URIs resolve
    model = mlflow.pyfunc.load_model(summary["model_uri"])
    noise = np.random.default_rng(0).standard_normal((3, 2)).astype(np.float32)
    assert model.predict(noise).shape == (3, 2)

    # No credential (S3 keys, the synthetic secret) in params, tags, artifacts, the model, or a log.
    uri = config.tracking.uri
    downloaded = [mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(tmp_path / "run"), tracking_uri=uri),
                  mlflow.artifacts.download_artifacts(artifact_uri=summary["model_uri"],
                                                      dst_path=str(tmp_path / "model"), tracking_uri=uri)]
    files = [f for d in downloaded for f in glob.glob(os.path.join(d, "**"), recursive=True) if os.path.isfile(f)]
    assert len(files) >= 5  # the grids' images, the model's files and its checkpoint
    assert_no_credentials(local_services, ray_cluster, files, params_and_tags=[info.data.params, info.data.tags],
                          driver_log=caplog.text)


def assert_no_credentials(local_services, ray_cluster, files, **texts):
    """Neither the S3 keys nor the synthetic secret of the Ray processes' environment is in `files`, in the
    session's Ray logs (workers, job drivers, Ray's own), or in `texts`."""
    env = local_services["env"]
    secrets = [RAY_SECRET[1], env["AWS_SECRET_ACCESS_KEY"], env["AWS_ACCESS_KEY_ID"]]
    logs = [f for f in glob.glob(os.path.join(ray_cluster["temp_dir"], "session_*", "logs", "**"), recursive=True)
            if os.path.isfile(f)]
    assert logs
    blobs = {f: open(f, "rb").read() for f in [*files, *logs]} | {k: json.dumps(v).encode() for k, v in texts.items()}
    leaks = [(where, secret[:6]) for where, blob in blobs.items() for secret in secrets if secret.encode() in blob]
    assert leaks == []


def test_diverging_run_stops_without_retries_and_keeps_the_last_good_checkpoint(ray_cluster, toy_shards, make_config,
                                                                                 tmp_path):
    # lr 1e30: the first update blows the weights up, every later loss is inf or NaN and is skipped.
    config = make_config(toy_shards, tmp_path / "diverged", optim={"lr": 1e30, "grad_clip": 0.0},
                         train={"steps": 50, "workers": 2, "max_bad_steps": 3, "checkpoint_every": 1,
                                "max_failures": 3})
    with pytest.raises(TrainingDiverged, match="3 consecutive steps") as e:
        run(config)
    # Steps 1, 2, 3 were skipped: the checkpoint of step 3 holds the weights of the last applied step, 0.
    last = str(tmp_path / "diverged" / "step-000000003")
    assert f"Last good checkpoint: {last}" in str(e.value)
    state = torch.load(os.path.join(last, distributed.CHECKPOINT_FILE), weights_only=True)
    assert (state["step"], state["bad_steps"]) == (3, 2)
    assert all(s["step"] == 1 for s in state["optimizer"]["state"].values())
    # Not retried from that checkpoint: a second attempt would have reached step 4.
    assert not os.path.exists(tmp_path / "diverged" / "step-000000004")


def test_fsdp_workers_write_a_checkpoint_in_ddp_layout(ray_cluster, toy_shards, make_config, tmp_path):
    """train.parallel=fsdp on 2 Ray Train workers (the loop's equality with DDP: tests/test_fsdp.py): the driver's
    checkpoint holds whole tensors, the optimizer's state keyed by parameter index, as a DDP run's."""
    config = make_config(toy_shards, tmp_path / "fsdp", train={"steps": 2, "workers": 2, "parallel": "fsdp"})
    summary = run(config)
    state = checkpoint.load(summary["checkpoint"])
    assert state["step"] == 2 and state["config"]["train"]["parallel"] == "fsdp"
    tensors = [*state["model"].values(), *(v for s in state["optimizer"]["state"].values() for v in s.values())]
    assert all(type(v) is torch.Tensor for v in tensors)  # no DTensor shards
    params = state["optimizer"]["param_groups"][0]["params"]
    assert params == list(range(len(params))) == sorted(state["optimizer"]["state"])
    assert state["model"].keys() == state["ema"].keys()
    assert all(state["model"][k].shape == state["ema"][k].shape for k in state["model"])
    logs = glob.glob(os.path.join(ray_cluster["temp_dir"], "session_*", "logs", "**", "worker-*"), recursive=True)
    assert any(b"2 worker(s) x batch 4, weights sharded (FSDP2)" in open(f, "rb").read() for f in logs)


def test_ray_job_submit_streams_from_s3_and_logs_to_mlflow(ray_cluster, local_services, s3_toy_shards, tmp_path):
    summary_path = tmp_path / "summary.json"
    command = ["ray", "job", "submit", "--address", ray_cluster["dashboard"], "--working-dir", ROOT, "--",
               "python", "jobs/train.py", "--config", "jobs/configs/toy-sct.yaml", f"data.train={s3_toy_shards}",
               "model.size=tiny", "train.steps=6", "train.batch_size=16", "train.workers=2", "train.log_every=3",
               "train.checkpoint_every=3", "train.sample_every=0", "tracking.experiment=ray-jobs",
               f"run.dir={tmp_path / 'job'}", "--summary-json", str(summary_path)]
    # The client needs Ray's token (from the services' home), not the S3 credentials: the job inherits the
    # environment of the Ray processes, as on a cluster. An empty HOME: no ~/.ray/auth_token to fall back on.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_AUTH"))}
    env.update(services.ray_auth_env(local_services["home"]), HOME=str(ray_cluster["home"]))
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "succeeded" in result.stdout and "Ray Train: 2 worker(s)" in result.stdout
    summary = json.loads(summary_path.read_text())
    assert summary["step"] == 6 and checkpoint.load(summary["checkpoint"])["step"] == 6
    run_info = MlflowClient(local_services["mlflow"]["tracking_uri"]).get_run(summary["mlflow_run_id"])
    assert run_info.data.params["data.train"] == s3_toy_shards and run_info.info.status == "FINISHED"
    assert_no_credentials(local_services, ray_cluster, [], client_output=result.stdout + result.stderr,
                          params_and_tags=[run_info.data.params, run_info.data.tags])


def test_ray_head_runs_with_the_services_token_on_an_empty_home(ray_cluster, local_services):
    """The session's head was started as the README says (`scmlab services run -- ray start --head`) with an empty
    HOME: it enforces token authentication with the token of the services' home (0600), and Ray created no token of
    its own."""
    token = local_services["home"] / services.RAY_TOKEN_FILE
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    assert not (ray_cluster["home"] / ".ray").exists()
    with urllib.request.urlopen(f"{ray_cluster['dashboard']}/api/authentication_mode", timeout=10) as response:
        assert json.loads(response.read())["authentication_mode"] == "token"
    with pytest.raises(urllib.error.HTTPError) as refused:  # the job API without the token
        urllib.request.urlopen(f"{ray_cluster['dashboard']}/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)
    request = urllib.request.Request(f"{ray_cluster['dashboard']}/api/jobs/",
                                     headers={"Authorization": f"Bearer {token.read_text()}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def test_services_bind_loopback(local_services):
    for name in ("storage", "mlflow"):
        procs = [psutil.Process(local_services[name]["pid"])]
        procs += procs[0].children(recursive=True)
        listening = {c.laddr.ip for p in procs for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        assert listening == {"127.0.0.1"}, name
