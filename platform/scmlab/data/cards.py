"""Dataset cards: one declarative YAML file per dataset (datasets/NAME.yaml), and the SOURCE strings naming them.

A card:
    name: toy-gmm                 # shard file prefix and manifest name
    description: ...              # where the data comes from (shown in errors when it is missing)
    reader: {type: gmm, count: 50000, seed: 0}   # a reader of scmlab.data.readers.READERS and its arguments
    resolution: 32                # images: output size (center crop to square, then resize), optional
    channels: 3                   # images: 1 (grayscale) or 3 (RGB), optional
    num_classes: 10               # optional; default the reader's; 0 drops labels (unconditional)
    sigma_d: 0.5                  # data standard deviation in model space (DESIGN section 2)
    shard_size: 10000             # samples per shard
    splits: {test: {split: test}} # optional: reader arguments of splits other than `train` (the `reader` itself)

SOURCE is one of
- a card name: datasets/NAME.yaml, looked up in ./datasets (the current directory, as in a Ray job's working dir)
  and then in the datasets/ of the checkout that holds this package;
- a path to a card file (*.yaml / *.yml);
- TYPE:PATH for a reader that takes a path, without a card: `npy:x.npy`, `folder:images/`, `cifar10:archive.tar.gz`.
Options override card fields (a key of the card) or reader arguments (any other key), e.g. {"count": 1000}.
A split other than `train` (`scmlab prepare digits --split test`) updates the reader with the card's `splits` entry.
"""

import inspect
import math
import re
from collections.abc import Mapping
from pathlib import Path

import yaml

from .readers import READERS
from .shards import DataError

FIELDS = ("name", "description", "reader", "resolution", "channels", "num_classes", "sigma_d", "shard_size", "splits")
TRAIN = "train"
DEFAULTS = {"sigma_d": 0.5, "shard_size": 10000}
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a shard file prefix that stays inside --out


def card_dirs() -> list[Path]:
    """Where card names are looked up, in order."""
    return [Path.cwd() / "datasets", Path(__file__).resolve().parents[3] / "datasets"]


def _card_file(name: str) -> Path:
    if name.endswith((".yaml", ".yml")):
        if not Path(name).is_file():
            raise DataError(f"dataset card {name}: no such file")
        return Path(name)
    for d in card_dirs():
        if (d / f"{name}.yaml").is_file():
            return d / f"{name}.yaml"
    known = sorted({p.stem for d in card_dirs() if d.is_dir() for p in d.glob("*.yaml")})
    raise DataError(f"unknown dataset {name!r}: no {name}.yaml in {', '.join(map(str, card_dirs()))}; known cards: "
                    f"{', '.join(known) or 'none'}; or use npy:FILE, folder:DIR, cifar10:ARCHIVE")


def load_card(source: str, options: Mapping | None = None, split: str = TRAIN) -> dict:
    """The resolved card of SOURCE for `split` (defaults filled in, the split's reader arguments and the options
    applied), validated."""
    kind, _, path = source.partition(":")
    if path and kind in READERS:
        card = {"name": re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(path).stem).lstrip(".-") or kind,
                "reader": {"type": kind, "path": path}}
    else:
        card_file = _card_file(source)
        card = yaml.safe_load(card_file.read_text())
        if not isinstance(card, dict) or not isinstance(card.get("reader"), dict):
            raise DataError(f"dataset card {card_file}: needs a mapping with a `reader:` mapping")
    card = DEFAULTS | card
    card["reader"] = dict(card["reader"])
    if split != TRAIN:
        splits = card.get("splits") or {}
        if split not in splits:
            raise DataError(f"dataset {card.get('name', source)}: no split {split!r}; its splits: "
                            f"{', '.join([TRAIN, *splits])} (a card lists the others under `splits:`)")
        card["reader"].update(splits[split])
    for key, value in (options or {}).items():
        (card if key in FIELDS else card["reader"])[key] = value
    _validate(card, source)
    return card


def _validate(card: dict, source: str) -> None:
    unknown = [k for k in card if k not in FIELDS]
    if unknown:
        raise DataError(f"dataset card {source}: unknown field(s) {unknown}; fields: {', '.join(FIELDS)}")
    if not card.get("name"):
        raise DataError(f"dataset card {source}: `name` is required")
    if not NAME.fullmatch(str(card["name"])):
        raise DataError(f"dataset card {source}: name {card['name']!r} must be a plain file name prefix (letters, "
                        f"digits, '_', '.', '-'; no '/' or leading '.'): shards are written as NAME-000000.tar "
                        f"inside --out")
    reader_type = card["reader"].get("type")
    if reader_type not in READERS:
        raise DataError(f"dataset card {source}: reader.type {reader_type!r} is not one of {', '.join(READERS)}")
    params = inspect.signature(READERS[reader_type]).parameters
    bad = [k for k in card["reader"] if k != "type" and k not in params]
    if bad:
        raise DataError(f"dataset card {source}: reader {reader_type!r} has no option(s) {bad}; options: "
                        f"{', '.join(params) or 'none'}")
    if card.get("channels") not in (None, 1, 3):
        raise DataError(f"dataset card {source}: channels must be 1 or 3, got {card['channels']}")
    if int(card["shard_size"]) < 1 or not float(card["sigma_d"]) > 0 or not math.isfinite(float(card["sigma_d"])):
        raise DataError(f"dataset card {source}: shard_size must be >= 1 and sigma_d a finite number > 0, got "
                        f"{card['shard_size']} and {card['sigma_d']}")
