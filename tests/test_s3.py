"""Datasets in object storage: a real SeaweedFS server (`weed mini`) on 127.0.0.1 for the session, reached through
boto3 with the endpoint and generated credentials in the standard AWS environment variables."""

import hashlib
import io
import itertools
import json
import logging
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from scmlab import data, services
from scmlab.data import DataError, StorageError, make_loader, prepare, read_manifest, s3, verify
from scmlab.data.shards import decode, read_shard, write_shard

BUCKET = "scmlab-test"


class Store:
    """The session's server: its state (endpoint, port, pid) and a way to crash and restart it."""

    def __init__(self, home):
        self.home = home
        self.state = services.storage_up(home, bucket=BUCKET)

    def kill(self) -> None:
        """Stop the server abruptly (SIGKILL to its process group), as a crash or a network cut would."""
        os.killpg(self.state["pid"], signal.SIGKILL)

    def restart(self) -> None:
        self.state = services.storage_up(self.home, port=self.state["port"], bucket=BUCKET)


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    home = tmp_path_factory.mktemp("storage-home")
    store = Store(home)
    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in os.environ if k.startswith("AWS_")]:
            mp.delenv(name)
        for name, value in services.env_for_clients(home).items():
            mp.setenv(name, value)
        data.configure_s3()
        yield store
    data.configure_s3()
    store.kill()  # its data is thrown away: no need to wait for a clean shutdown
    services.services_down(home)


@pytest.fixture
def s3_env(store):
    """The store, with default S3 settings restored after the test (tests shorten the retry budget)."""
    data.configure_s3()
    yield store
    data.configure_s3()


def _url(name: str) -> str:
    return f"s3://{BUCKET}/{name}"


@pytest.fixture(scope="session")
def digits(store, tmp_path_factory) -> tuple[str, str]:
    """300 8x8 digits in 12 shards of 25: (local directory, s3 URL)."""
    local = str(tmp_path_factory.mktemp("digits"))
    prepare("digits", local, limit=300, shard_size=25, progress=False)
    prepare("digits", _url("digits"), limit=300, shard_size=25, progress=False)
    return local, _url("digits")


@pytest.fixture(scope="session")
def vectors(store, tmp_path_factory) -> tuple[str, dict]:
    """200 vectors (i, -i, i mod 5) in 20 shards of 10 at s3://: (URL, manifest); row i maps back to i."""
    src = tmp_path_factory.mktemp("vec") / "vec.npy"
    i = np.arange(200, dtype=np.float32)
    np.save(src, np.stack([i, -i, i % 5], axis=1))
    return _url("vec"), prepare(f"npy:{src}", _url("vec"), shard_size=10, progress=False)


def _indices(x: torch.Tensor, manifest: dict) -> list[int]:
    return data.Normalizer(manifest).to_data(x.double())[:, 0].round().long().tolist()


def _samples(url: str) -> list[tuple[str, np.ndarray, int | None]]:
    m = read_manifest(url)
    return [(s["__key__"], *decode(s, tuple(m["shape"]), m["num_classes"]))
            for shard in m["shards"] for s in read_shard(f"{url}/{shard['name']}", shard["count"])]


# --- writing and reading -----------------------------------------------------------------------------------------

def test_round_trip_matches_local_copy(digits):
    local, remote = digits
    assert read_manifest(remote) == read_manifest(local)  # same shards, byte for byte (sha256 in the manifest)
    assert verify(remote)["count"] == 300
    ours, theirs = _samples(local), _samples(remote)
    assert [k for k, _, _ in ours] == [k for k, _, _ in theirs] and len(ours) == 300
    assert all(np.array_equal(a, b) and y == z for (_, a, y), (_, b, z) in zip(ours, theirs))
    a = list(itertools.islice(make_loader(local, batch_size=16, seed=5, rank=1, world_size=2), 4))
    b = list(itertools.islice(make_loader(remote, batch_size=16, seed=5, rank=1, world_size=2), 4))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))  # same batches
    # Stock webdataset reads the shards through the registered s3:// opener.
    stock = list(wds.WebDataset(f"{remote}/digits-{{000000..000011}}.tar", shardshuffle=False)
                 .decode("l8").to_tuple("__key__", "png", "cls"))
    assert [k for k, _, _ in stock] == [k for k, _, _ in ours]
    assert all(np.array_equal(img, np.round((x[0] + 1) * 127.5)) and cls == y
               for (_, img, cls), (_, x, y) in zip(stock, ours))
    head = s3.client().head_object(Bucket=BUCKET, Key="digits/digits-000003.tar")
    assert head["Metadata"]["sha256"] == read_manifest(remote)["shards"][3]["sha256"]


