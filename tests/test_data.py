"""Data layer: cards and readers -> shards + manifest -> loader batches; error reporting; URL handling."""

import gzip
import hashlib
import io
import itertools
import json
import logging
import os
import pickle
import re
import subprocess
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from scmlab import data
from scmlab.data import DataError, Normalizer, make_loader, prepare, read_manifest, verify
from scmlab.data.readers import digits_test_index
from scmlab.data.shards import decode, read_shard

FASHION = "/usr/share/datasets/fashion-mnist"


def _all_samples(out: str) -> list[tuple[str, np.ndarray, int | None]]:
    """(key, x, label) of every sample of a prepared dataset, in stored order."""
    m = read_manifest(out)
    return [(s["__key__"], *decode(s, tuple(m["shape"]), m["num_classes"]))
            for shard in m["shards"] for s in read_shard(os.path.join(out, shard["name"]), shard["count"])]


def _pixels(x: np.ndarray) -> np.ndarray:
    """Decoded [-1, 1] pixels back to uint8, for exact comparisons."""
    return np.round((x + 1) * 127.5).astype(np.uint8)


def _vectors(tmp_path, n=40, labels=True) -> str:
    """An npy: source whose row i is (i, -i, i mod 5), so loader output maps back to sample indices."""
    i = np.arange(n, dtype=np.float32)
    np.save(tmp_path / "vec.npy", np.stack([i, -i, i % 5], axis=1))
    if labels:
        np.save(tmp_path / "vec_labels.npy", np.arange(n) % 4)
    return str(tmp_path / "vec.npy")


def _indices(x: torch.Tensor, manifest: dict) -> list[int]:
    return Normalizer(manifest).to_data(x.double())[:, 0].round().long().tolist()


