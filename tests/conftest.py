"""Shared fixtures: tiny shard datasets (written once per session) and debug-size configs over them."""

import pytest

from scmlab import data
from scmlab.config import Config


@pytest.fixture(scope="session")
def toy_shards(tmp_path_factory) -> str:
    """512 2-D vectors from an 8-mode Gaussian mixture, unconditional, 2 shards."""
    out = str(tmp_path_factory.mktemp("toy"))
    data.prepare("toy-gmm", out, shard_size=256, limit=512, progress=False)
    return out


@pytest.fixture(scope="session")
def digit_shards(tmp_path_factory) -> str:
    """128 8x8 grayscale digits with 10 classes, 2 shards."""
    out = str(tmp_path_factory.mktemp("digits"))
    data.prepare("digits", out, shard_size=64, limit=128, progress=False)
    return out


def tiny_config(shards: str, run_dir, **sections) -> Config:
    """A CPU, debug-size config: MLP 'tiny' on vectors or UNet 'ci' on images; `sections` update the defaults,
    e.g. tiny_config(url, dir, train={"steps": 4}, objective={"kind": "diffusion"})."""
    image = data.read_manifest(shards)["kind"] == "image"
    d = {
        "data": {"train": shards},
        "model": {"arch": "unet", "size": "ci"} if image else {"arch": "mlp", "size": "tiny"},
        "objective": {"kind": "sct", "warmup_steps": 4},
        "optim": {"lr": 1e-3},
        "train": {"steps": 2, "batch_size": 8, "log_every": 1, "checkpoint_every": 1, "device": "cpu",
                  "ema_half_life": 100},
        "run": {"dir": str(run_dir)},
    }
    for name, values in sections.items():
        d[name] = {**d.get(name, {}), **values}
    return Config.from_dict(d)


@pytest.fixture
def make_config():
    return tiny_config