def test_large_shards_go_up_in_parts(s3_env, tmp_path, monkeypatch):
    monkeypatch.setattr(s3, "MULTIPART_BYTES", 5 << 20)
    payload = np.random.default_rng(0).bytes(11 << 20)
    (tmp_path / "big").write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    assert s3.put_file(_url("parts/big"), str(tmp_path / "big"), sha256=sha, size=len(payload))
    head = s3.client().head_object(Bucket=BUCKET, Key="parts/big")
    assert head["ETag"].strip('"').endswith("-3") and head["Metadata"]["sha256"] == sha  # 3 parts
    assert not s3.put_file(_url("parts/big"), str(tmp_path / "big"), sha256=sha, size=len(payload))  # stored
    with data.open_url(_url("parts/big")) as f:
        assert f.read() == payload


def test_interrupted_upload_resumes(s3_env, tmp_path, caplog):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(12):
        Image.fromarray(np.full((4, 4), i * 20, np.uint8)).save(images / f"{i:02d}.png")
    (images / "99.png").write_bytes(b"not a png")  # sorted last: the run fails after 6 whole shards
    url = _url("resume")
    with pytest.raises(Exception):
        prepare(f"folder:{images}", url, shard_size=2, progress=False)
    with pytest.raises(DataError, match="no manifest.json"):  # half written: not taken for a dataset
        read_manifest(url)
    stored = s3.client().list_objects_v2(Bucket=BUCKET, Prefix="resume/")["Contents"]
    assert sorted(o["Key"] for o in stored) == [f"resume/imgs-{i:06d}.tar" for i in range(6)]

    os.remove(images / "99.png")
    s3.put_bytes(f"{url}/imgs-000004.tar", b"a shard cut short")  # and one shard is damaged
    puts = []
    s3.client().meta.events.register("before-parameter-build.s3.PutObject",  # gone with the client after the test
                                     lambda params, **_: puts.append(params["Key"]))
    with caplog.at_level(logging.INFO, logger="scmlab"):
        m = prepare(f"folder:{images}", url, shard_size=2, progress=False)
    assert sorted(puts) == ["resume/imgs-000004.tar", "resume/manifest.json"]
    assert "1 shards uploaded, 5 already stored" in caplog.text
    assert read_manifest(url) == m and verify(url)["count"] == 12


# --- splitting ---------------------------------------------------------------------------------------------------

def test_two_ranks_by_two_workers_read_disjoint_equal_streams(vectors):
    url, m = vectors  # 200 samples, 4 streams: 50 samples per stream per epoch, 5 batches of 10
    streams = {}  # (rank, worker) -> sample indices in delivery order
    for rank in (0, 1):
        loader = make_loader(url, batch_size=10, seed=3, rank=rank, world_size=2, num_workers=2)
        for k, (x, _) in enumerate(itertools.islice(loader, 20)):  # 2 epochs; batch k from worker k mod 2
            streams.setdefault((rank, k % 2), []).extend(_indices(x, m))
    for epoch in (0, 1):
        parts = [s[epoch * 50:(epoch + 1) * 50] for s in streams.values()]
        assert [len(set(p)) for p in parts] == [50] * 4  # equal counts, nothing repeated
        assert set().union(*parts) == set(range(200))  # disjoint: together exactly the dataset
    assert set(streams[0, 0][:50]) != set(streams[0, 0][50:])  # the next epoch deals the shards anew


# --- faults ------------------------------------------------------------------------------------------------------

def _outage(store: Store, seconds: float) -> threading.Thread:
    """Kill the server now and start it again `seconds` later, in the background."""
    store.kill()
    restart = threading.Timer(seconds, store.restart)
    restart.start()
    return restart


def test_reading_survives_a_server_outage(s3_env, vectors, caplog):
    payload = np.random.default_rng(1).bytes(24 << 20)  # more than the socket buffers hold
    s3.put_bytes(_url("fault/big"), payload)
    url, m = vectors
    loader = make_loader(url, batch_size=10, seed=4, rank=1, world_size=2)  # 100 samples per epoch
    indices = _indices(next(loader)[0], m)
    with data.open_url(_url("fault/big")) as f, caplog.at_level(logging.WARNING, logger="scmlab"):
        head = f.read(1 << 20)
        restart = _outage(s3_env, 2.0)
        rest = f.read()  # the transfer in flight is cut; it resumes from its offset after the restart
        restart.join()
        assert head + rest == payload
        assert "retry" in caplog.text
        caplog.clear()
        restart = _outage(s3_env, 2.0)
        for x, _ in itertools.islice(loader, 29):  # epoch 1 opens its shards during the outage
            indices += _indices(x, m)
        restart.join()
    assert "retry" in caplog.text
    epochs = [indices[e * 100:(e + 1) * 100] for e in range(3)]
    assert all(len(set(e)) == 100 for e in epochs)  # nothing lost, nothing repeated
    assert len({frozenset(e) for e in epochs}) == 3


def test_outage_past_the_retry_budget_names_the_object(s3_env, vectors):
    url, _ = vectors
    loader = make_loader(url, batch_size=50, seed=0, on_error="skip")  # one epoch is 4 batches
    next(loader)
    data.configure_s3(retry_budget_s=1.5)
    s3_env.kill()
    try:
        started = time.monotonic()
        with pytest.raises(StorageError, match=rf"s3://{BUCKET}/vec/vec-0000\d\d\.tar: GET failed .* past the "
                                               rf"retry budget of 1.5 s"):
            for _ in range(8):  # the next epoch's first GET meets the outage; `skip` does not hide it
                next(loader)
        assert time.monotonic() - started < 15
    finally:
        s3_env.restart()


