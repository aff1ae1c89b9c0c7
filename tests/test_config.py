"""The config: validation messages name the field, overrides parse as YAML, per-size tables resolve, presets and
README stay in sync (the paper's values in the presets: test_presets.py)."""

import dataclasses
import glob
import json
import math
import os
import re

import pytest
import yaml

from scmlab.config import SECTIONS, Config, ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ["data.train=shards/x", "model.arch=mlp", "model.size=tiny", "run.dir=runs/x"]


def load(*overrides):
    return load_config(None, [*REQUIRED, *overrides])


@pytest.mark.parametrize("override, message", [
    ("objective.kind=foo", "objective.kind: 'foo' is not one of diffusion, sct, scd"),
    ("model.arch=transformer", "model.arch: 'transformer' is not one of mlp, unet"),
    ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
    ("optim.lr=0", "optim.lr: must be > 0"),
    ("train.steps=1.5", "train.steps: expected an integer, got 1.5"),
    ("objective.tangent_norm=l1", "objective.tangent_norm: 'l1' is not one of l2, rms, clip, none"),
    ("model.double_norm=maybe", "model.double_norm: expected true or false"),
    ("optim.betas=[0.9]", "optim.betas: must be two numbers"),
    ("optim.schedule=inv_sqrt", "optim.t_ref: must be > 0 with optim.schedule=inv_sqrt"),
    ("train.precision=fp16", "train.precision: 'fp16' is not one of auto, fp32, bf16"),
    ("train.parallel=zero3", "train.parallel: 'zero3' is not one of ddp, fsdp"),
    ("optim.lr=.inf", "optim.lr: expected a finite number, got inf"),
    ("objective.P_mean=.nan", "objective.P_mean: expected a finite number, got nan"),
    ("train.ema_half_life=-.inf", "train.ema_half_life: expected a finite number, got -inf"),
    ("optim.betas=[0.9,.nan]", "optim.betas[1]: expected a finite number, got nan"),
    ("optim.grad_clip=inf", "optim.grad_clip: expected a finite number, got 'inf'"),
    ("optim.eps=0", "optim.eps: must be > 0"),
    ("objective.guidance_max=0.5", "objective.guidance_max: must be >= 1"),
    ("model.dropout_max_res=0", "model.dropout_max_res: must be >= 1 or null"),
    ("model.dropout_max_res=16", "model.dropout_max_res: only the UNet has resolutions"),
    ("train.sample_guidance=-1", "train.sample_guidance: must be >= 0"),
])
def test_bad_value_names_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        load(override)
    assert message in str(e.value)


def test_unknown_key_is_named_with_close_matches():
    with pytest.raises(ConfigError, match=r"train\.stepz: unknown key; did you mean train\.steps\?"):
        load("train.stepz=3")
    with pytest.raises(ConfigError, match=r"objectiv: unknown key; did you mean objective\?"):
        load("objectiv.kind=sct")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate: unknown key"):
        Config.from_dict({**load().to_dict(), "optim": {"learning_rate": 1e-3}})


