"""The EMA model in MLflow (issue 14 item 7): EMA weights only, registered with an alias, loaded by name in a fresh
interpreter that cannot import the scmlab under test (no editable install, no PYTHONPATH): the package comes with the
model."""

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch

from scmlab.train import checkpoint
from scmlab.train.driver import run

# Runs in the fresh interpreter: drop every path that holds an importable scmlab, then load by alias and predict.
LOAD = """
import importlib.util, json, os, sys
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or '.', 'scmlab'))]
assert importlib.util.find_spec('scmlab') is None, 'scmlab importable before loading'
import mlflow, numpy as np
model = mlflow.pyfunc.load_model(sys.argv[1])
noise = np.random.default_rng(0).standard_normal((3, 2)).astype(np.float32)
out = model.predict(noise)
import scmlab
print(json.dumps({'samples': out.tolist(), 'scmlab': scmlab.__file__}))
"""


@pytest.mark.slow  # trains, logs, registers, and loads in a second interpreter: about 90 s
def test_registered_ema_model_loads_in_a_fresh_interpreter(local_services, toy_shards, make_config, tmp_path,
                                                          monkeypatch):
    uri = local_services["mlflow"]["tracking_uri"]
    config = make_config(toy_shards, tmp_path / "run", train={"steps": 3},
                         tracking={"kind": "mlflow", "uri": uri, "experiment": "models", "register": "toy-sct",
                                   "register_alias": "candidate"})
    before = os.environ.get("MLFLOW_TRACKING_URI")
    summary = run(config)
    assert summary["model_uri"] == "models:/toy-sct@candidate"
    # Logging the model leaves this process's MLFLOW_TRACKING_URI as it was (a later config here would pick it up).
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # where this test's own loads look for models:/ URIs

    # The artifact: the EMA weights and what building the network needs, not the raw weights or the optimizer.
    model_dir = mlflow.artifacts.download_artifacts(artifact_uri=summary["model_uri"], dst_path=str(tmp_path / "m"),
                                                    tracking_uri=uri)
    weights = torch.load(os.path.join(model_dir, "artifacts", "ema.pt"), weights_only=True)
    assert set(weights) == {"ema", "step", "config", "manifest"}
    final = checkpoint.load(summary["checkpoint"])
    assert all(torch.equal(weights["ema"][k], final["ema"][k]) for k in final["ema"])
    assert os.path.isfile(os.path.join(model_dir, "code", "scmlab", "__init__.py"))
    requirements = open(os.path.join(model_dir, "requirements.txt")).read()
    assert "scmlab" not in requirements and "torch" in requirements

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = uri
    out = subprocess.run([sys.executable, "-I", "-c", LOAD, summary["model_uri"]], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "/code/scmlab/" in result["scmlab"]  # the package that came with the model
    expected = mlflow.pyfunc.load_model(summary["model_uri"]).predict(
        np.random.default_rng(0).standard_normal((3, 2)).astype(np.float32))
    np.testing.assert_allclose(np.array(result["samples"]), expected, rtol=1e-5, atol=1e-6)