# --- credentials and endpoints -----------------------------------------------------------------------------------

def test_training_from_s3_leaves_no_trace_of_credentials(s3_env, vectors, tmp_path, caplog, capsys, monkeypatch,
                                                         make_config):
    from scmlab.train.loop import train

    secrets = [os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]]
    messages = []
    with caplog.at_level(logging.INFO), caplog.at_level(logging.DEBUG, logger="scmlab"):  # root: as the CLI logs
        prepare("digits", _url("secret/digits"), limit=50, shard_size=25, progress=True)
        run = train(make_config(vectors[0], tmp_path / "run", train={"steps": 2}))
        assert run["step"] == 2
        with pytest.raises(FileNotFoundError) as missing:
            data.open_url(_url("secret/nothing-here"))
        messages.append(str(missing.value))
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + secrets[1][:8])
        secrets.append(os.environ["AWS_SECRET_ACCESS_KEY"])
        data.configure_s3()  # a new client, signing with the wrong secret
        with pytest.raises(PermissionError, match=rf"s3://{BUCKET}/secret/digits/manifest.json: GET refused") \
                as refused:
            read_manifest(_url("secret/digits"))
        messages.append(str(refused.value))
    monkeypatch.undo()
    data.configure_s3()
    captured = capsys.readouterr()
    written = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    written.append(s3.client().get_object(Bucket=BUCKET, Key="secret/digits/manifest.json")["Body"].read())
    assert len(written) > 3 and "prepare digits" in captured.err and caplog.text
    for secret in secrets:
        assert secret not in caplog.text and secret not in captured.out + captured.err
        assert not any(secret in m for m in messages)
        assert not any(secret.encode() in blob for blob in written)


def test_endpoint_from_s3_variable_or_override(s3_env, digits, monkeypatch):
    endpoint = s3_env.state["endpoint"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)  # the S3-specific variable wins
    data.configure_s3()
    assert read_manifest(digits[1])["count"] == 300
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    data.configure_s3(endpoint_url=endpoint, region="us-east-1")  # the override wins over the environment
    assert read_manifest(digits[1])["count"] == 300
    data.configure_s3(retry_budget_s=0)
    with pytest.raises(StorageError, match=rf"s3://{BUCKET}/digits/manifest.json: GET failed 1 time\(s\)"):
        read_manifest(digits[1])


# --- bad input ---------------------------------------------------------------------------------------------------

def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(buf, format="png")
    return buf.getvalue()


def test_skip_counts_bad_samples(s3_env, tmp_path, caplog):
    # 3 shards of 4 samples: a corrupt png in shard 1, shard 2 cut after its 2nd sample (2 samples lost).
    shards = [[(f"s{s}k{k}", {"png": _png(16 * (4 * s + k)), "cls": b"0"}) for k in range(4)] for s in range(3)]
    shards[1][2] = ("bad", {"png": _png(0)[:30], "cls": b"0"})
    entries = []
    for s, samples in enumerate(shards):
        path = tmp_path / f"h-{s:06d}.tar"
        write_shard(str(path), samples[:2] if s == 2 else samples)
        s3.put_bytes(_url(f"skip/{path.name}"), path.read_bytes())
        entries.append({"name": path.name, "count": 4, "sha256": "-", "bytes": 0})
    manifest = {"format": "scmlab-shards/1", "name": "h", "source": "test", "kind": "image", "shape": [1, 4, 4],
                "num_classes": 1, "count": 12, "sigma_d": 0.5, "shards": entries,
                "stats": {"mean": [0.0], "std": [1.0]}}
    s3.put_bytes(_url("skip/manifest.json"), json.dumps(manifest).encode())

    with pytest.raises(DataError, match=rf"s3://{BUCKET}/skip/h-00000[12]\.tar"):
        list(itertools.islice(make_loader(_url("skip"), batch_size=3, seed=0), 6))
    loader = make_loader(_url("skip"), batch_size=3, seed=0, on_error="skip")  # 9 good samples per epoch
    with caplog.at_level(logging.WARNING, logger="scmlab"):
        values = [v for x, _ in itertools.islice(loader, 6) for v in ((x[:, 0, 0, 0] + 1) * 127.5).round().tolist()]
    good = {16 * i for i in range(10) if i != 6}
    assert sorted(values[:9]) == sorted(values[9:]) == sorted(good)  # each epoch: every good sample, once
    assert loader.skipped in (5, 6)  # 3 per epoch; the second epoch's corrupt sample may come after its last batch
    assert "key 'bad'" in caplog.text and "h-000002.tar: 2 samples, the manifest says 4" in caplog.text
    workers = make_loader(_url("skip"), batch_size=3, seed=0, num_workers=2, on_error="skip")
    list(itertools.islice(workers, 8))
    assert workers.skipped >= 4  # counted in the worker processes, reported through the batches
