"""The training loop and checkpoints: atomic writes, exact resume, the NaN guard, teachers, sample grids."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from scmlab import data
from scmlab.config import ConfigError
from scmlab.train import TrainingDiverged, checkpoint, train
from scmlab.train import loop as loop_module


def params(state: dict) -> dict:
    return {k: v.clone() for k, v in state.items()}


# ---- checkpoints ---------------------------------------------------------------------------------------------------

def test_latest_ignores_temporary_and_foreign_files(tmp_path):
    assert checkpoint.latest(str(tmp_path)) is None
    path = checkpoint.save(str(tmp_path), {"step": 3, "w": torch.ones(2)})
    directory = checkpoint.checkpoint_dir(str(tmp_path))
    for junk in (".step-000000009.pt.tmp", "step-000000010.pt.tmp", "step-11.pt", "notes.txt"):
        with open(os.path.join(directory, junk), "wb") as f:
            f.write(b"partial")
    assert checkpoint.latest(str(tmp_path)) == path
    assert checkpoint.load(str(tmp_path))["step"] == 3  # a run directory stands for its latest checkpoint


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    good = checkpoint.save(str(tmp_path), {"step": 1, "w": torch.ones(2)})

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(str(tmp_path), {"step": 2, "w": torch.zeros(2)})
    assert checkpoint.latest(str(tmp_path)) == good
    assert os.listdir(checkpoint.checkpoint_dir(str(tmp_path))) == [os.path.basename(good)]  # temp file removed


def test_keep_prunes_old_checkpoints(tmp_path):
    for step in range(1, 5):
        checkpoint.save(str(tmp_path), {"step": step}, keep=2)
    assert sorted(os.listdir(checkpoint.checkpoint_dir(str(tmp_path)))) == ["step-000000003.pt", "step-000000004.pt"]


# ---- the loop ------------------------------------------------------------------------------------------------------

def step_indexed_loader(url, *, batch_size, seed, rank=0, world_size=1, num_workers=0, start_step=0,
                        on_error="raise", pin_memory=False):
    """Batch k is a function of (seed, rank, k) only, so a resumed run sees the same data as a straight one (the
    real loader reseeds its shuffle on restart: statistically, not bitwise, equivalent)."""
    manifest = data.read_manifest(url)
    step = start_step
    while True:
        g = torch.Generator().manual_seed(loop_module.step_seed(seed + 1, rank, step))
        yield torch.randn((batch_size, *manifest["shape"]), generator=g) * 0.5, None
        step += 1


def test_resume_reproduces_an_uninterrupted_run(toy_shards, make_config, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "make_loader", step_indexed_loader)
    sections = dict(model={"dropout": 0.2}, train={"steps": 6, "checkpoint_every": 3})
    straight = train(make_config(toy_shards, tmp_path / "a", **sections))
    half = make_config(toy_shards, tmp_path / "b", **{**sections, "train": {"steps": 3, "checkpoint_every": 3}})
    assert train(half)["step"] == 3
    resumed = train(make_config(toy_shards, tmp_path / "b", **sections))
    assert resumed["step"] == straight["step"] == 6
    a, b = checkpoint.load(straight["checkpoint"]), checkpoint.load(resumed["checkpoint"])
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(state_a[i]["exp_avg_sq"], state_b[i]["exp_avg_sq"]) for i in state_a)
    assert resumed["metrics"]["loss/mean"] == pytest.approx(straight["metrics"]["loss/mean"], rel=0, abs=0)


def test_summary_metrics_are_namespaced_and_binned_by_t(toy_shards, make_config, tmp_path):
    summary = train(make_config(toy_shards, tmp_path, train={"steps": 3, "batch_size": 64}))
    m = summary["metrics"]
    assert np.isfinite(m["loss/mean"]) and m["tangent/rms"] > 0 and m["data/samples_seen"] == 3 * 64
    assert any(k.startswith("loss/bin") for k in m) and all(np.isfinite(v) for v in m.values())
    assert {"optim/lr", "optim/grad_norm", "time/step_s", "train/skipped_steps"} <= m.keys()
    assert os.path.isfile(os.path.join(tmp_path, "config.yaml"))


def nan_at(steps):
    """Wrap build_objective so that the loss is NaN at the given steps (a callable or a set)."""
    real = loop_module.build_objective
    bad = steps if callable(steps) else steps.__contains__

    def build(config, teacher):
        objective = real(config, teacher)

        def poisoned(net, x0, labels=None, *, step, **kw):
            loss, stats = objective(net, x0, labels, step=step, **kw)
            return (loss * float("nan") if bad(step) else loss), stats
        return poisoned
    return build


def test_nan_steps_are_skipped_and_counted(toy_shards, make_config, tmp_path, monkeypatch):
    monkeypatch.setattr(loop_module, "build_objective", nan_at({1, 3}))
    summary = train(make_config(toy_shards, tmp_path, train={"steps": 5, "log_every": 5}))
    assert summary["bad_steps"] == 2 and summary["metrics"]["train/skipped_steps"] == 2
    ckpt = checkpoint.load(summary["checkpoint"])
    assert all(s["step"] == 3 for s in ckpt["optimizer"]["state"].values())  # 5 steps, 2 not applied
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_repeated_nans_stop_with_the_last_good_checkpoint_intact(toy_shards, make_config, tmp_path, monkeypatch):
    monkeypatch.setattr(loop_module, "build_objective", nan_at(lambda step: step >= 4))
    config = make_config(toy_shards, tmp_path, train={"steps": 20, "checkpoint_every": 2, "max_bad_steps": 3})
    with pytest.raises(TrainingDiverged) as e:
        train(config)
    last_good = os.path.join(tmp_path, "checkpoints", "step-000000006.pt")
    assert "3 consecutive steps" in str(e.value) and last_good in str(e.value)
    assert checkpoint.latest(str(tmp_path)) == last_good
    ckpt = checkpoint.load(last_good)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert all(s["step"] == 4 for s in ckpt["optimizer"]["state"].values())  # steps 0..3 applied, 4 and 5 skipped


def inf_after(k: int, where: str):
    """Wrap build_optimizer so that, right after the k-th update (the loss of that step was finite), one entry of
    the first weight (`model`) or of the optimizer state (`optimizer`) becomes inf."""
    real = loop_module.build_optimizer

    def build(config, params, *device):
        params = list(params)
        optimizer = real(config, params, *device)
        update, calls = optimizer.step, []

        def step():
            update()
            calls.append(step)
            if len(calls) == k:
                with torch.no_grad():
                    target = params[0] if where == "model" else optimizer.state[params[0]]["exp_avg_sq"]
                    target.view(-1)[0] = float("inf")
        optimizer.step = step
        return optimizer
    return build


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_non_finite_weights_are_never_checkpointed(toy_shards, make_config, tmp_path, monkeypatch, where):
    monkeypatch.setattr(loop_module, "build_optimizer", inf_after(4, where))
    config = make_config(toy_shards, tmp_path, train={"steps": 20, "checkpoint_every": 1, "keep_checkpoints": 1,
                                                      "max_bad_steps": 100})
    with pytest.raises(TrainingDiverged) as e:
        train(config)
    last_good = os.path.join(tmp_path, "checkpoints", "step-000000003.pt")
    assert f"step 4: non-finite values in {where}." in str(e.value)
    assert f"Last good checkpoint: {last_good}" in str(e.value)
    assert os.listdir(os.path.join(tmp_path, "checkpoints")) == ["step-000000003.pt"]  # pruning kept a finite one
    ckpt = checkpoint.load(last_good)
    tensors = [*ckpt["model"].values(), *ckpt["ema"].values(),
               *(v for s in ckpt["optimizer"]["state"].values() for v in s.values())]
    assert all(torch.isfinite(v).all() for v in tensors)


def test_scd_distils_a_frozen_teacher_and_starts_from_its_ema(toy_shards, make_config, tmp_path):
    teacher = train(make_config(toy_shards, tmp_path / "teacher", objective={"kind": "diffusion"}))
    student_cfg = make_config(toy_shards, tmp_path / "student", objective={"kind": "scd", "teacher":
                                                                              str(tmp_path / "teacher")},
                              optim={"lr": 1e-12}, train={"steps": 1})
    student = train(student_cfg)
    teacher_ema = checkpoint.load(teacher["checkpoint"])["ema"]
    student_model = checkpoint.load(student["checkpoint"])["model"]
    for name, value in teacher_ema.items():
        torch.testing.assert_close(student_model[name], value, rtol=0, atol=1e-8)
    assert np.isfinite(student["metrics"]["loss/mean"])


def snapshot(root) -> dict:
    """{relative path: bytes} of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resuming_another_run_is_refused_unless_forced(toy_shards, digit_shards, make_config, tmp_path, caplog):
    from scmlab import cli

    teacher = tmp_path / "teacher"  # a diffusion teacher's run directory, reused by mistake for sCT
    train(make_config(toy_shards, teacher, objective={"kind": "diffusion"}, train={"steps": 3, "keep_checkpoints": 2}))
    before = snapshot(teacher)
    command = ["train", "--config", str(teacher / "config.yaml")]
    for overrides, difference in (
            (["objective.kind=sct"], "objective.kind 'diffusion' -> 'sct'"),
            (["model.size=small"], "model.size 'tiny' -> 'small'"),
            ([f"data.train={digit_shards}", "model.arch=unet", "model.size=ci"],
             "model.arch 'mlp' -> 'unet'; model.size 'tiny' -> 'ci'; data shape [2] -> [1, 8, 8]; data num_classes "
             "0 -> 10"),
            (["optim.lr=.inf"], "optim.lr: expected a finite number, got inf")):
        assert cli.main([*command, *overrides]) == 2
        assert difference in caplog.records[-1].getMessage()
    assert "run.dir: " + str(teacher / "checkpoints" / "step-000000003.pt") + " is a checkpoint of another run" in \
        caplog.text and "--force-resume" in caplog.text
    with pytest.raises(ConfigError, match="objective.kind 'diffusion' -> 'sct'"):  # the loop's own check
        train(make_config(toy_shards, teacher, objective={"kind": "sct"}))
    assert snapshot(teacher) == before  # nothing written, nothing pruned

    assert cli.main([*command, "objective.kind=sct", "train.steps=4", "--force-resume"]) == 0
    resumed = checkpoint.load(str(teacher))
    assert (resumed["step"], resumed["config"]["objective"]["kind"]) == (4, "sct")