def _write_tar(path, samples: list[dict]) -> None:
    """A shard written by plain tarfile: each sample {key: ..., ext: bytes}."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, payload in sample.items():
                if ext == "key":
                    continue
                info = tarfile.TarInfo(f"{sample['key']}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _npy_bytes(x) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(x, dtype=np.float32))
    return buf.getvalue()


def _png_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="png")
    return buf.getvalue()


def _manifest_for(directory, shards: list[tuple[str, int]], **fields) -> None:
    entries = []
    for name, count in shards:
        payload = (directory / name).read_bytes()
        entries.append({"name": name, "count": count, "sha256": hashlib.sha256(payload).hexdigest(),
                        "bytes": len(payload)})
    manifest = {"format": "scmlab-shards/1", "name": "handmade", "source": "test", "sigma_d": 0.5,
                "count": sum(c for _, c in shards), "shards": entries} | fields
    (directory / "manifest.json").write_text(json.dumps(manifest))


# --- round trips -------------------------------------------------------------------------------------------------

def test_vector_round_trip(tmp_path):
    src = _vectors(tmp_path)
    out = tmp_path / "vec"
    m = prepare(f"npy:{src}", str(out), shard_size=16, progress=False,
                options={"labels": str(tmp_path / "vec_labels.npy")})
    x = np.load(src)
    assert (m["kind"], m["shape"], m["count"], m["num_classes"]) == ("vector", [3], 40, 4)
    assert [s["count"] for s in m["shards"]] == [16, 16, 8]
    assert [s["name"] for s in m["shards"]] == [f"vec-{i:06d}.tar" for i in range(3)]
    for s in m["shards"]:
        payload = (out / s["name"]).read_bytes()
        assert s["sha256"] == hashlib.sha256(payload).hexdigest() and s["bytes"] == len(payload)
    np.testing.assert_allclose(m["stats"]["mean"], x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(m["stats"]["std"], x.std(0), rtol=1e-6)
    samples = _all_samples(str(out))
    assert [k for k, _, _ in samples] == [f"{i:08d}" for i in range(40)]
    np.testing.assert_array_equal(np.stack([v for _, v, _ in samples]), x)
    assert [y for _, _, y in samples] == list(np.arange(40) % 4)
    assert verify(str(out))["count"] == 40


def test_image_round_trip_nchw(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(20, 3, 5, 7), dtype=np.uint8)  # NCHW
    np.save(tmp_path / "img.npy", x)
    np.save(tmp_path / "lab.npy", np.arange(20) % 3)
    m = prepare(f"npy:{tmp_path / 'img.npy'}", str(tmp_path / "img"), shard_size=8, progress=False,
                options={"labels": str(tmp_path / "lab.npy")})
    assert (m["kind"], m["shape"], m["num_classes"]) == ("image", [3, 5, 7], 3)
    samples = _all_samples(str(tmp_path / "img"))
    np.testing.assert_array_equal(_pixels(np.stack([v for _, v, _ in samples])), x)
    assert [y for _, _, y in samples] == list(np.arange(20) % 3)
    pixels = x.astype(np.float64) / 127.5 - 1
    np.testing.assert_allclose(m["stats"]["mean"], pixels.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(m["stats"]["std"], pixels.std(axis=(0, 2, 3)), rtol=1e-9)
    xb, yb = next(make_loader(str(tmp_path / "img"), batch_size=5, seed=0))
    assert xb.shape == (5, 3, 5, 7) and xb.dtype == torch.float32 and yb.dtype == torch.long
    assert xb.min() >= -1 and xb.max() <= 1


def test_plain_tarfile_shards_are_read_by_loader(tmp_path):
    _write_tar(tmp_path / "h-000000.tar", [{"key": f"s{i}", "npy": _npy_bytes([i, 2 * i]), "cls": str(i % 2).encode()}
                                           for i in range(6)])
    _manifest_for(tmp_path, [("h-000000.tar", 6)], kind="vector", shape=[2], num_classes=2,
                  stats={"mean": [0.0, 0.0], "std": [1.0, 1.0]})
    batches = list(itertools.islice(make_loader(str(tmp_path), batch_size=6, seed=0), 5))
    values, y = torch.cat([x for x, _ in batches]) / 0.5, torch.cat([y for _, y in batches])  # sigma_d 0.5, unit stats
    assert set(values[:, 0].round().long().tolist()) == set(range(6))  # resampled: every sample, some repeated
    assert torch.equal(values[:, 1], 2 * values[:, 0]) and torch.equal(y, values[:, 0].long() % 2)


def test_stock_webdataset_and_tar_read_our_shards(tmp_path):
    m = prepare("digits", str(tmp_path), limit=30, shard_size=10, progress=False)
    pattern = str(tmp_path / "digits-{000000..000002}.tar")
    stock = list(wds.WebDataset(pattern, shardshuffle=False).decode("l8").to_tuple("__key__", "png", "cls"))
    ours = _all_samples(str(tmp_path))
    assert [k for k, _, _ in stock] == [k for k, _, _ in ours]
    for (_, img, cls), (_, x, y) in zip(stock, ours):
        np.testing.assert_array_equal(img, _pixels(x[0]))
        assert cls == y
    listing = subprocess.run(["tar", "-tf", str(tmp_path / m["shards"][0]["name"])], capture_output=True,
                             text=True, check=True).stdout.split()
    assert sorted(listing) == sorted(f"{i:08d}.{ext}" for i in range(10) for ext in ("png", "cls"))


def test_brace_pattern_url_reads_only_those_shards(tmp_path):
    m = prepare(f"npy:{_vectors(tmp_path, labels=False)}", str(tmp_path / "v"), shard_size=10, progress=False)
    url = str(tmp_path / "v" / "vec-{000001..000002}.tar")
    seen = {i for x, _ in itertools.islice(make_loader(url, batch_size=10, seed=0), 20) for i in _indices(x, m)}
    assert seen == set(range(10, 30))
    with pytest.raises(DataError, match="vec-000009.tar"):
        make_loader(str(tmp_path / "v" / "vec-000009.tar"), batch_size=1, seed=0)


# --- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cut", ["inside_data", "at_member_boundary"])
def test_truncated_shard_error_names_it(tmp_path, cut):
    prepare("digits", str(tmp_path), limit=20, shard_size=10, progress=False)
    shard = tmp_path / "digits-000001.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[11]  # a member of the 6th sample, key 00000015
    # Cut inside a member's data: tarfile fails reading it. Cut where a member's header starts: the tar reads
    # cleanly up to there, and only the manifest's sample count reveals the loss.
    size = member.offset_data + member.size // 2 if cut == "inside_data" else member.offset
    shard.write_bytes(shard.read_bytes()[:size])
    message = r"unreadable at key '00000015'" if cut == "inside_data" else r"6 samples, the manifest says 10"
    loader = make_loader(str(tmp_path), batch_size=4, seed=0)
    with pytest.raises(DataError, match=rf"digits-000001\.tar: {message}"):
        for _ in range(50):
            next(loader)
    with pytest.raises(DataError, match="digits-000001.tar"):
        verify(str(tmp_path))


def test_shape_mismatch_names_shard_and_key(tmp_path):
    _write_tar(tmp_path / "h-000000.tar", [{"key": "good", "npy": _npy_bytes([1, 2])},
                                           {"key": "odd", "npy": _npy_bytes([1, 2, 3])}])
    _manifest_for(tmp_path, [("h-000000.tar", 2)], kind="vector", shape=[2], num_classes=0,
                  stats={"mean": [0.0, 0.0], "std": [1.0, 1.0]})
    with pytest.raises(DataError, match=r"h-000000\.tar, key 'odd': shape \[3\] differs"):
        next(make_loader(str(tmp_path), batch_size=2, seed=0))


def test_corrupt_sample_names_shard_and_key(tmp_path):
    good = _png_bytes(np.zeros((4, 4), np.uint8))
    _write_tar(tmp_path / "h-000000.tar", [{"key": "a", "png": good}, {"key": "b", "png": good[:20]}])
    _manifest_for(tmp_path, [("h-000000.tar", 2)], kind="image", shape=[1, 4, 4], num_classes=0,
                  stats={"mean": [0.0], "std": [1.0]})
    with pytest.raises(DataError, match=r"h-000000\.tar, key 'b': corrupt sample"):
        next(make_loader(str(tmp_path), batch_size=2, seed=0))


def test_skip_drops_and_counts_bad_samples(tmp_path, caplog):
    _write_tar(tmp_path / "h-000000.tar", [{"key": "a", "npy": _npy_bytes([1, 2])},
                                           {"key": "odd", "npy": _npy_bytes([1, 2, 3])},
                                           {"key": "bare", "txt": b"no sample member"},
                                           {"key": "b", "npy": _npy_bytes([3, 4])}])
    _manifest_for(tmp_path, [("h-000000.tar", 4)], kind="vector", shape=[2], num_classes=0,
                  stats={"mean": [0.0, 0.0], "std": [1.0, 1.0]})
    with pytest.raises(DataError, match=r"h-000000\.tar, key '(odd|bare)'"):
        list(itertools.islice(make_loader(str(tmp_path), batch_size=2, seed=0), 3))
    loader = make_loader(str(tmp_path), batch_size=2, seed=0, on_error="skip")  # an epoch: 2 good, 2 bad
    with caplog.at_level(logging.WARNING, logger="scmlab"):
        batches = [x / 0.5 for x, _ in itertools.islice(loader, 3)]  # sigma_d 0.5, unit stats
    assert all(sorted(x[:, 0].tolist()) == [1, 3] for x in batches)
    assert 4 <= loader.skipped <= 6  # epochs 0 and 1 counted; epoch 2's bad samples may come after its batch
    assert "key 'odd': shape [3] differs" in caplog.text and "key 'bare': no png or npy member" in caplog.text
    with pytest.raises(ValueError, match="on_error must be one of"):
        make_loader(str(tmp_path), batch_size=2, seed=0, on_error="ignore")


def test_missing_manifest_and_interrupted_prepare(tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(str(tmp_path))
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((4, 4), i, np.uint8)).save(images / f"{i}.png")
    out = str(tmp_path / "out")
    prepare(f"folder:{images}", out, progress=False)
    (images / "9.png").write_bytes(b"not a png")  # a re-run now fails mid-way
    with pytest.raises(Exception):
        prepare(f"folder:{images}", out, progress=False)
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(out)


def test_card_errors_name_the_field(tmp_path):
    card = tmp_path / "bad.yaml"
    card.write_text("name: bad\nreader: {type: gmm, count: 10}\nresoluton: 8\n")
    with pytest.raises(DataError, match="resoluton"):
        prepare(str(card), str(tmp_path / "o"), progress=False)
    with pytest.raises(DataError, match="no option.*colour.*count"):
        prepare("toy-gmm", str(tmp_path / "o"), progress=False, options={"colour": 1})
    with pytest.raises(DataError, match="unknown dataset 'nope'.*toy-gmm"):
        prepare("nope", str(tmp_path / "o"), progress=False)


# --- sources -----------------------------------------------------------------------------------------------------

def test_prepare_digits(tmp_path):
    from sklearn.datasets import load_digits

    m = prepare("digits", str(tmp_path / "train"), progress=False)
    assert (m["kind"], m["shape"], m["count"], m["num_classes"], m["split"]) == ("image", [1, 8, 8], 1500, 10, "train")
    assert [s["count"] for s in m["shards"]] == [500, 500, 500]
    samples = _all_samples(str(tmp_path / "train"))
    ref = load_digits()
    held_out = digits_test_index()
    train_index = np.setdiff1d(np.arange(1797), held_out)
    assert len(held_out) == 297 and len(train_index) == 1500
    i = 1234
    np.testing.assert_array_equal(_pixels(samples[i][1][0]), np.round(ref.images[train_index[i]] * 255 / 16))
    assert [s[2] for s in samples] == ref.target[train_index].tolist()
    # the test split: the held-out 297, in stored order, none of them in train
    m = prepare("digits", str(tmp_path / "test"), progress=False, split="test")
    assert (m["count"], m["split"]) == (297, "test")
    test = _all_samples(str(tmp_path / "test"))
    np.testing.assert_array_equal(_pixels(test[5][1][0]), np.round(ref.images[held_out[5]] * 255 / 16))
    assert [t[2] for t in test] == ref.target[held_out].tolist()
    with pytest.raises(DataError, match="digits: no split 'val'; its splits: train, test"):
        prepare("digits", str(tmp_path / "val"), progress=False, split="val")
    with pytest.raises(DataError, match="toy-gmm: no split 'test'; its splits: train"):
        prepare("toy-gmm", str(tmp_path / "gmm"), progress=False, split="test")


def test_prepare_toy_reproducible_with_options(tmp_path):
    a = prepare("toy-gmm", str(tmp_path / "a"), progress=False, options={"count": 3000})
    b = prepare("toy-gmm", str(tmp_path / "b"), progress=False, options={"count": 3000})
    assert a["count"] == 3000 and a["shape"] == [2] and a["num_classes"] == 0
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    x = np.stack([v for _, v, _ in _all_samples(str(tmp_path / "a"))])
    radius = np.linalg.norm(x, axis=1)
    assert abs(radius.mean() - 2.0) < 0.05 and abs(x.mean()) < 0.1
    c = prepare("toy-gmm", str(tmp_path / "c"), progress=False, options={"count": 3000, "num_classes": 8})
    labels = np.array([y for _, _, y in _all_samples(str(tmp_path / "c"))])
    assert c["num_classes"] == 8 and set(labels) == set(range(8))
    angle = np.arctan2(x[:, 1], x[:, 0]) % (2 * np.pi)
    assert np.mean(np.round(angle / (2 * np.pi / 8)) % 8 == labels) > 0.99
    for name in ("toy-moons", "toy-rings", "toy-gaussian"):
        m = prepare(name, str(tmp_path / name), progress=False, options={"count": 500})
        assert (m["kind"], m["shape"], m["count"]) == ("vector", [2], 500)
    assert m["stats"]["std"][0] == pytest.approx(1.0, abs=0.1)  # toy-gaussian has unit variances


def test_prepare_folder_sources_and_card(tmp_path):
    root = tmp_path / "classes"
    rng = np.random.default_rng(0)
    pictures = {}
    for cls in ("cat", "ant"):  # sorted: ant = 0, cat = 1
        (root / cls).mkdir(parents=True)
        for i in range(3):
            pictures[cls, i] = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
            Image.fromarray(pictures[cls, i]).save(root / cls / f"{i}.png")
    m = prepare(f"folder:{root}", str(tmp_path / "a"), progress=False)
    assert (m["name"], m["shape"], m["count"], m["num_classes"]) == ("classes", [3, 6, 10], 6, 2)
    samples = _all_samples(str(tmp_path / "a"))
    assert [y for _, _, y in samples] == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(_pixels(samples[3][1]), pictures["cat", 0].transpose(2, 0, 1))

    m = prepare(f"folder:{root / 'cat'}", str(tmp_path / "b"), progress=False)
    assert (m["count"], m["num_classes"]) == (3, 0) and _all_samples(str(tmp_path / "b"))[0][2] is None

    card = tmp_path / "small.yaml"
    card.write_text(f"name: small\nreader: {{type: folder, path: {root}}}\nresolution: 4\nchannels: 1\n"
                    f"shard_size: 4\n")
    m = prepare(str(card), str(tmp_path / "c"), progress=False)
    assert (m["shape"], [s["count"] for s in m["shards"]]) == ([1, 4, 4], [4, 2])


def _cifar_archive(path, batches: dict) -> str:
    """A cifar-10-python.tar.gz with the given {member name: pickled bytes}."""
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return str(path)


def test_prepare_cifar10_archive(tmp_path):
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": rng.integers(0, 256, (3, 3072), dtype=np.uint8) for i in range(1, 6)}
    batches["test_batch"] = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    archive = _cifar_archive(tmp_path / "cifar-10-python.tar.gz", {
        name: pickle.dumps({b"batch_label": name.encode(), b"data": rows,
                            b"labels": [int(k) for k in rng.integers(0, 10, len(rows))]}, protocol=2)
        for name, rows in batches.items()})
    m = prepare("cifar10", str(tmp_path / "out"), progress=False, options={"path": archive})
    assert (m["shape"], m["count"], m["num_classes"]) == ([3, 32, 32], 15, 10)
    samples = _all_samples(str(tmp_path / "out"))
    second = batches["data_batch_2"][1].reshape(3, 32, 32)  # sample 4: R, G, B planes
    np.testing.assert_array_equal(_pixels(samples[4][1]), second)
    m = prepare("cifar10", str(tmp_path / "test"), progress=False, options={"path": str(archive)}, split="test")
    assert (m["count"], m["split"]) == (2, "test")
    np.testing.assert_array_equal(_pixels(_all_samples(str(tmp_path / "test"))[1][1]),
                                  batches["test_batch"][1].reshape(3, 32, 32))
    with pytest.raises(DataError, match="download cifar-10-python|Download cifar-10-python"):
        prepare("cifar10", str(tmp_path / "o"), progress=False, options={"path": str(tmp_path / "none.tar.gz")})


class _Gadget:
    """Unpickled by a plain pickle.load, it runs a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_cifar10_pickle_gadget_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    rows = np.zeros((2, 3072), np.uint8)
    batches = {f"data_batch_{i}": pickle.dumps({b"data": rows, b"labels": [0, 1]}) for i in range(1, 6)}
    for member, payload in (("data_batch_3", {b"data": _Gadget(f"touch {marker}"), b"labels": [0, 1]}),
                            ("data_batch_1", {b"data": rows, b"labels": _Gadget(f"touch {marker}")})):
        archive = _cifar_archive(tmp_path / "crafted.tar.gz", {**batches, member: pickle.dumps(payload, protocol=2)})
        with pytest.raises(DataError, match=f"{member}: not a CIFAR-10 batch: global posix.system is not allowed"):
            prepare(f"cifar10:{archive}", str(tmp_path / "out"), progress=False)
    assert not marker.exists() and not (tmp_path / "out").exists()
    # Well-formed pickles of other shapes are refused with what was expected.
    archive = _cifar_archive(tmp_path / "odd.tar.gz", {**batches, "data_batch_2": pickle.dumps(
        {b"data": rows[:, :100], b"labels": [0, 1]})})
    with pytest.raises(DataError, match=r"data_batch_2: b'data' must be an \(N, 3072\) uint8 array"):
        prepare(f"cifar10:{archive}", str(tmp_path / "out"), progress=False)


