"""The `fd` metric's feature network: a small CNN that scmlab trains on a dataset's labelled train split.

Inception features of upsampled 8x8 or 28x28 thumbnails are slow and weak; a classifier trained on the data itself
is the usual small-scale alternative. Its penultimate activations (the global average of the last convolution
stage, 128-d; batch norm in eval mode, so a sample's features do not depend on its batch) are the features of `fd` (a Frechet distance: never call it FID, its numbers are not comparable with
published FIDs) and of `prdc`; its predictions give `cls_acc`, the share of class-conditional samples classified as
the class they were drawn for.

Trained once per dataset (deterministic: seeded), on 90% of the train split (every sample whose index is not a
multiple of 10), and checked on the other 10% (the held-out accuracy). Stored next to the shards, locally or in
S3: `eval/classifier.pt` (the state dict and shape) and `eval/classifier.json` (its sha256, held-out accuracy and
the dataset checksum it was trained on). A dataset that changes (another checksum) gets a new classifier.
"""

import hashlib
import io
import json
import logging
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import data
from ..data.manifest import location

log = logging.getLogger(__name__)

WIDTHS = (32, 64, 128)
ARCH = "scmlab-smallcnn/1"  # recorded with a stored classifier: one of another architecture is trained again
STEPS, BATCH, LR = 600, 128, 2e-3  # at least this many Adam steps (one-cycle schedule), and at least 2 epochs
HOLD_OUT = 10  # every 10th sample is held out


class SmallCNN(nn.Module):
    """Three 3x3 convolution + batch norm + ReLU stages, the later two (and the first too at resolutions >= 16) of
    stride 2, a global average -> features; a linear head -> logits. (Strided convolutions rather than max-pooling:
    max-pooling's backward pass made training 5x slower on CPU.) Any resolution >= 4, 1 or 3 channels."""

    def __init__(self, channels: int, num_classes: int, resolution: int, widths=WIDTHS):
        super().__init__()
        layers, c = [], channels
        for i, w in enumerate(widths):
            stride = 2 if i > 0 or resolution >= 16 else 1
            layers += [nn.Conv2d(c, w, 3, stride=stride, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] (B, C, H, W) -> (features (B, widths[-1]), logits (B, num_classes))."""
        features = self.body(x)
        return features, self.head(features)


def _urls(url: str) -> tuple[str, str]:
    base = data.join_url(location(url), "eval")
    return data.join_url(base, "classifier.pt"), data.join_url(base, "classifier.json")


def train_classifier(url: str, *, device="cpu", seed: int = 0, progress: bool = False) -> tuple[SmallCNN, dict]:
    """Train on the dataset at `url` (its labels); returns the network (eval mode) and
    {"accuracy" (held out), "held_out", "trained_on", "steps"}."""
    manifest = data.read_manifest(url)
    if manifest["kind"] != "image" or not manifest.get("num_classes"):
        raise data.DataError(f"{url}: the fd classifier needs labelled images; this dataset holds "
                             f"{manifest['kind']}s with {manifest.get('num_classes', 0)} classes")
    batches = list(tqdm(data.read_batches(url, 1024), desc="classifier data", unit="batch", disable=not progress))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    held = torch.arange(len(x)) % HOLD_OUT == 0
    x_train, y_train = x[~held], y[~held]
    steps_per_epoch = math.ceil(len(x_train) / BATCH)
    epochs = max(2, math.ceil(STEPS / steps_per_epoch))
    torch.manual_seed(seed)
    device = torch.device(device)
    net = SmallCNN(manifest["shape"][0], int(manifest["num_classes"]), manifest["shape"][-1]).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LR, total_steps=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=epochs * steps_per_epoch, desc=f"train the fd classifier on {manifest['name']}", unit="step",
               disable=not progress)
    for _ in range(epochs):
        for index in torch.randperm(len(x_train), generator=g).split(BATCH):
            _, logits = net(x_train[index].to(device))
            loss = nn.functional.cross_entropy(logits, y_train[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
    bar.close()
    net.eval().requires_grad_(False)
    accuracy = _accuracy(net, x[held], y[held], device)
    return net, {"accuracy": accuracy, "held_out": int(held.sum()), "trained_on": int((~held).sum()),
                 "steps": epochs * steps_per_epoch}


@torch.no_grad()
def _accuracy(net: SmallCNN, x: torch.Tensor, y: torch.Tensor, device) -> float:
    correct = sum(int((net(xb.to(device))[1].argmax(1).cpu() == yb).sum()) for xb, yb in
                  zip(x.split(1024), y.split(1024)))
    return correct / len(x)


class Classifier:
    """The feature extractor `classifier` of a dataset: trained on first use and cached next to its shards, then
    loaded from there (checksum verified). `info`: the JSON record (sha256, accuracy, ...)."""

    name = "classifier"

    def __init__(self, url: str, device="cpu", progress: bool = False):
        manifest = data.read_manifest(url)
        self.device = torch.device(device)
        weights_url, info_url = _urls(url)
        found = _load(weights_url, info_url, data.checksum(manifest))
        if found is None:
            log.info("training the fd classifier on %s (once: it is stored in %s)", url, weights_url)
            net, info = train_classifier(url, device=self.device, progress=progress)
            blob = io.BytesIO()
            torch.save({"state_dict": net.state_dict(), "channels": manifest["shape"][0],
                        "num_classes": int(manifest["num_classes"]), "resolution": manifest["shape"][-1],
                        "widths": list(WIDTHS)}, blob)
            info = {**info, "sha256": hashlib.sha256(blob.getvalue()).hexdigest(), "dataset": data.checksum(manifest),
                    "dataset_url": url, "arch": ARCH}
            try:
                data.write_bytes(weights_url, blob.getvalue())
                data.write_bytes(info_url, json.dumps(info, indent=1).encode())  # last: both are whole once it is
            except (OSError, ValueError) as e:  # every worker must read the same network: no silent fallback
                raise OSError(f"cannot store the fd classifier at {weights_url} ({e}); score against a writable "
                              f"copy of the dataset (eval.reference / --data)") from e
            log.info("fd classifier: held-out accuracy %.4f on %d images -> %s", info["accuracy"], info["held_out"],
                     weights_url)
            found = net, info
        self.net, self.info = found[0].to(self.device), found[1]
        self.sha256, self.dim = self.info["sha256"], WIDTHS[-1]

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, 128), logits (B, num_classes)) of images in [-1, 1]."""
        return self.net(x.to(self.device).float())


def _load(weights_url: str, info_url: str, dataset: str) -> tuple[SmallCNN, dict] | None:
    """The stored classifier, if it was trained on `dataset` and its file has the recorded sha256; else None."""
    try:
        with data.open_url(info_url) as f:
            info = json.load(f)
        if info.get("dataset") != dataset or info.get("arch") != ARCH:
            log.info("%s is a %s trained on other data (dataset checksum %s, now %s): training again", weights_url,
                     info.get("arch"), str(info.get("dataset"))[:12], dataset[:12])
            return None
        with data.open_url(weights_url) as f:
            blob = f.read()
    except FileNotFoundError:
        return None
    if hashlib.sha256(blob).hexdigest() != info["sha256"]:
        log.warning("%s does not have the sha256 that %s records: training again", weights_url, info_url)
        return None
    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    net = SmallCNN(state["channels"], state["num_classes"], state["resolution"], tuple(state["widths"]))
    net.load_state_dict(state["state_dict"])
    return net.eval().requires_grad_(False), info
