"""Entrypoints have a pulse: `scmlab prepare / train / sample`, the jobs/ scripts and the benchmark, 2 steps each."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from scmlab import data
from scmlab.cli import main
from scmlab.config import Config
from scmlab.train import checkpoint
from scmlab.train.samples import ema_model, generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "platform")}


def _overrides(config) -> list[str]:
    """`scmlab train` arguments that give `config`."""
    return [f"{s}.{k}={json.dumps(v)}" for s, d in config.to_dict().items() for k, v in d.items()]


def test_prepare_train_sample_images(tmp_path):
    shards, run = str(tmp_path / "shards"), str(tmp_path / "run")
    assert main(["prepare", "digits", "--out", shards, "--shard-size", "32", "--limit", "64"]) == 0
    manifest = data.read_manifest(shards)
    assert (manifest["count"], len(manifest["shards"]), manifest["shape"]) == (64, 2, [1, 8, 8])

    summary_path = str(tmp_path / "summary.json")
    assert main(["train", "--config", os.path.join(ROOT, "jobs/configs/digits-sct.yaml"), f"data.train={shards}",
                 f"run.dir={run}", "train.steps=2", "train.batch_size=8", "train.sample_every=0",
                 "--summary-json", summary_path]) == 0
    summary = json.load(open(summary_path))
    assert summary["checkpoint"] == os.path.join(run, "checkpoints", "step-000000002.pt")
    assert os.path.isfile(summary["checkpoint"]) and np.isfinite(summary["metrics"]["loss/mean"])

    out, grid = str(tmp_path / "s.npz"), str(tmp_path / "s.png")
    assert main(["sample", "--checkpoint", run, "--steps", "2", "--n", "6", "--out", out, "--grid", grid]) == 0
    z = np.load(out)
    assert z["samples"].dtype == np.float32 and z["samples"].shape == (6, 1, 8, 8)
    assert np.isfinite(z["samples"]).all()
    assert z["labels"].tolist() == [0, 1, 2, 3, 4, 5] and os.path.isfile(grid)
    assert main(["sample", "--checkpoint", run, "--n", "3", "--class-label", "7", "--out", out]) == 0
    assert np.load(out)["labels"].tolist() == [7, 7, 7]


def test_sample_vectors_in_original_units_from_given_noise(toy_shards, make_config, tmp_path):
    config = make_config(toy_shards, tmp_path / "run", train={"steps": 2})
    assert main(["train", *_overrides(config)]) == 0
    noise = np.random.default_rng(0).standard_normal((5, 2)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    out = str(tmp_path / "v.npz")
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--steps", "2", "--noise",
                 str(tmp_path / "noise.npy"), "--out", out]) == 0
    z = np.load(out)
    assert set(z.files) == {"samples"} and z["samples"].dtype == np.float32 and z["samples"].shape == (5, 2)

    ckpt = checkpoint.load(str(tmp_path / "run"))
    model_space = generate(ema_model(ckpt), Config.from_dict(ckpt["config"]), torch.from_numpy(noise), steps=2,
                           generator=torch.Generator().manual_seed(0))
    stats = ckpt["manifest"]["stats"]
    expected = model_space.double().numpy() / 0.5 * np.array(stats["std"]) + np.array(stats["mean"])
    np.testing.assert_allclose(z["samples"], expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(z["samples"], model_space.numpy(), atol=1e-2)  # denormalized, not model space


def test_sample_with_guidance(digit_shards, make_config, tmp_path):
    """--guidance: CFG scale of a class-conditional teacher, guidance input of an sCD student trained with scales
    drawn per sample (objective.guidance_max); refused by a model that takes none."""
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    assert main(["train", *_overrides(make_config(digit_shards, teacher, objective={"kind": "diffusion"}))]) == 0
    assert main(["train", *_overrides(make_config(
        digit_shards, student, model={"guidance_input": True},
        objective={"kind": "scd", "teacher": str(teacher), "guidance_max": 2.0}))]) == 0

    def sample(run, *args):
        out = str(tmp_path / "g.npz")
        assert main(["sample", "--checkpoint", str(run), "--n", "4", "--steps", "2", *args, "--out", out]) == 0
        return np.load(out)["samples"]

    for run in (teacher, student):
        unguided = sample(run)
        np.testing.assert_array_equal(sample(run, "--guidance", "1"), unguided)  # the default: 1
        assert not np.allclose(sample(run, "--guidance", "2"), unguided)
    assert main(["train", *_overrides(make_config(digit_shards, tmp_path / "sct"))]) == 0
    with pytest.raises(SystemExit, match="--guidance: guidance 2.0: only a class-conditional diffusion model"):
        sample(tmp_path / "sct", "--guidance", "2")


def test_dry_run_prints_the_resolved_config(capsys):
    assert main(["train", "--config", os.path.join(ROOT, "jobs/configs/cifar10-sct.yaml"), "train.steps=7",
                 "--dry-run"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["steps"] == 7 and resolved["model"]["size"] == "cifar10"
    assert Config.from_dict(resolved).optim.name == "radam"


def test_bad_config_exits_2_naming_the_field(caplog):
    code = main(["train", "--config", os.path.join(ROOT, "jobs/configs/toy-sct.yaml"), "objective.kind=foo"])
    assert code == 2 and "objective.kind: 'foo' is not one of diffusion, sct, scd" in caplog.text


def test_services_status_of_an_empty_home(tmp_path, capsys):
    assert main(["services", "status", "--home", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == {"storage": None, "mlflow": None}


@pytest.mark.parametrize("command", ["prepare", "train", "sample", "services"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "usage: scmlab " + command in capsys.readouterr().out


def test_jobs_entrypoint_runs_the_cli():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "jobs/train.py"), "--config",
                        os.path.join(ROOT, "jobs/configs/toy-sct.yaml"), "--dry-run"], env=ENV, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and yaml.safe_load(r.stdout)["model"]["arch"] == "mlp"


BENCH_WITH_TORCH_ONLY = """
import json, sys
for name in ("yaml", "webdataset", "PIL", "tqdm.contrib", "sklearn"):
    sys.modules[name] = None  # any import of these now fails