def test_a_crafted_checkpoint_is_refused_by_a_torch_whose_weights_only_is_safe(tmp_path):
    """Checkpoints (a teacher, a resumed run) load with torch.load(weights_only=True), which torch < 2.6 let a
    crafted file bypass: pyproject requires torch>=2.6, and a checkpoint carrying a pickle gadget is refused."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    from scmlab.train import checkpoint

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")) as f:
        pyproject = f.read()
    torch_requirement = Requirement(re.search(r'"(torch[<>=!~][^"]*)"', pyproject).group(1))
    assert not torch_requirement.specifier.contains("2.5.1") and torch_requirement.specifier.contains("2.6.0")
    assert Version(torch.__version__.split("+")[0]) >= Version("2.6")
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "model": _Gadget(f"touch {marker}")}, tmp_path / "step-000000001.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        checkpoint.load(str(tmp_path / "step-000000001.pt"))
    assert not marker.exists()


def _snapshot(root) -> dict:
    """{relative path: bytes} of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_bad_prepare_input_is_refused_before_anything_is_written(tmp_path, caplog):
    from scmlab import cli

    out = tmp_path / "out"
    prepare("toy-gmm", str(out), shard_size=100, limit=200, progress=False)
    rows = np.ones((4, 2))
    for name, bad in (("nan", np.nan), ("inf", -np.inf), ("huge", 1e300)):  # 1e300: inf as float32
        rows[2, 1] = bad
        np.save(tmp_path / f"{name}.npy", rows)
    for name, card_name in (("escape", "../x"), ("absolute", str(tmp_path / "x"))):
        (tmp_path / f"{name}.yaml").write_text(f"name: {card_name}\nreader: {{type: gmm, count: 10}}\n")
    before = _snapshot(tmp_path)
    for kwargs, message in (
            ({"source": "toy-gmm", "shard_size": -1}, "--shard-size: must be >= 1, got -1"),
            ({"source": "toy-gmm", "shard_size": 0}, "--shard-size: must be >= 1, got 0"),
            ({"source": "toy-gmm", "limit": -1}, "--limit: must be >= 1, got -1"),
            ({"source": str(tmp_path / "escape.yaml")}, "name '../x' must be a plain file name prefix"),
            ({"source": str(tmp_path / "absolute.yaml")}, f"name '{tmp_path / 'x'}' must be a plain file name"),
            ({"source": "toy-gmm", "options": {"name": "/etc/x"}}, "name '/etc/x' must be a plain file name"),
            ({"source": "toy-gmm", "options": {"sigma_d": float("nan")}}, "sigma_d a finite number > 0"),
            *(({"source": f"npy:{tmp_path / name}.npy"}, f"{name}.npy: row 2 (and 0 more) holds NaN or Inf")
              for name in ("nan", "inf", "huge"))):
        for where in (out, tmp_path / "new"):
            with pytest.raises(DataError, match=re.escape(message)):
                prepare(out=str(where), progress=False, **kwargs)
    assert cli.main(["prepare", "toy-gmm", "--out", str(out), "--limit", "-1"]) == 2
    assert "--limit: must be >= 1, got -1" in caplog.text
    assert _snapshot(tmp_path) == before and not (tmp_path / "new").exists()


