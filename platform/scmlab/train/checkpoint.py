"""Atomic checkpoints: `run_dir/checkpoints/step-000001000.pt`, each a dict of tensors and plain Python values.

A checkpoint holds {"model", "ema", "optimizer", "step", "bad_steps", "config" (resolved dict), "manifest",
"mlflow_run_id" (None when not tracked)}; it is written to a temporary file in the same directory, fsynced and
renamed into place, so a crash never leaves a truncated file under a checkpoint name, and `latest` only ever sees
complete files. Loading uses torch.load(weights_only=True): no pickled code.

The training loop reads and writes checkpoints through a store: `LocalCheckpoints` (run.dir/checkpoints, here) or
the Ray Train store of scmlab.train.distributed (`step-NNNNNNNNN/checkpoint.pt` in the Ray run directory); both hold
the same dict.

A run resumes its latest checkpoint only if that was written by a compatible config (`check_resume`): the same
objective, network and data shape. Otherwise a mistake (a diffusion teacher's run.dir reused for sCT) would either
fail to load or train on as another run, its checkpoints pruned by `keep_checkpoints`.
"""

import io
import logging
import os
import re
import shutil
import tempfile
from urllib.parse import urlparse

import torch

from ..config import Config, ConfigError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{9})\.pt$")
_RAY_NAME = re.compile(r"^step-(\d{9})$")
RAY_FILE = "checkpoint.pt"  # the file in each Ray Train checkpoint directory (scmlab.train.distributed)
# Config fields that make a checkpoint another network or another task (with the data's shape and classes).
IDENTITY = ("objective.kind", "model.arch", "model.size", "model.time_embedding", "model.double_norm",
            "model.guidance_input")


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def save(run_dir: str, state: dict | None, keep: int = 0, *, step: int | None = None, source: str | None = None) -> str:
    """Write `state` as the checkpoint of step state["step"], or copy the checkpoint file `source` as that of `step`
    (chunk by chunk: a large checkpoint is never loaded for it); keep the `keep` newest (0 = all). Returns the path."""
    directory = checkpoint_dir(run_dir)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"step-{state['step'] if source is None else step:09d}.pt")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".step-", suffix=".pt.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if source is None:
                torch.save(state, f)
            else:
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, f, 16 << 20)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_dir(directory)
    if keep > 0:
        for old in _steps(directory)[:-keep]:
            os.unlink(os.path.join(directory, f"step-{old:09d}.pt"))
    log.info("checkpoint %s", path)
    return path


def _fsync_dir(directory: str) -> None:
    """Make the rename itself durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _steps(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(int(m.group(1)) for m in map(_NAME.match, os.listdir(directory)) if m)


def latest(run_dir: str) -> str | None:
    """Path of the newest complete checkpoint in run_dir, or None. Temporary files never match."""
    steps = _steps(checkpoint_dir(run_dir))
    return os.path.join(checkpoint_dir(run_dir), f"step-{steps[-1]:09d}.pt") if steps else None


def resolve(path: str) -> str:
    """A checkpoint file, a run directory standing for its latest checkpoint, or a Ray Train checkpoint directory
    (holding RAY_FILE)."""
    if os.path.isfile(os.path.join(path, RAY_FILE)):
        return os.path.join(path, RAY_FILE)
    if os.path.isdir(path):
        found = latest(path)
        if found is None:
            raise FileNotFoundError(f"{path}: a directory with no checkpoints/step-*.pt in it")
        return found
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file or run directory")
    return path


def load(path: str, map_location="cpu") -> dict:
    """Load a checkpoint file, the latest one of a run directory, or one in object storage: an s3:// URI of a Ray
    Train checkpoint directory (`run.storage/run.name/step-NNNNNNNNN`) or of a checkpoint file."""
    if urlparse(path).scheme == "s3":
        from ..data import open_url

        url = path if path.endswith(".pt") else path.rstrip("/") + "/" + RAY_FILE
        with open_url(url) as f:
            return torch.load(io.BytesIO(f.read()), map_location=map_location, weights_only=True)
    return torch.load(resolve(path), map_location=map_location, weights_only=True)


def peek(directory: str) -> tuple[dict, str] | None:
    """(checkpoint, path) of the newest checkpoint in `directory` in either layout (a run directory's
    checkpoints/step-*.pt, a local Ray run directory's step-*/checkpoint.pt), memory-mapped: its config and manifest
    read without loading its tensors. None when there is none (or none that reads)."""
    found = [(step, os.path.join(checkpoint_dir(directory), f"step-{step:09d}.pt"))
             for step in _steps(checkpoint_dir(directory))]
    if os.path.isdir(directory):
        found += [(int(m.group(1)), os.path.join(directory, m.group(0), RAY_FILE))
                  for m in map(_RAY_NAME.match, os.listdir(directory)) if m]
    for _, path in sorted(found, reverse=True):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True), path
        except (OSError, RuntimeError):  # an upload Ray never registered, a foreign file
            continue
    return None


def check_resume(stored: dict, config: Config, manifest: dict, where: str) -> None:
    """Refuse (ConfigError) to resume the checkpoint `stored` (found at `where`) under `config` when they differ in
    IDENTITY or in the data's shape or classes, unless config.run.force_resume."""
    if config.run.force_resume:
        return
    new = config.to_dict()
    differences = []
    for dotted in IDENTITY:
        section, key = dotted.split(".")
        before = stored["config"].get(section, {}).get(key)
        if before != new[section][key]:
            differences.append(f"{dotted} {before!r} -> {new[section][key]!r}")
    data = stored.get("manifest") or {}
    if data and list(data["shape"]) != list(manifest["shape"]):
        differences.append(f"data shape {list(data['shape'])} -> {list(manifest['shape'])}")
    if data and int(data.get("num_classes", 0)) != int(manifest.get("num_classes", 0)):
        differences.append(f"data num_classes {data.get('num_classes', 0)} -> {manifest.get('num_classes', 0)}")
    if differences:
        raise ConfigError(f"run.dir: {where} is a checkpoint of another run ({'; '.join(differences)}); resuming "
                          f"it would not continue that run. Use another run.dir (or run.name), or resume it anyway "
                          f"with --force-resume (run.force_resume=true).")


class LocalCheckpoints:
    """The checkpoint store of a run trained in one process or by a launcher without storage of its own: rank 0
    writes run_dir/checkpoints/step-*.pt; the other ranks write nothing."""

    def __init__(self, run_dir: str, *, keep: int = 0, rank: int = 0):
        self.run_dir, self.keep, self.rank = run_dir, keep, rank

    def restore(self, map_location="cpu") -> dict | None:
        """The latest checkpoint, loaded, or None for a fresh run."""
        path = latest(self.run_dir)
        if path is None:
            return None
        log.info("resuming from %s", path)
        return load(path, map_location=map_location)

    def save(self, state, step: int, metrics: dict) -> str | None:
        """Write state() (a callable: other ranks never build it) as the checkpoint of `step`; its path on rank 0."""
        return save(self.run_dir, state(), keep=self.keep) if self.rank == 0 else None

    def preempted(self) -> bool:
        """No preemption notices outside Ray Train."""
        return False

    def last(self) -> str | None:
        """Where the newest complete checkpoint is (for error messages)."""
        return latest(self.run_dir)
