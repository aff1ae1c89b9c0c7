"""Faults on real services: the MLflow server killed mid-run (and back 20 s later, or never), a whole Ray node lost,
a sweep driver SIGKILLed mid-trial, a job submitted from another directory with relative paths. Each run either
completes or stops with one clear message, and nothing already written is lost."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import yaml
from conftest import client_env, logged_steps, ray_node, ray_workers
from mlflow import MlflowClient

from scmlab import services
from scmlab.train import checkpoint, distributed
from scmlab.train.driver import run
from scmlab.tune.scaling import read_results

pytestmark = [pytest.mark.ray, pytest.mark.slow]


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


def registered(train_run, step: int) -> bool:
    """Ray's controller has registered the checkpoint of `step` in the Train run directory `train_run` (written,
    then recorded in its snapshot): a restart resumes from it or a later one."""
    try:
        snapshot = json.loads((train_run / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return False
    return any(c["checkpoint_dir_name"] == f"step-{step:09d}" for c in snapshot["checkpoint_results"])


def test_killed_sweep_driver_reruns_only_the_cut_and_crashed_trials(ray_cluster, local_services, toy_shards,
                                                                    tmp_path):
    """One trial at a time: a diverging one (failed), one whose only worker is SIGKILLed with train.max_failures=0
    (crashed), one cut by SIGKILLing the sweep driver after its second checkpoint. The same command again reruns
    the crashed and the cut trials from their last checkpoints, in their MLflow child runs, and not the failed one."""
    uri = local_services["env"]["MLFLOW_TRACKING_URI"]
    steps, every, log_every = 400, 50, 10
    run_dir = tmp_path / "sweep"
    config = {"data": {"train": toy_shards}, "model": {"arch": "mlp", "size": "tiny"},
              "objective": {"kind": "diffusion"}, "optim": {"lr": 1e-3},
              "train": {"steps": steps, "batch_size": 16, "log_every": log_every, "checkpoint_every": every,
                        "device": "cpu", "workers": 1, "max_bad_steps": 2, "max_failures": 0, "ema_half_life": 100},
              "tracking": {"uri": uri, "experiment": "killed-sweep", "system_metrics": False},
              "run": {"dir": str(run_dir)},
              "sweep": {"sizes": ["tiny"], "lrs": [1e6, 2e-3, 1e-3], "max_concurrent_trials": 1}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(config))
    failed, crashed, cut = "tiny-lr1e+06-seed0", "tiny-lr0.002-seed0", "tiny-lr0.001-seed0"
    command = [sys.executable, "-m", "scmlab.cli", "sweep", "--config", str(tmp_path / "s.yaml")]
    env = {**os.environ, **local_services["env"], "RAY_ADDRESS": ray_cluster["address"]}

    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    kills, deadline = [], time.monotonic() + 600
    while driver.poll() is None and len(kills) < 2 and time.monotonic() < deadline:
        if not kills and registered(run_dir / "trials" / crashed, every):
            kills += [w.pid for w in ray_workers(ray_cluster)]
            assert len(kills) == 1, kills  # the crashed trial's only worker
            psutil.Process(kills[0]).kill()
        elif kills and registered(run_dir / "trials" / cut, 2 * every):
            driver.kill()
            kills.append(driver.pid)
        time.sleep(0.05)
    out = driver.communicate(timeout=60)[0].decode(errors="replace")
    assert len(kills) == 2, "the driver ended before both kills:\n" + out[-3000:]
    rows = {r.trial: r for r in read_results(str(run_dir / "results.csv"))}
    assert sorted(rows) == [crashed, failed], out[-3000:]  # the cut trial: not recorded
    assert rows[failed].status == "failed" and "non-finite" in rows[failed].reason
    assert rows[crashed].status == "crashed" and rows[crashed].reason
    assert not os.path.exists(run_dir / "results.csv.tmp")

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("killed-sweep").experiment_id
    children = {r.info.run_name: r.info.run_id for r in client.search_runs(
        [experiment], filter_string="tags.`mlflow.parentRunId` != ''")}
    history = {name: client.get_metric_history(run_id, "train/step") for name, run_id in children.items()}
    assert {m.step for m in history[crashed]} and max(m.step for m in history[crashed]) < steps

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {r.trial: r for r in read_results(str(run_dir / "results.csv"))}
    assert {name: r.status for name, r in rows.items()} == {failed: "failed", crashed: "ok", cut: "ok"}
    assert len(client.search_runs([experiment], filter_string="tags.`mlflow.parentRunId` != ''")) == 3
    assert client.get_metric_history(children[failed], "train/step") == history[failed]  # not rerun
    for name in (crashed, cut):
        info = client.get_run(children[name])
        assert info.info.status == "FINISHED"
        resumed = client.get_metric_history(children[name], "train/resumed_from")
        assert len(resumed) == 1 and resumed[0].value >= every and resumed[0].value % every == 0, name
        logged = sorted({m.step for m in client.get_metric_history(children[name], "train/step")})
        assert logged == list(range(log_every, steps + 1, log_every)), name  # one continuous step axis
    assert client.get_metric_history(children[cut], "train/resumed_from")[0].value >= 2 * every


def test_node_lost_mid_run_completes_from_the_last_checkpoint(ray_cluster, local_services, toy_shards, make_config,
                                                             tmp_path):
    """Two workers of 1.5 CPUs: one on the session's head (2 CPUs), one on a second node. The second node's raylet
    is SIGKILLed after the second checkpoint was registered in the S3 run storage; a replacement node joins (as an
    autoscaler would bring one), and the run completes from the last registered checkpoint in its one MLflow run."""
    steps, every, log_every = 200, 20, 5
    run_name = f"node-lost-{os.getpid()}"
    config = make_config(toy_shards, tmp_path / "run",
                         train={"steps": steps, "batch_size": 16, "workers": 2, "cpus_per_worker": 1.5,
                                "log_every": log_every, "checkpoint_every": every, "max_failures": 2},
                         run={"storage": "s3://scmlab/tests/ray", "name": run_name},
                         tracking={"kind": "mlflow", "uri": local_services["mlflow"]["tracking_uri"],
                                   "experiment": "node-lost", "system_metrics": False})
    killed, result = {}, {}
    with client_env(local_services), ray_node(ray_cluster, local_services, num_cpus=2) as node:
        storage, filesystem, _ = distributed.location(config)

        def registered_steps() -> set:
            try:
                with filesystem.open_input_stream(f"{storage}/{run_name}/checkpoint_manager_snapshot.json") as f:
                    snapshot = json.loads(f.read())
            except (OSError, ValueError):
                return set()
            return {int(c["checkpoint_dir_name"].removeprefix("step-")) for c in snapshot["checkpoint_results"]}

        def train():
            result["summary"] = run(config)

        trainer = threading.Thread(target=train, daemon=True)
        trainer.start()
        deadline = time.monotonic() + 300
        while trainer.is_alive() and time.monotonic() < deadline and not killed:
            done = registered_steps()
            if 2 * every in done:
                on_node = ray_workers(node)
                assert len(on_node) == 1 and len(ray_workers(ray_cluster)) == 1  # one worker on each node
                node["raylet"].kill()  # SIGKILL: the node is lost with its worker
                killed.update(registered=max(done), worker=on_node[0])
            time.sleep(0.05)
        assert killed, "the run ended (or stalled) before the node was lost"
        killed["worker"].wait(timeout=60)  # the node's worker died with it
        with ray_node(ray_cluster, local_services, num_cpus=2):  # the replacement
            trainer.join(timeout=400)
    assert not trainer.is_alive(), "the run did not complete after the node was replaced"

    summary = result["summary"]
    final = checkpoint.load(summary["checkpoint"])
    assert summary["step"] == final["step"] == steps
    assert all(s["step"] == steps for s in final["optimizer"]["state"].values())  # every step applied once
    assert summary["ray_checkpoint"] == f"s3://scmlab/tests/ray/{run_name}/step-{steps:09d}"
    client = MlflowClient(config.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("node-lost").experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]
    assert runs[0].info.status == "FINISHED"
    resumed = client.get_metric_history(summary["mlflow_run_id"], "train/resumed_from")
    assert len(resumed) == 1 and resumed[0].value >= killed["registered"]
    logged = sorted({m.step for m in client.get_metric_history(summary["mlflow_run_id"], "train/step")})
    assert logged == list(range(log_every, steps + 1, log_every))


def test_job_submitted_from_a_project_directory_with_relative_paths(ray_cluster, local_services, toy_shards,
                                                                   tmp_path):
    """`ray job submit --working-dir .` from a project of the user's (config and shards in it, relative paths): the
    job's relative inputs are the submitted files (Ray's unpacked copy on the head), a relative run.dir is refused
    before anything is written (that copy is Ray's to delete), and the run with an absolute run.dir finishes."""
    project = tmp_path / "project"
    shutil.copytree(toy_shards, project / "shards" / "toy")
    (project / "configs").mkdir()
    (project / "configs" / "toy.yaml").write_text(yaml.safe_dump({
        "data": {"train": "shards/toy"}, "model": {"arch": "mlp", "size": "tiny"}, "objective": {"kind": "sct"},
        "train": {"steps": 6, "batch_size": 16, "workers": 1, "log_every": 3, "checkpoint_every": 3,
                  "device": "cpu"},
        "tracking": {"experiment": "relative-job", "system_metrics": False}, "run": {"dir": "runs/toy"}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_AUTH"))}
    env.update(services.ray_auth_env(local_services["home"]), HOME=str(ray_cluster["home"]))

    def submit(*overrides):
        return subprocess.run(["ray", "job", "submit", "--address", ray_cluster["dashboard"], "--working-dir", ".",
                               "--", "python", "-m", "scmlab.cli", "train", "--config", "configs/toy.yaml",
                               *overrides], cwd=project, env=env, capture_output=True, text=True, timeout=300)

    refused = submit()
    assert refused.returncode != 0 and "failed" in refused.stdout, refused.stdout[-3000:]
    assert "run.dir: 'runs/toy' is relative, and this Ray job runs in Ray's unpacked copy of --working-dir" \
        in refused.stdout, refused.stdout[-3000:]
    assert not (project / "runs").exists()

    summary_path = tmp_path / "summary.json"
    result = submit(f"run.dir={tmp_path / 'runs' / 'toy'}", "--summary-json", str(summary_path))
    assert result.returncode == 0 and "succeeded" in result.stdout, result.stdout[-4000:] + result.stderr[-2000:]
    summary = json.loads(summary_path.read_text())
    assert summary["step"] == 6 and checkpoint.load(summary["checkpoint"])["step"] == 6
    assert summary["checkpoint"].startswith(str(tmp_path / "runs" / "toy"))
    params = MlflowClient(local_services["mlflow"]["tracking_uri"]).get_run(summary["mlflow_run_id"]).data.params
    train = params["data.train"]  # the submitted shards, in Ray's copy of the project
    assert "_ray_pkg_" in train and train.endswith("/shards/toy") and os.path.isabs(train), train
