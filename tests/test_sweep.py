"""Scaling sweeps: config parsing and validation before any resource, concurrency from resources, the analysis of
a results table, and a real tiny sweep on local Ray with the local MLflow server (conftest's `local_services`):
parent and child runs nested, table and plots logged, a diverging trial recorded as failed, and a restarted sweep
with a larger grid that does not rerun its recorded trial."""

import csv
import glob
import math
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from mlflow import MlflowClient

from scmlab import data
from scmlab.config import ConfigError
from scmlab.tune import sweep
from scmlab.tune.scaling import TrialResult, read_results

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def write_sweep(path, shards, run_dir, uri="http://127.0.0.1:1", **sweep_values) -> str:
    d = {
        "data": {"train": shards},
        "model": {"arch": "mlp", "size": "tiny"},
        "objective": {"kind": "diffusion"},
        "optim": {"lr": 1e-3},
        "train": {"steps": 4, "batch_size": 16, "log_every": 2, "checkpoint_every": 2, "device": "cpu",
                  "workers": 1, "max_bad_steps": 2, "ema_half_life": 100},
        "tracking": {"uri": uri, "experiment": "sweep-test", "system_metrics": False},
        "run": {"dir": str(run_dir)},
        "sweep": {"sizes": ["tiny"], "lrs": [1e-3], **sweep_values},
    }
    with open(path, "w") as f:
        yaml.safe_dump(d, f)
    return str(path)


