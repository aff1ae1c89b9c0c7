"""`make demo` has a pulse: jobs/demo.py end to end (services, digits into S3, Ray Train on 2 workers streaming from
S3, MLflow, sample quality at every checkpoint, a 2-step grid, the closing message with the final scores), for a few
steps on the session's services and Ray."""

import os
import sys
from unittest import mock

import pytest
from mlflow import MlflowClient
from PIL import Image

from scmlab.data import s3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "jobs"))

import demo  # noqa: E402  (jobs/demo.py)


@pytest.mark.ray
def test_demo_runs_the_main_job_and_says_where_to_look(ray_cluster, local_services, tmp_path, capsys):
    out = tmp_path / "demo"
    with mock.patch.dict(os.environ):  # the demo takes the services' client environment into its own
        summary = demo.main(["--home", str(local_services["home"]), "--out", str(out), "train.steps=4",
                             "train.log_every=2", "train.checkpoint_every=2", "train.sample_every=4",
                             "eval.every=2", "eval.n=64", "run.storage=s3://scmlab/tests/ray",
                             "run.name=demo-pulse"])
        s3.configure_s3()  # drop the S3 client made with that environment
    assert summary["step"] == 4 and summary["ray_checkpoint"] == "s3://scmlab/tests/ray/demo-pulse/step-000000004"
    grid = Image.open(out / "samples-2step.png")
    assert grid.size[0] == grid.size[1] >= 80  # 10 x 10 digits of 8x8, enlarged
    printed = capsys.readouterr().out
    for where in (str(out / "samples-2step.png"), local_services["mlflow"]["tracking_uri"], summary["mlflow_url"],
                  summary["model_uri"], "scmlab services down", f"fd 1-step {summary['metrics']['eval/fd/1step']:.3g}",
                  f"2-step {summary['metrics']['eval/fd/2step']:.3g}"):
        assert where in printed
    client = MlflowClient(local_services["mlflow"]["tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["data.train"] == "s3://scmlab/digits" and run.data.params["train.workers"] == "2"
    assert run.data.tags["mlflow.loggedImages"]  # the in-run grid
    for key in ("eval/fd/1step", "eval/fd/2step", "eval/fd/floor", "eval/cls_acc/2step"):  # the eval curves
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [2, 4], key
    assert run.data.tags["checkpoint.best_metric"] == "eval/fd/2step"
    assert run.data.tags["checkpoint.best_step"] in ("2", "4")