def test_a_second_run_on_one_run_dir_or_ray_run_is_refused_and_a_killed_one_leaves_no_lock(toy_shards, make_config,
                                                                                             tmp_path, caplog):
    from scmlab import cli
    from scmlab.train import lock

    run_dir = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(make_config(toy_shards, run_dir, train={"steps": 10**6, "log_every": 1000,
                                                              "checkpoint_every": 50}).to_yaml())
    first = subprocess.Popen([sys.executable, "-m", "scmlab.cli", "train", "--config", str(config)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while f'"pid": {first.pid},' not in _read(run_dir / lock.LOCK_FILE) and time.monotonic() < deadline:
            assert first.poll() is None
            time.sleep(0.1)
        assert cli.main(["train", "--config", str(config), "train.steps=1"]) == 2
        assert f"run.dir {run_dir} is in use by another run (pid {first.pid} on " in caplog.text
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a crash: the lock goes with the process
        first.wait()
    assert cli.main(["train", "--config", str(config), "train.steps=1"]) == 0

    # A Ray run is locked by its storage and name, whatever run.dir: through a lock file on this machine for s3://.
    for storage in (str(tmp_path / "ray"), "s3://scmlab/ray"):
        a, b = (make_config(toy_shards, tmp_path / name, train={"workers": 2},
                            run={"storage": storage, "name": "shared"}) for name in ("a", "b"))
        with lock.held(a):
            with pytest.raises(lock.RunInUse, match=f"Ray run {storage}/shared is in use by another run \\(pid "
                                                    f"{os.getpid()} "):
                with lock.held(b):
                    pass
        with lock.held(b):  # released with its holder
            pass


def _read(path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_teacher_with_other_data_is_rejected(toy_shards, digit_shards, make_config, tmp_path):
    train(make_config(toy_shards, tmp_path / "teacher", objective={"kind": "diffusion"}, train={"steps": 1}))
    config = make_config(digit_shards, tmp_path / "student",
                         objective={"kind": "scd", "teacher": str(tmp_path / "teacher")})
    with pytest.raises(ValueError, match="objective.teacher: the teacher's data shape"):
        train(config)


@pytest.mark.parametrize("kind", ["sct", "diffusion"])
def test_sample_grids_are_written(digit_shards, make_config, tmp_path, kind):
    from PIL import Image

    summary = train(make_config(digit_shards, tmp_path, objective={"kind": kind},
                                train={"steps": 1, "sample_every": 1, "sample_steps": 2}))
    image = Image.open(summary["samples"])
    assert image.size[0] >= 64 and image.size == (image.size[0], image.size[0])  # 8x8 grid of 8x8 digits, enlarged


def test_vector_grid_is_a_scatter_plot(toy_shards, make_config, tmp_path):
    from PIL import Image

    summary = train(make_config(toy_shards, tmp_path, train={"steps": 1, "sample_every": 1}))
    pixels = np.asarray(Image.open(summary["samples"]).convert("L"))
    assert 0 < (pixels < 128).mean() < 0.5  # dots on a white background


def test_guidance_needs_class_labels(toy_shards, make_config, tmp_path):
    config = make_config(toy_shards, tmp_path, model={"guidance_input": True},
                         objective={"kind": "scd", "teacher": str(tmp_path / "none"), "guidance_max": 2.0})
    with pytest.raises(ValueError, match="classifier-free guidance needs class labels"):
        train(config)


def test_sigma_d_must_match_the_dataset(toy_shards, make_config, tmp_path):
    with pytest.raises(ValueError, match="objective.sigma_d: 1.0 differs from the dataset's sigma_d 0.5"):
        train(make_config(toy_shards, tmp_path, objective={"sigma_d": 1.0}))
