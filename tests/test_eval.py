"""Sample quality end to end: the fd classifier's held-out accuracy, cached reference statistics (reused, then
invalidated), FID and FD against noise, `scmlab evaluate` on a checkpoint and on a sample file, bad input named,
evaluation inside training (metrics, the best checkpoint), and a 2-worker Ray Train evaluation that equals one
process's."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import client_env
from mlflow import MlflowClient

from scmlab import data
from scmlab.cli import main
from scmlab.config import ConfigError
from scmlab.eval import EvalError, classifier, reference
from scmlab.eval.evaluate import evaluate
from scmlab.eval.features import Raw
from scmlab.eval.frechet import frechet_of
from scmlab.eval.inception import InceptionV3
from scmlab.eval.training import TrainingEval
from scmlab.tracking import MemoryTracker, NullTracker
from scmlab.train import checkpoint, train
from scmlab.train.driver import run
from scmlab.train.loop import check_inputs
from scmlab.train.samples import ema_model


@pytest.fixture(scope="module")
def digit_splits(tmp_path_factory) -> dict:
    """The digits' train split (1500) and test split (297), and the fd classifier trained on the train split."""
    root = tmp_path_factory.mktemp("digit-splits")
    splits = {split: str(root / split) for split in ("train", "test")}
    for split, out in splits.items():
        data.prepare("digits", out, split=split, progress=False)
    splits["classifier"] = classifier.Classifier(splits["train"])  # trained once for the module (~5 s)
    return splits


@pytest.fixture(scope="module")
def digits_checkpoint(digit_splits, tmp_path_factory) -> str:
    """A class-conditional sCT UNet trained for 2 steps on the digits' train split (a run directory)."""
    from conftest import tiny_config

    run_dir = str(tmp_path_factory.mktemp("eval-run"))
    train(tiny_config(digit_splits["train"], run_dir))
    return run_dir


