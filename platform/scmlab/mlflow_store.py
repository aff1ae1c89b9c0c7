"""MLflow's sqlite backend store kept in the bucket, so that tracking outlives the machine that serves it.

The server's disk is working state (`ray down` deletes the head's volume; `scmlab services down` plus a wiped home
does the same locally); the bucket is what lasts: it already holds the runs' artifacts. `snapshot` copies the live
database with sqlite's online backup (consistent while the server writes) and uploads it; `restore` brings it back
before the server starts on an empty disk. Chosen over a database service (RDS) because it needs no second service,
no database password on the nodes and no VPC setup, and is tested here end to end; its cost is that what was logged
after the last snapshot is lost when the head dies without one (the cluster's head snapshots every few minutes and
once more before `ray down`, see README).
"""

import logging
import os
import sqlite3
import tempfile
import time
from pathlib import Path

from .data.s3 import split_s3

log = logging.getLogger(__name__)


def snapshot(db: str | os.PathLike, url: str, client) -> bool:
    """Upload a consistent copy of the sqlite database `db` to s3://bucket/key `url`; False when `db` does not exist
    (a server that never started has nothing to keep)."""
    db = Path(db)
    if not db.exists():
        return False
    bucket, key = split_s3(url)
    with tempfile.TemporaryDirectory(dir=db.parent) as tmp:
        copy = Path(tmp) / db.name
        source, target = sqlite3.connect(db), sqlite3.connect(copy)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()
        client.upload_file(str(copy), bucket, key)
    log.info("MLflow store %s saved to %s", db, url)
    return True


def restore(db: str | os.PathLike, url: str, client) -> bool:
    """Download the snapshot at `url` to `db` when `db` is missing (an existing database is never overwritten);
    True when restored, False when there was nothing to restore."""
    from botocore.exceptions import ClientError

    db = Path(db)
    if db.exists():
        return False
    bucket, key = split_s3(url)
    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
            raise
        return False
    db.parent.mkdir(parents=True, exist_ok=True)
    partial = db.with_name(db.name + ".partial")
    client.download_file(bucket, key, str(partial))
    partial.chmod(0o600)
    os.replace(partial, db)  # whole or absent: a cut download never poses as the store
    log.info("MLflow store %s restored from %s", db, url)
    return True


def keep(db: str | os.PathLike, url: str, client, every: float) -> None:
    """Snapshot every `every` seconds, forever (the cluster head's background saver)."""
    while True:
        time.sleep(every)
        try:
            snapshot(db, url, client)
        except Exception as e:  # an S3 hiccup costs one snapshot, not the saver
            log.warning("MLflow store snapshot to %s failed: %s", url, e)