def test_config_errors_name_the_field_before_any_resource(toy_shards, tmp_path):
    path = write_sweep(tmp_path / "s.yaml", toy_shards, tmp_path / "run")
    base, config = sweep.load_sweep(path, ["sweep.sizes=[tiny,small]", "sweep.lrs=[1e-3,3e-3]", "train.steps=8"])
    assert (config.sizes, config.lrs, base.train.steps) == (["tiny", "small"], [1e-3, 3e-3], 8)
    grid = config.grid(base)
    assert [t.name for t in grid] == ["tiny-lr0.001-seed0", "tiny-lr0.003-seed0", "small-lr0.001-seed0",
                                      "small-lr0.003-seed0"]
    trial = sweep.trial_config(base, grid[2])
    assert (trial.model.size, trial.optim.lr, trial.run.name) == ("small", 1e-3, "small-lr0.001-seed0")
    assert trial.run.dir == str(tmp_path / "run" / "trials" / "small-lr0.001-seed0")
    assert trial.run.storage == str(tmp_path / "run" / "trials")  # Ray Train run dir == the trial's run dir

    for overrides, field in ((["sweep.sizes=[tiny,huge]"], "sweep.sizes"), (["sweep.lrs=[]"], "sweep.lrs"),
                             (["sweep.lrs=[0.1,-1]"], "sweep.lrs"), (["sweep.scheduler=bohb"], "sweep.scheduler"),
                             (["sweep.lr=[1]"], "sweep.lr"), (["objective.kind=sct"], "sweep.metric"),
                             (["train.workers=0"], "train.workers"), (["tracking.kind=none"], "tracking.uri"),
                             (["sweep.metric=loss/mean"], "sweep.metric")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            sweep.load_sweep(path, overrides)
    base, config = sweep.load_sweep(path, ["sweep.metric=loss/mean", "objective.adaptive_weight=false",
                                           "objective.kind=sct"])
    assert config.metric == "loss/mean"


def test_sweep_can_fit_an_eval_score(toy_shards, tmp_path, monkeypatch):
    """sweep.metric: a positive eval score of which lower is better, for a sampler the objective has, logged by
    evaluations; checked before Ray or MLflow is touched."""
    from scmlab.train import distributed

    path = write_sweep(tmp_path / "s.yaml", toy_shards, tmp_path / "run")
    _, config = sweep.load_sweep(path, ["sweep.metric=eval/energy/ode18", "eval.every=4"])
    assert config.metric == "eval/energy/ode18"
    for overrides, message in (
            (["sweep.metric=eval/energy/ode18"], r"sweep\.metric: eval/energy/ode18 is logged by evaluations; "
                                                 r"set eval\.every > 0"),
            (["sweep.metric=eval/kid/ode18", "eval.every=4"], r"kid, an unbiased estimate, can be negative"),
            (["sweep.metric=eval/precision/ode18", "eval.every=4"], r"not a positive eval score"),
            (["sweep.metric=eval/energy/2step", "eval.every=4"], r"names sampler '2step', but eval\.steps scores "
                                                                 r"ode18"),
            (["sweep.metric=eval/fd/ode18", "eval.every=4", "eval.metrics=[energy]"], r"eval\.metrics is \['energy'\]")):
        with pytest.raises(ConfigError, match=message):
            sweep.load_sweep(path, overrides)
    monkeypatch.setattr(distributed, "connect", lambda: pytest.fail("Ray was started"))
    base, config = sweep.load_sweep(path, ["sweep.metric=eval/fd/ode18", "eval.every=4"])  # fd: images only
    with pytest.raises(ConfigError, match=r"sweep\.metric: eval/fd/ode18 is not logged: eval\.metrics resolves to "
                                          r"\['energy'\]"):
        sweep.run(base, config)


def test_concurrency_from_resources(toy_shards, tmp_path):
    base, config = sweep.load_sweep(write_sweep(tmp_path / "s.yaml", toy_shards, tmp_path / "run"),
                                    ["train.workers=2"])
    assert sweep.max_concurrent(base, config, {"CPU": 16.0}, gpu=False, num_trials=6) == 6
    assert sweep.max_concurrent(base, config, {"CPU": 6.0}, gpu=False, num_trials=6) == 3
    assert sweep.max_concurrent(base, config, {"CPU": 16.0, "GPU": 4.0}, gpu=True, num_trials=6) == 2
    assert sweep.max_concurrent(base, config, {"CPU": 1.0}, gpu=False, num_trials=6) == 1  # it waits, not 0
    config.max_concurrent_trials = 5
    assert sweep.max_concurrent(base, config, {"CPU": 1.0}, gpu=False, num_trials=6) == 5


def test_analysis_fits_finished_trials_and_names_the_failed(tmp_path):
    from scmlab.tune.scaling import Curve

    rows, curves = [], []
    for size, params in (("a", 1e4), ("b", 1e5), ("c", 1e6), ("d", 1e7)):
        loss = 0.2 + 30 * params ** -0.4
        rows.append(TrialResult(f"{size}-ok", size, int(params), 1e-3, 0, "ok", loss, params * 1e3))
        rows.append(TrialResult(f"{size}-nan", size, int(params), 1.0, 0, "failed", reason="diverged at step 3"))
        curves.append(Curve(f"{size}-ok", size, [params * 10, params * 1e3], [loss * 2, loss]))
    fit = sweep.analyse(rows, curves, str(tmp_path), "loss/mse")
    assert fit["fits"]["params"]["alpha"] == pytest.approx(0.4, rel=0.05)
    assert fit["fits"]["params"]["E"] == pytest.approx(0.2, rel=0.05)
    assert math.isfinite(fit["fits"]["flops"]["alpha_err"])
    assert sorted(fit["fits"]["params"]["left_out"]) == sorted(f"{s}-nan: failed: diverged at step 3" for s in "abcd")
    for name in ("results.csv", "fit.json", "fit_params.png", "fit_flops.png", "loss_vs_compute.png", "best_lr.png"):
        assert os.path.getsize(tmp_path / name) > 0
    assert len(read_results(str(tmp_path / "results.csv"))) == 8


@pytest.fixture
def local_ray():
    """The Ray this process is connected to (a session fixture's), else a local one for this test (2 CPUs)."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.ray
def test_tiny_sweep_on_ray_with_mlflow_resumes_without_rerunning(local_ray, local_services, toy_shards, tmp_path):
    uri = local_services["env"]["MLFLOW_TRACKING_URI"]
    run_dir = tmp_path / "sweep"
    path = write_sweep(tmp_path / "s.yaml", toy_shards, run_dir, uri=uri)
    # An interrupted sweep: only its first trial ran.
    first = sweep.run(*sweep.load_sweep(path))
    assert (first["trials"], first["reused"]) == (["tiny-lr0.001-seed0"], [])
    client = MlflowClient(uri)
    ok_run = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id],
                                filter_string="tags.`mlflow.runName` = 'tiny-lr0.001-seed0'")[0]
    steps_logged = len(client.get_metric_history(ok_run.info.run_id, "loss/mse"))
    assert steps_logged == 2

    # Restarted with the full grid (a learning rate that diverges added): the recorded trial is not rerun.
    second = sweep.run(*sweep.load_sweep(path, ["sweep.lrs=[1e-3,1e6]"]))
    assert (second["trials"], second["reused"]) == (["tiny-lr1e+06-seed0"], ["tiny-lr0.001-seed0"])
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert len(client.get_metric_history(ok_run.info.run_id, "loss/mse")) == steps_logged

    rows = {row.trial: row for row in read_results(second["results"])}
    assert rows["tiny-lr0.001-seed0"].status == "ok" and rows["tiny-lr0.001-seed0"].final_loss > 0
    assert rows["tiny-lr0.001-seed0"].flops == pytest.approx(sweep.compute(
        sweep.trial_config(*sweep.load_sweep(path)[:1], sweep.Trial("tiny", 1e-3, 0)),
        {"shape": [2], "num_classes": 0})["total_flops"])
    failed = rows["tiny-lr1e+06-seed0"]
    assert failed.status == "failed" and "non-finite" in failed.reason

    parent = client.get_run(second["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_name = {c.info.run_name: c for c in children}
    assert sorted(by_name) == ["tiny-lr0.001-seed0", "tiny-lr1e+06-seed0"]
    assert by_name["tiny-lr0.001-seed0"].info.status == "FINISHED"
    assert by_name["tiny-lr1e+06-seed0"].info.status == "FAILED"
    assert "non-finite" in by_name["tiny-lr1e+06-seed0"].data.tags["scmlab.failure"]
    assert by_name["tiny-lr0.001-seed0"].data.params["optim.lr"] == "0.001"
    assert int(by_name["tiny-lr0.001-seed0"].data.params["compute.params"]) == rows["tiny-lr0.001-seed0"].params
    assert by_name["tiny-lr0.001-seed0"].data.tags["ray.trial_name"] == "tiny-lr0.001-seed0"
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "fit.json", "loss_vs_compute.png", "best_lr.png"} <= artifacts
    # One size: no law to fit, and the fit says why and which trial it left out.
    assert "tiny-lr1e+06-seed0: failed" in second["fit"]["fits"]["params"]["error"]
    with open(second["results"]) as f:
        assert len(list(csv.DictReader(f))) == 2


def test_cli_dry_run_lists_the_trials_and_a_bad_field_exits_2(toy_shards, tmp_path, capsys):
    from scmlab import cli

    path = write_sweep(tmp_path / "s.yaml", toy_shards, tmp_path / "run")
    assert cli.main(["sweep", "--config", path, "--dry-run", "sweep.lrs=[1e-3,3e-3]"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["trials"] == ["tiny-lr0.001-seed0", "tiny-lr0.003-seed0"]
    assert resolved["sweep"]["scheduler"] == "fifo" and resolved["model"]["arch"] == "mlp"
    assert cli.main(["sweep", "--config", path, "sweep.scheduler=grid"]) == 2
    assert not (tmp_path / "run").exists()  # refused before anything was made


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.ray
def test_sweep_demo_command_line_with_relative_paths_finishes_every_trial(ray_cluster, local_services, tmp_path):
    """`make sweep-demo`'s commands, verbatim but smaller and run from another directory: the relative data.train
    and run.dir mean the same in every trial's workers (Ray Train runs them in directories of its own)."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"]}  # the session's Ray, not a new local one
    cli = [sys.executable, "-m", "scmlab.cli"]
    subprocess.run([*cli, "prepare", "toy-gmm", "--out", "sweep-demo/shards", "--limit", "512", "--shard-size",
                    "128"], cwd=tmp_path, env=env, check=True, timeout=120)
    result = subprocess.run(
        [*cli, "services", "run", "--home", str(local_services["home"]), "--", sys.executable,
         os.path.join(ROOT, "jobs/sweep.py"), "--config", os.path.join(ROOT, "jobs/configs/sweep-toy.yaml"),
         "data.train=sweep-demo/shards", "run.dir=sweep-demo/sweep", "sweep.sizes=[tiny,small]", "sweep.lrs=[1e-3]",
         "train.steps=4", "train.batch_size=16", "train.log_every=2", "train.checkpoint_every=2",
         "tracking.experiment=sweep-demo-test"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_results(str(tmp_path / "sweep-demo" / "sweep" / "results.csv"))
    assert sorted((r.trial, r.status) for r in rows) == [("small-lr0.001-seed0", "ok"), ("tiny-lr0.001-seed0", "ok")]
    assert all(r.final_loss > 0 for r in rows)


@pytest.mark.ray
def test_sweep_whose_data_fail_on_the_workers_fails_fast_naming_the_path(local_ray, local_services, toy_shards,
                                                                          tmp_path, caplog):
    """Shards that the driver's checks pass (their manifest reads) but the workers cannot read: each trial fails on
    its first attempt (a data error is not retried) with the worker's own error, the sweep exits non-zero and its
    parent run ends FAILED."""
    shards = tmp_path / "shards"
    shutil.copytree(toy_shards, shards)
    for tar in glob.glob(str(shards / "*.tar")):
        os.unlink(tar)
    assert data.read_manifest(str(shards))["count"] == 512
    uri = local_services["env"]["MLFLOW_TRACKING_URI"]
    path = write_sweep(tmp_path / "s.yaml", str(shards), tmp_path / "run", uri=uri, lrs=[1e-3, 3e-3])
    from scmlab import cli

    with caplog.at_level("INFO"):
        assert cli.main(["sweep", "--config", path, "train.max_failures=3"]) == 1
    rows = read_results(str(tmp_path / "run" / "results.csv"))
    assert [r.status for r in rows] == ["failed", "failed"]
    for row in rows:  # the worker's DataError, returned on the first attempt (a retry ends in Ray's own error)
        assert row.reason.startswith("DataError: rank 0: shard ") or row.reason.startswith("DataError: shard ")
        assert str(shards) in row.reason
    assert f"every trial of the sweep failed ({tmp_path / 'run' / 'results.csv'})" in caplog.text
    assert str(shards) in caplog.text
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweep-test")
    parent = client.search_runs([experiment.experiment_id], filter_string="tags.`mlflow.runName` = 'run'",
                                order_by=["attributes.start_time DESC"])[0]
    assert parent.info.status == "FAILED"
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {c.info.status for c in children} == {"FAILED"}
    assert all(str(shards) in c.data.tags["scmlab.failure"] for c in children)