import torch
from scmlab import bench
print(json.dumps(bench.bench_case("dit", "ci", (1, 8, 8), 2, torch.device("cpu"), warmup=1, iters=2)))
"""


def test_bench_needs_torch_only():
    r = subprocess.run([sys.executable, "-c", BENCH_WITH_TORCH_ONLY], env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(result["step_ms"]) == {"diffusion", "sct_autograd", "sct_fd", "sct_fused"}
    assert all(v > 0 for v in result["step_ms"].values()) and result["ratio"]["sct_fused"] > 0
    assert result["peak_mem_MiB"] is None and result["tflop_per_s"] is None  # no allocator peak on the CPU
    flops = result["gflop_per_step"]
    assert 0 < flops["diffusion"] < flops["sct_fused"] < flops["sct_autograd"]

BASE_INSTALL = """
import sys
for name in ("ray", "mlflow", "psutil", "scipy", "matplotlib", "sklearn", "seaweedfs", "jsonschema", "pytest"):
    sys.modules[name] = None  # as if not installed: importing it fails, importlib.util.find_spec finds nothing
from scmlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_base_install_runs_the_cli_without_the_extras(tmp_path):
    """What `pip install scmlab` (no extras) gives: help, prepare, train on local shards and sample work with every
    extra's package unimportable."""
    def scmlab(*args):
        r = subprocess.run([sys.executable, "-c", BASE_INSTALL, *args], env=ENV, cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        return r

    assert "prepare" in scmlab("--help").stdout
    scmlab("prepare", "toy-gmm", "--out", "shards", "--limit", "256", "--shard-size", "128")
    scmlab("train", "--config", os.path.join(ROOT, "jobs/configs/toy-sct.yaml"), "data.train=shards",
           "run.dir=run", "model.size=tiny", "train.steps=2", "train.batch_size=8", "train.sample_every=0",
           "tracking.kind=none")
    scmlab("sample", "--checkpoint", "run", "--n", "4", "--out", "s.npz")
    assert np.load(tmp_path / "s.npz")["samples"].shape == (4, 2)


def test_overrides_are_taken_anywhere_on_the_line(tmp_path, capsys):
    config = os.path.join(ROOT, "jobs/configs/toy-sct.yaml")
    assert main(["train", "train.steps=3", "--config", config, "--dry-run", "optim.lr=2e-4"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert (resolved["train"]["steps"], resolved["optim"]["lr"]) == (3, 2e-4)
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", config, "--dry-run", "--no-such-option"])
    assert e.value.code == 2
