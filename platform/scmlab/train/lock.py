"""One driver at a time per run: `held(config)` locks the run directory and the Ray run for the driver's lifetime.

The lock is `fcntl.flock` on a file, which the kernel releases when the process ends however it ends (SIGKILL, a
crash, a reboot): a crashed run never leaves it stuck, and there is no stale-lock cleanup to get wrong. A second
driver is refused at once, naming the run and the holder (pid, host and start time, written into the file).

What is locked: `run.dir` (its `.lock` file), and the Ray run `run.storage/run.name` when Ray Train keeps it
elsewhere: a local storage directory through its own `.lock` file; an `s3://` one through a lock file on this
machine named after the run's URI (`~/.cache/scmlab/locks/`), since object storage has no such lock. The drivers of
one Ray cluster run on its head (`ray job submit`), so two jobs of a cluster on one s3:// run are refused; drivers on
two machines writing the same s3:// run are not detected: give each run its own run.name.
"""

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import socket
import sys

from ..config import Config, ConfigError

LOCK_FILE = ".lock"


class RunInUse(ConfigError):
    """Another driver holds the run's lock."""


def lock_files(config: Config) -> dict[str, str]:
    """{what is locked (the field and its value): the lock file} for `config` (paths already absolute)."""
    files = {f"run.dir {config.run.dir}": os.path.join(config.run.dir, LOCK_FILE)}
    if config.train.workers:
        from .distributed import run_uri

        uri = run_uri(config)
        if uri.startswith("s3://"):
            cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            name = hashlib.sha256(uri.encode()).hexdigest()[:32] + LOCK_FILE
            files[f"Ray run {uri}"] = os.path.join(cache, "scmlab", "locks", name)
        elif os.path.normpath(uri) != os.path.normpath(config.run.dir):
            files[f"Ray run {uri}"] = os.path.join(uri, LOCK_FILE)
    return files


@contextlib.contextmanager
def held(config: Config):
    """Hold the locks of `config`'s run (see the module docstring) inside the block; RunInUse if one is taken."""
    with contextlib.ExitStack() as stack:
        for what, path in lock_files(config).items():
            stack.enter_context(_flock(path, what))
        yield


@contextlib.contextmanager
def _flock(path: str, what: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(f.read() or "{}")
            except ValueError:
                holder = {}
            raise RunInUse(f"{what} is in use by another run (pid {holder.get('pid', '?')} on "
                           f"{holder.get('host', '?')} since {holder.get('started', '?')}: "
                           f"{holder.get('command', '?')}); wait for it to end, stop it, or use another run.dir "
                           f"(or run.name)") from None
        f.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:500],
                   "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}, f)
        f.flush()
        yield
