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
    grid = config.trials(base)
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


def test_any_config_key_is_a_grid_axis_checked_before_any_resource(toy_shards, tmp_path, monkeypatch):
    """sweep.grid: every combination of its axes at every size x lr x seed, each value in its trial's resolved
    config; model.size / optim.lr / train.seed given there are sizes / lrs / seeds. A bad key or value is refused
    by load_sweep, naming it, before Ray or MLflow is touched."""
    from scmlab.train import distributed

    monkeypatch.setattr(distributed, "connect", lambda: pytest.fail("Ray was started"))
    path = write_sweep(tmp_path / "s.yaml", toy_shards, tmp_path / "run", sizes=[], lrs=[],
                       grid={"model.size": ["tiny", "small"], "optim.lr": [1e-3], "train.seed": [0, 1],
                             "objective.tangent_norm": ["l2", "none"]})
    base, config = sweep.load_sweep(path, ["sweep.grid.model.time_embedding=[positional,fourier_logsigma]"])
    assert (config.sizes, config.lrs, config.seeds) == (["tiny", "small"], [1e-3], [0, 1])
    trials = config.trials(base)
    assert len(trials) == 2 * 1 * 2 * 2 * 2
    assert trials[0].name == "tiny-lr0.001-seed0-tangent_norm=l2-time_embedding=positional"
    resolved = {(t.size, t.seed, c.objective.tangent_norm, c.model.time_embedding)
                for t in trials for c in [sweep.trial_config(base, t)]}
    assert resolved == {(size, seed, norm, emb) for size in ("tiny", "small") for seed in (0, 1)
                        for norm in ("l2", "none") for emb in ("positional", "fourier_logsigma")}
    c = sweep.trial_config(base, trials[-1])
    assert (c.model.size, c.train.seed, c.objective.tangent_norm, c.model.time_embedding, c.run.name) == (
        "small", 1, "none", "fourier_logsigma", trials[-1].name)

    for override, message in (
            ("sweep.grid.objective.tangent_norm=[l2,l3]", r"sweep\.grid\.objective\.tangent_norm: the value 'l3' is "
                                                          r"refused: objective\.tangent_norm: 'l3' is not one of"),
            ("sweep.grid.objective.tangent_nrom=[l2]", r"sweep\.grid\.objective\.tangent_nrom: unknown key; did you "
                                                       r"mean sweep\.grid\.objective\.tangent_norm"),
            ("sweep.grid.objectve.tangent_norm=[l2]", r"sweep\.grid\.objectve: unknown key"),
            ("sweep.grid.optim.warmup=[10,ten]", r"sweep\.grid\.optim\.warmup\[1\]: expected an integer, got 'ten'"),
            ("sweep.grid.optim.grad_clip=[-1]", r"sweep\.grid\.optim\.grad_clip: the value -1\.0 is refused"),
            ("sweep.grid.run.dir=[a,b]", r"sweep\.grid\.run\.dir: run\.\* and tracking\.\* are set by the sweep"),
            ("sweep.grid.train.steps=[]", r"sweep\.grid\.train\.steps: expected a non-empty list"),
            ("sweep.sizes=[tiny]", r"sweep\.grid\.model\.size: give it once")):
        with pytest.raises(ConfigError, match=message):
            sweep.load_sweep(path, [override])

    # Variants: named settings, each its own point of one more axis; a refused value names the variant.
    base, config = sweep.load_sweep(path, ["sweep.variants={paper: {}, no_warmup: {objective.warmup_steps: 0}}"])
    trials = config.trials(base)
    assert len(trials) == 16 and trials[1].name == "tiny-lr0.001-seed0-tangent_norm=l2-no_warmup"
    assert [sweep.trial_config(base, t).objective.warmup_steps for t in trials[:2]] == [10_000, 0]
    for override, message in (
            ("sweep.variants={bad: {objective.warmup_steps: -1}}", r"sweep\.variants\.bad: refused: "
                                                                  r"objective\.warmup_steps: must be >= 0"),
            ("sweep.variants={a/b: {}}", r"sweep\.variants\.a/b: a variant's name is part of trial names"),
            ("sweep.stages={teacher: {lrs: [1e-3]}, scd: {overrides: {objective.teacher: x}}}",
             r"sweep\.stages: objective\.teacher is set by each stage"),
            ("sweep.stages={scd: {lrs: [1e-3]}}", r"sweep\.stages: scd start from each size's best teacher")):
        with pytest.raises(ConfigError, match=message):
            sweep.load_sweep(path, [override])


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


