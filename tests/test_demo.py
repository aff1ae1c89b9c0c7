"""`make demo` has a pulse: jobs/demo.py end to end (services, digits into S3, Ray Train on 2 workers streaming from
S3, MLflow, a 2-step grid, the closing message), for a few steps on the session's services and Ray."""

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
                             "run.storage=s3://scmlab/tests/ray", "run.name=demo-pulse"])
        s3.configure_s3()  # drop the S3 client made with that environment
    assert summary["step"] == 4 and summary["ray_checkpoint"] == "s3://scmlab/tests/ray/demo-pulse/step-000000004"
    grid = Image.open(out / "samples-2step.png")
    assert grid.size[0] == grid.size[1] >= 80  # 10 x 10 digits of 8x8, enlarged
    printed = capsys.readouterr().out
    for where in (str(out / "samples-2step.png"), local_services["mlflow"]["tracking_uri"], summary["mlflow_url"],
                  summary["model_uri"], "scmlab services down"):
        assert where in printed
    run = MlflowClient(local_services["mlflow"]["tracking_uri"]).get_run(summary["mlflow_run_id"])
    assert run.data.params["data.train"] == "s3://scmlab/digits" and run.data.params["train.workers"] == "2"
    assert run.data.tags["mlflow.loggedImages"]  # the in-run grid