def test_missing_required_keys_say_what_to_set():
    with pytest.raises(ConfigError, match="data.train is required"):
        load_config(None, REQUIRED[1:])
    with pytest.raises(ConfigError, match="run.dir is required"):
        load_config(None, REQUIRED[:3])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="objective.teacher is required for objective.kind=scd"):
        load("objective.kind=scd")
    assert load("objective.kind=scd", "objective.teacher=runs/t").objective.teacher == "runs/t"
    with pytest.raises(ConfigError, match="objective.teacher is only used by sct and scd"):
        load("objective.kind=diffusion", "objective.teacher=runs/t")
    with pytest.raises(ConfigError, match="objective.guidance_scale applies to the sCD teacher only"):
        load("objective.guidance_scale=2")
    with pytest.raises(ConfigError, match="model.guidance_input"):
        load("model.guidance_input=true")
    scd = ("objective.kind=scd", "objective.teacher=runs/t")
    with pytest.raises(ConfigError, match="objective.guidance_max applies to sCD only"):
        load("objective.guidance_max=2")
    with pytest.raises(ConfigError, match="objective.guidance_max: .* set model.guidance_input=true"):
        load(*scd, "objective.guidance_max=2")
    with pytest.raises(ConfigError, match="objective.guidance_scale must stay 1"):
        load(*scd, "model.guidance_input=true", "objective.guidance_max=2", "objective.guidance_scale=1.5")
    with pytest.raises(ConfigError, match="train.sample_guidance: only a diffusion model"):
        load("train.sample_guidance=1.2")
    guided = load(*scd, "model.guidance_input=true", "objective.guidance_max=2", "train.sample_guidance=1.2")
    assert (guided.objective.guidance_max, guided.train.sample_guidance) == (2.0, 1.2)
    assert load("objective.kind=diffusion", "train.sample_guidance=1.4").train.sample_guidance == 1.4


def test_overrides_parse_as_yaml_scalars():
    c = load("optim.lr=1e-4", "train.steps=7", "model.dropout=null", "model.double_norm=false",
             "optim.betas=[0.8, 0.95]", "objective.P_mean=-0.8", "model.dropout=0.25")
    assert c.optim.lr == 1e-4 and isinstance(c.optim.lr, float)  # PyYAML reads '1e-4' as a string
    assert c.train.steps == 7 and c.model.double_norm is False
    assert c.optim.betas == [0.8, 0.95] and c.objective.P_mean == -0.8
    assert c.model.dropout == 0.25  # the later override wins
    assert load("model.dropout=null").model.dropout is None
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load("train.steps")
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load("steps=3")


def test_file_then_overrides_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: a}\nmodel: {arch: unet, size: ci}\nrun: {dir: r}\ntrain: {steps: 5, seed: 3}\n")
    c = load_config(str(path), ["train.steps=9"])
    assert (c.train.steps, c.train.seed, c.model.arch) == (9, 3, "unet")
    assert Config.from_dict(yaml.safe_load(c.to_yaml())) == c
    assert Config.from_dict(c.to_dict()) == c


PER_SIZE_PRESET = """
data: {train: shards/x}
model: {arch: unet, size: M, dropout: 0.3}
run: {dir: runs/x}
per_size:
  S: {optim.lr: 1.0e-4, run.dir: runs/x-S}
  M: {optim.lr: 9.0e-5, model.dropout: 0.1, run.dir: runs/x-M}
"""


def test_per_size_table_resolves_for_the_model_size(tmp_path):
    """The row of the resolved model.size applies over the file; overrides apply over the row."""
    path = tmp_path / "preset.yaml"
    path.write_text(PER_SIZE_PRESET)
    m = load_config(str(path))
    assert (m.optim.lr, m.model.dropout, m.run.dir) == (9e-5, 0.1, "runs/x-M")
    s = load_config(str(path), ["model.size=S"])
    assert (s.optim.lr, s.model.dropout, s.run.dir) == (1e-4, 0.3, "runs/x-S")  # S's row leaves dropout alone
    assert load_config(str(path), ["optim.lr=3e-5", "model.size=S"]).optim.lr == 3e-5
    assert "per_size" not in yaml.safe_load(m.to_yaml())
    with pytest.raises(ConfigError, match="model.size: 'XL' has no row in the per_size table .* S, M"):
        load_config(str(path), ["model.size=XL"])
    path.write_text(PER_SIZE_PRESET.replace("optim.lr: 1.0e-4", "optim.learning_rate: 1.0e-4"))
    with pytest.raises(ConfigError, match=r"optim\.learning_rate: unknown key"):
        load_config(str(path), ["model.size=S"])
    path.write_text(PER_SIZE_PRESET.replace("optim.lr: 1.0e-4", "lr: 1.0e-4"))
    with pytest.raises(ConfigError, match="per_size row S: 'lr' is not of the form section.key"):
        load_config(str(path), ["model.size=S"])