def test_prepare_fashion_mnist_limit(tmp_path):
    files = [f"{FASHION}/train-images-idx3-ubyte.gz", f"{FASHION}/train-labels-idx1-ubyte.gz"]
    assert all(os.path.exists(f) for f in files), \
        f"Fashion-MNIST is missing: install the Debian package dataset-fashion-mnist ({FASHION})"
    m = prepare("fashion-mnist", str(tmp_path), limit=300, shard_size=128, progress=False)
    assert (m["shape"], m["count"], m["num_classes"], len(m["shards"])) == ([1, 28, 28], 300, 10, 3)
    with gzip.open(files[0]) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:300]
    with gzip.open(files[1]) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:300]
    samples = _all_samples(str(tmp_path))
    np.testing.assert_array_equal(_pixels(np.stack([x[0] for _, x, _ in samples])), images)
    assert [y for _, _, y in samples] == labels.tolist()
    m = prepare("fashion-mnist", str(tmp_path / "test"), limit=50, progress=False, split="test")  # t10k files
    with gzip.open(f"{FASHION}/t10k-images-idx3-ubyte.gz") as f:
        test_images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:50]
    assert m["split"] == "test"
    np.testing.assert_array_equal(_pixels(np.stack([x[0] for _, x, _ in _all_samples(str(tmp_path / "test"))])),
                                  test_images)