def _test_images(url: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = zip(*data.read_batches(url, n))
    return torch.cat(x)[:n].numpy(), torch.cat(y)[:n].numpy()


def _noisy(x: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    return np.clip(x + sigma * np.random.default_rng(seed).standard_normal(x.shape), -1, 1).astype(np.float32)


@pytest.mark.slow
def test_classifier_held_out_accuracy_on_digits_and_fashion_mnist(digit_splits, tmp_path):
    """Floors: digits >= 0.97 on the held-out tenth of train (and >= 0.90 on the test split, other images);
    Fashion-MNIST (first 6000 train images, to keep the test short) >= 0.83 (0.88 measured)."""
    info = digit_splits["classifier"].info
    assert info["accuracy"] >= 0.97 and info["held_out"] == 150 and info["trained_on"] == 1350
    test = reference.reference(digit_splits["test"], digit_splits["classifier"])
    assert test.accuracy >= 0.90
    fashion = str(tmp_path / "fashion")
    data.prepare("fashion-mnist", fashion, limit=6000, shard_size=2000, progress=False)
    stored = classifier.Classifier(fashion)
    assert stored.info["accuracy"] >= 0.83 and stored.info["held_out"] == 600
    again = classifier.Classifier(fashion)  # loaded, checksum verified: the same network
    assert again.sha256 == stored.sha256 and os.path.isfile(os.path.join(fashion, "eval", "classifier.pt"))


def test_reference_statistics_are_reused_then_invalidated(tmp_path, monkeypatch):
    url = str(tmp_path / "digits")
    data.prepare("digits", url, limit=200, shard_size=100, progress=False)
    computed, trained = [], []
    compute, train_classifier = reference.compute, classifier.train_classifier
    monkeypatch.setattr(reference, "compute", lambda *a, **k: computed.append(a[0]) or compute(*a, **k))
    monkeypatch.setattr(classifier, "train_classifier",
                        lambda *a, **k: trained.append(a[0]) or train_classifier(*a, **k))
    monkeypatch.setattr(classifier, "STEPS", 20)

    raw = Raw(64)
    first = reference.reference(url, raw)
    assert len(computed) == 1 and os.path.isfile(os.path.join(url, "eval", "reference-raw.npz"))
    again = reference.reference(url, raw)
    assert len(computed) == 1  # reused, not recomputed
    assert again.stats.n == first.stats.n == 200 and torch.equal(again.stats.s2, first.stats.s2)
    other = Raw(64)
    other.sha256 = "another extractor"
    reference.reference(url, other)
    assert len(computed) == 2  # another extractor: recomputed
    clf = classifier.Classifier(url)
    classifier.Classifier(url)
    reference.reference(url, clf)
    assert len(trained) == 1 and len(computed) == 3

    data.prepare("digits", url, limit=150, shard_size=100, progress=False)  # the data change at the same place
    assert reference.reference(url, other).stats.n == 150 and len(computed) == 4
    clf = classifier.Classifier(url)
    assert len(trained) == 2  # the classifier of the old data is not used for the new
    assert reference.reference(url, clf).stats.n == 150 and len(computed) == 5


def test_fd_grows_with_noise_on_real_images_and_the_floor(digit_splits, tmp_path):
    """The test split scored as samples is the floor itself; Gaussian noise of growing size raises fd and lowers
    precision and the classifier's accuracy."""
    x, y = _test_images(digit_splits["test"], 297)
    scores = []
    for sigma in (0.0, 0.1, 0.3, 0.6):
        path = str(tmp_path / f"noisy-{sigma}.npz")
        np.savez(path, samples=_noisy(x, sigma) if sigma else x, labels=y)
        scores.append(evaluate(digit_splits["train"], samples=path, metrics=["fd", "prdc"],
                               test_url=digit_splits["test"]))
    fd = [s["metrics"]["eval/fd/samples"] for s in scores]
    assert fd[0] == pytest.approx(scores[0]["floor"]["eval/fd/floor"], rel=1e-9)
    assert fd == sorted(fd) and fd[3] > 5 * fd[0]
    assert scores[0]["metrics"]["eval/cls_acc/samples"] > scores[3]["metrics"]["eval/cls_acc/samples"]
    assert scores[0]["metrics"]["eval/precision/samples"] > scores[3]["metrics"]["eval/precision/samples"]


@pytest.mark.slow
def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(digit_splits, tmp_path):
    """Inception-v3 features of 24 test digits, clean and with noise (upsampled to 299: ~0.2 s an image on 2 busy
    CPU cores; each 2048-d Frechet distance ~5 s), reused for every assertion; then the whole fid / kid path of
    `evaluate` on 8 images scored against themselves."""
    from scmlab.eval.frechet import GaussianStats

    x, y = _test_images(digit_splits["test"], 24)
    inception = InceptionV3()

    def stats(images):
        return GaussianStats(2048).update(inception(torch.from_numpy(images))[0])

    clean = stats(x)  # a set against itself: the evaluate call below (each 2048-d distance costs ~5 s)
    fid = [frechet_of(stats(_noisy(x, sigma)), clean) for sigma in (0.1, 0.4)]
    assert 0 < fid[0] < fid[1]

    tiny = str(tmp_path / "tiny")  # an 8-image reference: the images of the sample file
    data.prepare("digits", tiny, split="test", limit=8, progress=False)
    np.savez(tmp_path / "same.npz", samples=x[:8], labels=y[:8])
    result = evaluate(tiny, samples=str(tmp_path / "same.npz"), metrics=["fid", "kid"])
    assert abs(result["metrics"]["eval/fid/samples"]) < 1e-6 and np.isfinite(result["metrics"]["eval/kid/samples"])
    assert result["reference"]["extractors"]["inception"]["sha256"] == inception.sha256


def test_evaluate_a_checkpoint_and_a_sample_file(digit_splits, digits_checkpoint, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "scores.json")
    assert main(["evaluate", "--checkpoint", digits_checkpoint, "--data", digit_splits["train"], "--test-data",
                 digit_splits["test"], "--steps", "1,2", "--metrics", "fd,prdc,energy", "--n", "64",
                 "--batch-size", "24", "--json", out]) == 0
    result = json.load(open(out))
    assert set(result["metrics"]) == {f"eval/{k}/{s}" for s in ("1step", "2step") for k in
                                      ("fd", "cls_acc", "precision", "recall", "density", "coverage", "energy")}
    assert set(result["floor"]) == {k.replace("1step", "floor") for k in result["metrics"] if "1step" in k}
    assert result["n"] == 64 and result["step"] == 2 and result["samplers"] == {"1step": 1, "2step": 2}
    assert result["reference"]["data"] == digit_splits["train"] and result["reference"]["count"] == 1500
    assert result["reference"]["extractors"]["classifier"]["sha256"] == digit_splits["classifier"].sha256
    assert all(np.isfinite(v) for v in result["metrics"].values())
    table = capsys.readouterr().out
    assert "floor" in table.splitlines()[0] and any(line.startswith("fd ") for line in table.splitlines())
    # fixed seeds: the same scores again
    again = evaluate(digit_splits["train"], checkpoint_path=digits_checkpoint, steps=[1, 2],
                     metrics=["fd", "prdc", "energy"], n=64, batch_size=24)
    assert again["metrics"] == pytest.approx(result["metrics"], rel=1e-9)

    samples = str(tmp_path / "s.npz")
    assert main(["sample", "--checkpoint", digits_checkpoint, "--n", "40", "--out", samples]) == 0
    z = np.load(samples)
    assert -1 <= z["samples"].min() and z["samples"].max() <= 1  # images clipped to the pixel range
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("eval-cli")).info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["evaluate", "--samples", samples, "--data", digit_splits["train"], "--json", out,
                 "--mlflow-run", run_id]) == 0
    result = json.load(open(out))
    assert set(result["metrics"]) == {"eval/fd/samples", "eval/cls_acc/samples"} and result["n"] == 40
    assert client.get_metric_history(run_id, "eval/fd/samples")[0].value == result["metrics"]["eval/fd/samples"]