def test_lr_schedule():
    c = load("optim.schedule=inv_sqrt", "optim.t_ref=100", "optim.lr=1e-3")
    assert c.optim.lr_at(0) == c.optim.lr_at(99) == 1e-3
    assert math.isclose(c.optim.lr_at(400), 1e-3 / 2)
    w = load("optim.warmup=10", "optim.lr=1e-3").optim
    assert math.isclose(w.lr_at(0), 1e-4) and w.lr_at(9) == w.lr_at(500) == 1e-3


PRESETS = sorted(glob.glob(os.path.join(ROOT, "jobs", "configs", "*.yaml")))


def test_presets_exist():
    names = {os.path.basename(p) for p in PRESETS}
    assert {"toy-sct.yaml", "digits-diffusion.yaml", "digits-sct.yaml", "fashion-mnist-sct.yaml",
            "cifar10-diffusion.yaml", "cifar10-sct.yaml", "cifar10-scd.yaml", "imagenet64-diffusion.yaml",
            "imagenet64-sct.yaml", "imagenet64-scd.yaml", "imagenet512-diffusion.yaml", "imagenet512-sct.yaml",
            "imagenet512-scd.yaml"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_every_preset_validates(path):
    """Training presets load as a Config; sweep presets (sweep-*.yaml) as a Config plus their sweep block."""
    from scmlab.nets import PRESETS as NET_PRESETS

    if os.path.basename(path).startswith("sweep-"):
        from scmlab.tune.sweep import load_sweep

        c, sweep = load_sweep(path, ["tracking.uri=sqlite:///unused.db"])  # a sweep needs MLflow
        assert set(sweep.sizes) <= set(NET_PRESETS[c.model.arch])
    else:
        c = load_config(path)
    assert c.model.size in NET_PRESETS[c.model.arch]


def test_readme_documents_every_key():
    readme = open(os.path.join(ROOT, "README.md")).read()
    documented = set(re.findall(r"^\| `(\w+\.\w+)` \|", readme, flags=re.M))
    keys = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert keys == documented


def test_paths_resolve_against_the_working_directory_and_a_job_refuses_relative_outputs(tmp_path, monkeypatch):
    """Relative paths mean the driver's working directory; in a job submitted with --working-dir (Ray's unpacked copy
    of it) relative inputs still do, but a relative output is refused, naming the field."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    model = {"arch": "mlp", "size": "tiny"}
    config = Config.from_dict({"data": {"train": "shards/toy"}, "model": model,
                               "run": {"dir": "runs/a", "storage": "s3://b/ray"},
                               "tracking": {"uri": "sqlite:///mlflow.db"}}).with_absolute_paths()
    assert (config.data.train, config.run.dir) == (str(tmp_path / "shards/toy"), str(tmp_path / "runs/a"))
    assert (config.run.storage, config.tracking.uri) == ("s3://b/ray", f"sqlite:///{tmp_path / 'mlflow.db'}")

    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}  # as Ray's job supervisor sets it
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    inputs = {"data": {"train": "shards/toy"}, "model": model, "run": {"dir": str(tmp_path / "runs/a")}}
    assert Config.from_dict(inputs).with_absolute_paths().data.train == str(tmp_path / "shards/toy")
    for field, value in (("run.dir", "runs/a"), ("run.storage", "ray"), ("tracking.uri", "sqlite:///mlflow.db")):
        section, key = field.split(".")
        d = {**inputs, section: {**inputs.get(section, {}), key: value}}
        with pytest.raises(ConfigError, match=rf"{field}: '.*' is relative, and this Ray job runs in Ray's unpacked "
                                              rf"copy of --working-dir \(gcs://_ray_pkg_1.zip = {tmp_path}\)"):
            Config.from_dict(d).with_absolute_paths()