def test_study_report_fits_each_stage_and_sampler_ratios_and_seed_spread(tmp_path):
    """report.analyse on a synthetic staged study whose scores follow known laws: per stage and sampler the law
    is recovered with finite errors (5 sizes), the ratio table is student / teacher of each size's best trials,
    and a variant's mean and spread over 3 seeds are exact."""
    from scmlab.tune import report

    sizes = {"a": 1e3, "b": 1e4, "c": 1e5, "d": 1e6, "e": 1e7}
    laws = {"teacher": {"ode18": (0.1, 5.0, 0.3)}, "scd": {"1step": (0.2, 8.0, 0.3), "2step": (0.15, 6.0, 0.3)}}
    metrics = {"teacher": "eval/energy/ode18", "scd": "eval/energy/2step"}
    rows, trials, finals = [], [], {}
    for stage, samplers in laws.items():
        for size, n in sizes.items():
            for lr, worse in ((1e-3, 1.0), (3e-3, 1.5)):
                t = sweep.Trial(size, lr, 0, stage=stage)
                values = {f"eval/energy/{k}": worse * (E + A * n ** -alpha) for k, (E, A, alpha) in samplers.items()}
                finals[t.name] = values
                trials.append(t)
                rows.append(TrialResult(t.name, size, int(n), lr, 0, "ok", values[metrics[stage]], n * 100.0))
    for seed, value in enumerate((1.5, 1.6, 1.7)):  # a worse variant of size a, teacher stage: 3 seeds
        t = sweep.Trial("a", 1e-3, seed, stage="teacher", variant="no_warmup",
                        variant_settings=(("objective.warmup_steps", 0),))
        trials.append(t)
        finals[t.name] = {"eval/energy/ode18": value}
        rows.append(TrialResult(t.name, "a", 1000, 1e-3, seed, "ok", value, 1e5))
    study = report.analyse(rows, trials, finals, metrics, str(tmp_path))
    fits = {(f["stage"], f["score"], f["against"]): f for f in study["fits"]}
    for stage, samplers in laws.items():
        for sampler, (E, A, alpha) in samplers.items():
            fit = fits[(stage, f"eval/energy/{sampler}", "params")]
            assert (fit["E"], fit["alpha"]) == (pytest.approx(E, rel=1e-4), pytest.approx(alpha, rel=1e-4))
            assert math.isfinite(fit["alpha_err"]) and fit["n"] == 5
            assert study["metrics"][f"law/{stage}/energy/{sampler}/params/alpha"] == pytest.approx(alpha, rel=1e-4)
    ratios = {r["size"]: r for r in study["ratios"]}
    for size, n in sizes.items():
        teacher = 0.1 + 5.0 * n ** -0.3
        assert ratios[size]["ratios"]["scd/2step"] == pytest.approx((0.15 + 6.0 * n ** -0.3) / teacher)
        assert ratios[size]["ratios"]["scd/1step"] == pytest.approx((0.2 + 8.0 * n ** -0.3) / teacher)
        assert study["metrics"][f"ratio/scd/2step/{size}"] == ratios[size]["ratios"]["scd/2step"]
    variant = next(s for s in study["settings"] if s["setting"] == "no_warmup")
    assert variant["seeds"] == 3
    assert variant["energy/ode18 mean"] == pytest.approx(1.6)
    assert variant["energy/ode18 std"] == pytest.approx(0.1)
    with open(tmp_path / "ratios.csv") as f:
        assert {r["size"] for r in csv.DictReader(f)} == set(sizes)
    text = (tmp_path / "report.md").read_text()
    assert "## Student / teacher" in text and "## Settings over seeds" in text
    assert "teacher energy/ode18 vs parameters: alpha = 0.3 ± " in text
    assert "beyond the 95% interval of 0 (4.3 standard errors at 2 degrees of freedom)" in text
    for name in study["files"]:
        assert os.path.getsize(tmp_path / name) > 0
    assert {"study_params.png", "study_flops.png", "report.md", "study.json"} <= set(study["files"])


def write_study(path, shards, run_dir, uri, stages) -> str:
    """A staged study on the 2-D toy: teacher -> sCD and sCT, 2 MLP sizes, scored by the energy distance."""
    return write_sweep(path, shards, run_dir, uri=uri, sizes=["tiny", "small"], lrs=[], metric="eval/energy/ode4",
                       stages=stages)