def test_bad_input_names_the_field_or_file(digit_splits, digits_checkpoint, tmp_path, caplog, make_config):
    train_url = digit_splits["train"]
    x, y = _test_images(digit_splits["test"], 20)

    def bad(message, n=None, **arrays):
        path = str(tmp_path / "bad.npz")
        np.savez(path, **arrays)
        with pytest.raises(EvalError, match=message):
            evaluate(train_url, samples=path, n=n)

    bad(r"bad.npz: `samples` has shape \(20, 8, 8\), the dataset digits holds \(N, 1, 8, 8\)", samples=x[:, 0])
    bad(r"bad.npz: `samples` values lie in \[0, 255\]; images must be in \[-1, 1\]",
        samples=np.round((x + 1) * 127.5))
    bad(r"bad.npz: `samples` holds 1 samples; the evaluation needs at least 2", samples=x[:1])
    bad(r"bad.npz: `samples` holds 20 samples; the evaluation needs at least 100", samples=x, n=100)
    bad(r"bad.npz: `labels` has shape \(19,\), expected \(20,\)", samples=x, labels=y[:19])
    bad(r"bad.npz: no `samples` array", images=x)

    other = str(tmp_path / "other")  # 8x8 images of another dataset
    np.save(tmp_path / "other.npy", np.zeros((30, 8, 8), np.uint8))
    np.save(tmp_path / "other-labels.npy", np.arange(30) % 10)
    data.prepare(f"npy:{tmp_path / 'other.npy'}", other, progress=False,
                 options={"labels": str(tmp_path / "other-labels.npy")})
    with pytest.raises(EvalError, match=rf"--data {other}: the checkpoint was trained on digits .* its name differs"):
        evaluate(other, checkpoint_path=digits_checkpoint)
    assert main(["evaluate", "--checkpoint", digits_checkpoint, "--data", other]) == 2
    assert "its name differs" in caplog.text

    with pytest.raises(FileNotFoundError, match=r"Inception weights /no/such/inception\.pt: no such file"):
        evaluate(train_url, checkpoint_path=digits_checkpoint, metrics=["fid"], inception="/no/such/inception.pt")
    config = make_config(train_url, tmp_path / "run", eval={"every": 1, "metrics": ["fid"],
                                                            "inception": "/no/such/inception.pt"})
    with pytest.raises(ConfigError, match=r"eval\.inception: Inception weights /no/such/inception\.pt"):
        check_inputs(config)
    vectors = str(tmp_path / "vectors")
    data.prepare("toy-gmm", vectors, limit=64, progress=False)
    with pytest.raises(ConfigError, match=r"eval\.metrics: fid scores images .* not vectors"):
        check_inputs(make_config(vectors, tmp_path / "run", eval={"every": 1, "metrics": ["fid"]}))
    with pytest.raises(ConfigError, match=r"eval\.test: .* holds kind image, data\.train vector"):
        check_inputs(make_config(vectors, tmp_path / "run", eval={"every": 1, "test": digit_splits["test"]}))
    with pytest.raises(ConfigError, match=r"eval\.best: eval/energy/2step is not logged: eval\.metrics is \['fd'\]"):
        check_inputs(make_config(train_url, tmp_path / "run", eval={"every": 1, "best": "eval/energy/2step"}))
    with pytest.raises(ConfigError, match=r"eval\.best: every checkpoint needs a score"):
        make_config(train_url, tmp_path / "run", train={"checkpoint_every": 3},
                    eval={"every": 2, "best": "eval/fd/2step"})
    with pytest.raises(ConfigError, match=r"eval\.best: 'eval/precision/2step' is not eval/<key>/<sampler>"):
        make_config(train_url, tmp_path / "run", eval={"every": 1, "best": "eval/precision/2step"})
    with pytest.raises(ConfigError, match=r"eval\.best: eval/fd/ode18 names sampler 'ode18'"):
        make_config(train_url, tmp_path / "run", eval={"every": 1, "best": "eval/fd/ode18"})