# --- model space and the loader ----------------------------------------------------------------------------------

def test_normalizer_round_trip(tmp_path):
    x = np.random.default_rng(0).normal([10.0, -3.0, 100.0], [2.0, 0.1, 30.0], size=(500, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    m = prepare(f"npy:{tmp_path / 'x.npy'}", str(tmp_path / "o"), progress=False)
    norm = Normalizer(m)
    z = norm.to_model(torch.from_numpy(x).double())
    torch.testing.assert_close(z.std(0, unbiased=False), torch.full((3,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(z.mean(0), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(norm.to_data(z), torch.from_numpy(x).double())
    images = torch.rand(2, 1, 3, 3) * 2 - 1
    assert Normalizer({"kind": "image", "sigma_d": 0.5, "stats": {"mean": [0.1], "std": [0.5]}}).to_model(images) \
        is images


def test_loader_ranks_read_disjoint_epochs_of_equal_length(tmp_path):
    # 43 samples in shards of 10, 10, 10, 10, 3; 2 ranks: 21 samples per rank per epoch, batches of 7.
    m = prepare(f"npy:{_vectors(tmp_path, n=43, labels=False)}", str(tmp_path / "v"), shard_size=10, progress=False)
    epochs = []  # epochs[rank][e]: the sample indices of epoch e
    for rank in (0, 1):
        batches = list(itertools.islice(make_loader(str(tmp_path / "v"), batch_size=7, seed=1, rank=rank,
                                                    world_size=2), 9))
        assert all(x.shape == (7, 3) and y is None for x, y in batches)
        indices = [i for x, _ in batches for i in _indices(x, m)]
        epochs.append([indices[e * 21:(e + 1) * 21] for e in range(3)])
    for e in range(3):
        a, b = epochs[0][e], epochs[1][e]
        assert len(set(a)) == len(set(b)) == 21 and not set(a) & set(b)  # disjoint, no repeats, equal length
    assert len({frozenset(epochs[0][e]) for e in range(3)}) == 3  # each epoch orders the shards anew

    # A run resumed after 3 steps (one epoch) reads epoch 1, not epoch 0 again.
    resumed = [i for x, _ in itertools.islice(make_loader(str(tmp_path / "v"), batch_size=7, seed=1, rank=0,
                                                          world_size=2, start_step=3), 3) for i in _indices(x, m)]
    assert sorted(resumed) == sorted(epochs[0][1])

    # One shard, two ranks: each reads its half of it.
    m = prepare(f"npy:{tmp_path / 'vec.npy'}", str(tmp_path / "one"), shard_size=43, progress=False)
    halves = [{i for x, _ in itertools.islice(make_loader(str(tmp_path / "one"), batch_size=7, seed=1, rank=rank,
                                                           world_size=2), 3) for i in _indices(x, m)}
              for rank in (0, 1)]
    assert halves == [set(range(21)), set(range(21, 42))]
    with pytest.raises(DataError, match="50 streams, but the dataset holds only 43 samples"):
        next(make_loader(str(tmp_path / "one"), batch_size=1, seed=1, world_size=50))


def test_loader_deterministic_per_seed_rank_and_step(tmp_path):
    prepare(f"npy:{_vectors(tmp_path)}", str(tmp_path / "o"), shard_size=10, progress=False,
            options={"labels": str(tmp_path / "vec_labels.npy")})

    def first(n=4, **kw):
        return [b for b in itertools.islice(make_loader(str(tmp_path / "o"), batch_size=6, **kw), n)]

    a, b = first(seed=3, start_step=7), first(seed=3, start_step=7)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    c = first(seed=3, start_step=8)
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c))
    w1, w2 = first(seed=3, num_workers=2), first(seed=3, num_workers=2)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(w1, w2))


def test_registered_scheme_serves_manifest_loader_and_stock_webdataset(tmp_path):
    m = prepare("toy-rings", str(tmp_path), progress=False, options={"count": 50})
    data.register_scheme("memtest", lambda url: open(tmp_path / url.removeprefix("memtest://bucket/"), "rb"))
    assert read_manifest("memtest://bucket")["count"] == read_manifest(f"file://{tmp_path}")["count"] == 50
    x, _ = next(make_loader("memtest://bucket", batch_size=50, seed=0))
    stored = torch.from_numpy(np.stack([v for _, v, _ in _all_samples(str(tmp_path))]))
    gap = (Normalizer(m).to_data(x)[:, None] - stored[None]).abs().amax(dim=2).min(dim=1).values  # (B,)
    assert gap.max() < 1e-5  # each is a stored sample
    assert len(list(wds.WebDataset(f"memtest://bucket/{m['shards'][0]['name']}", shardshuffle=False))) == 50
    with pytest.raises(ValueError, match="no opener for nope://"):
        data.open_url("nope://x")