STUDY_EVAL = ["eval.every=4", "eval.n=64", "eval.batch_size=64", "train.steps=4"]


@pytest.mark.slow
@pytest.mark.ray
def test_staged_study_students_start_from_the_best_teacher_and_resume(local_ray, local_services, toy_shards,
                                                                      tmp_path):
    """Teacher grid (2 sizes x 2 lrs), then sCD and sCT of each size from its best teacher (lowest final
    eval/energy/ode4): on local Ray with the real MLflow server. The students train at a learning rate too small to
    move an fp32 weight, so their final weights are their initial ones: equal, tensor for tensor, to the chosen
    teacher's final EMA weights. The study first runs its teacher stage alone (an interrupted study), then resumes
    with the students: no teacher reruns, the parent holds the ratio table."""
    import torch

    from scmlab.train import checkpoint

    uri = local_services["env"]["MLFLOW_TRACKING_URI"]
    run_dir = tmp_path / "study"
    teacher = {"lrs": [1e-3, 3e-3], "overrides": {"eval.steps": [4]}}
    students = {"lrs": [1e-30], "metric": "eval/energy/2step", "overrides": {"objective.warmup_steps": 2}}
    path = write_study(tmp_path / "s.yaml", toy_shards, run_dir, uri, {"teacher": teacher})
    first = sweep.run(*sweep.load_sweep(path, STUDY_EVAL))
    teachers = ["teacher-tiny-lr0.001-seed0", "teacher-tiny-lr0.003-seed0", "teacher-small-lr0.001-seed0",
                "teacher-small-lr0.003-seed0"]
    assert (first["trials"], first["reused"]) == (teachers, [])
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweep-test").experiment_id
    histories = {r.info.run_name: len(client.get_metric_history(r.info.run_id, "loss/mse"))
                 for r in client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = "
                                                                         f"'{first['mlflow_run_id']}'")}

    path = write_study(tmp_path / "s.yaml", toy_shards, run_dir, uri,
                       {"teacher": teacher, "scd": students, "sct": students})
    second = sweep.run(*sweep.load_sweep(path, STUDY_EVAL))
    assert second["reused"] == teachers and second["mlflow_run_id"] == first["mlflow_run_id"]
    assert second["trials"] == ["scd-tiny-lr1e-30-seed0", "scd-small-lr1e-30-seed0", "sct-tiny-lr1e-30-seed0",
                                "sct-small-lr1e-30-seed0"]
    rows = {r.trial: r for r in read_results(second["results"])}
    assert all(r.status == "ok" and r.final_loss > 0 for r in rows.values()), rows
    children = {r.info.run_name: r for r in client.search_runs(
        [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{second['mlflow_run_id']}'")}
    for name, steps in histories.items():  # no teacher trained again
        assert len(client.get_metric_history(children[name].info.run_id, "loss/mse")) == steps
    for size in ("tiny", "small"):
        best = min((n for n in teachers if f"-{size}-" in n), key=lambda n: rows[n].final_loss)
        ema = checkpoint.load(str(run_dir / "trials" / best / "step-000000004"))["ema"]
        for stage in ("scd", "sct"):
            name = f"{stage}-{size}-lr1e-30-seed0"
            tags = children[name].data.tags
            assert (tags["scmlab.stage"], tags["scmlab.size"], tags["scmlab.teacher"]) == (stage, size, best)
            assert children[name].data.params["objective.kind"] == stage
            student = checkpoint.load(str(run_dir / "trials" / name / "step-000000004"))["model"]
            for key, tensor in ema.items():
                assert torch.equal(student[key], tensor), (name, key)
    assert children[teachers[0]].data.tags["scmlab.stage"] == "teacher"

    parent = client.get_run(second["mlflow_run_id"])
    assert {"report.md", "ratios.csv", "study.json", "study_params.png", "results.csv"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    with open(client.download_artifacts(parent.info.run_id, "ratios.csv", str(tmp_path))) as f:
        ratios = {r["size"]: r for r in csv.DictReader(f)}
    for size in ("tiny", "small"):
        best = min((n for n in teachers if f"-{size}-" in n), key=lambda n: rows[n].final_loss)
        for stage in ("scd", "sct"):
            student = rows[f"{stage}-{size}-lr1e-30-seed0"].final_loss
            assert float(ratios[size][f"{stage}/2step_ratio"]) == pytest.approx(student / rows[best].final_loss)
            assert parent.data.metrics[f"ratio/{stage}/2step/{size}"] == pytest.approx(
                student / rows[best].final_loss)