def test_training_logs_eval_scores_and_tags_the_best_checkpoint(digit_splits, make_config, tmp_path):
    config = make_config(digit_splits["train"], tmp_path / "run", train={"steps": 4, "checkpoint_every": 2},
                         eval={"every": 2, "n": 48, "best": "eval/fd/2step", "test": digit_splits["test"]})
    tracker = MemoryTracker()
    summary = train(config, tracker=lambda run_id: tracker)
    for key in ("eval/fd/1step", "eval/fd/2step", "eval/cls_acc/2step", "eval/fd/floor", "time/eval_s"):
        assert [step for step, _ in tracker.metrics[key]] == [2, 4], key
    fd = dict(tracker.metrics["eval/fd/2step"])
    best = min(fd, key=fd.get)
    assert tracker.tags["checkpoint.best"] == os.path.join(tmp_path, "run", "checkpoints", f"step-{best:09d}.pt")
    assert tracker.tags["checkpoint.best_step"] == str(best) and tracker.tags["checkpoint.best_metric"] == \
        "eval/fd/2step"
    assert summary["metrics"]["eval/fd/2step"] == fd[4]
    assert checkpoint.load(summary["checkpoint"])["eval"]["best"]["value"] == fd[best]
    # the same samples score the same in a fresh evaluator (fixed seeds, eval mode)
    ckpt = checkpoint.load(summary["checkpoint"])
    evaluator = TrainingEval(config, ckpt["manifest"], rank=0, world_size=1, device=torch.device("cpu"))
    assert evaluator(ema_model(ckpt), 4, NullTracker())["eval/fd/2step"] == pytest.approx(fd[4], rel=1e-9)


@pytest.mark.ray
def test_two_ray_workers_score_as_one_process_and_keep_the_best_checkpoint(ray_cluster, local_services,
                                                                           make_config, tmp_path):
    """sCT on 2 Ray Train workers with data, classifier and reference statistics in S3: the final evaluation
    (each rank half the samples, statistics and features gathered) equals one process scoring the final EMA
    weights; Ray keeps the best-scored checkpoint besides the latest."""
    url, test = "s3://scmlab/tests/eval-digits", "s3://scmlab/tests/eval-digits-test"
    uri = local_services["mlflow"]["tracking_uri"]
    with client_env(local_services):
        data.prepare("digits", url, limit=256, shard_size=64, progress=False)
        data.prepare("digits", test, split="test", limit=64, progress=False)
        config = make_config(url, tmp_path / "run", train={"steps": 6, "checkpoint_every": 2, "workers": 2,
                                                           "keep_checkpoints": 1, "log_every": 2},
                             eval={"every": 2, "n": 150, "batch_size": 32, "metrics": ["fd", "prdc", "energy", "swd"],
                                   "best": "eval/fd/2step", "test": test},
                             tracking={"kind": "mlflow", "uri": uri, "experiment": "eval-ray",
                                       "system_metrics": False})
        summary = run(config)
        with data.open_url(f"{url}/eval/reference-classifier.npz") as cached:  # next to the shards, in S3
            assert cached.read(2) == b"PK"  # an .npz (a zip archive)
        ckpt = checkpoint.load(summary["checkpoint"])
        one = TrainingEval(config, ckpt["manifest"], rank=0, world_size=1, device=torch.device("cpu"))
        alone = one(ema_model(ckpt), 6, NullTracker())
    distributed = {k: v for k, v in summary["metrics"].items() if k.startswith("eval/")}
    assert set(distributed) == {k for k in alone if k.startswith("eval/")}
    for key, value in distributed.items():
        assert value == pytest.approx(alone[key], rel=1e-6, abs=1e-9), key

    client = MlflowClient(uri)
    history = {m.step: m.value for m in client.get_metric_history(summary["mlflow_run_id"], "eval/fd/2step")}
    assert sorted(history) == [2, 4, 6]
    best = min(history, key=history.get)
    tags = client.get_run(summary["mlflow_run_id"]).data.tags
    assert tags["checkpoint.best_step"] == str(best) and tags["checkpoint.best"].endswith(f"step-{best:09d}")
    kept = {d for d in os.listdir(tmp_path / "run") if d.startswith("step-")}
    assert kept == {f"step-{best:09d}", "step-000000006"}  # the best by eval/fd/2step, and the latest
