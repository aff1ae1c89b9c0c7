"""manifest.json: what a shard directory holds (count, shape, classes, per-shard checksums, data statistics).

Schema ("format": "scmlab-shards/1"):
    name, source (what `prepare` read), split ("train", "test"; manifests written before splits lack it: "train"),
    kind ("image" | "vector"),
    shape (one sample in model space: [C, H, W] or [D]), num_classes (0: unconditional), count, sigma_d,
    shards: [{name, count, sha256, bytes}], stats: {mean, std} (per channel of [-1, 1] pixels for images,
    informational; per dimension in original units for vectors, used by `Normalizer`), card (the resolved card).

`prepare` writes the manifest last and atomically (a renamed file, or one PUT to object storage), so a location
with a manifest is a whole dataset.
A dataset location (`url`) is a directory or URL prefix holding manifest.json, or a brace pattern of some of its
shards (`dir/name-{000000..000003}.tar`) with manifest.json beside them.
"""

import hashlib
import json

from .shards import DataError
from .storage import digest, expand_url, join_url, open_url, split_url, write_bytes

FORMAT = "scmlab-shards/1"
MANIFEST = "manifest.json"


def write_manifest(location: str, manifest: dict) -> None:
    """Write location/manifest.json whole or not at all (a local directory or an s3:// prefix)."""
    write_bytes(join_url(location, MANIFEST), json.dumps(manifest, indent=1).encode())


def location(url: str) -> str:
    """The directory or prefix of a dataset URL (a brace pattern of shards stands for the dataset beside them)."""
    return split_url(url)[0] if url.endswith(".tar") else url


def read_manifest(url: str) -> dict:
    """The manifest of the dataset at `url`."""
    where = join_url(location(url), MANIFEST)
    try:
        with open_url(where) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{url}: no {MANIFEST} at {where}; the dataset is missing or was not completely written "
                        f"(make it with `scmlab prepare SOURCE --out DIR`)") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{where}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def checksum(manifest: dict) -> str:
    """sha256 of what a dataset holds: its kind, shape, classes and every shard's name and sha256. Whatever is
    computed from a dataset (reference statistics, the fd classifier) records it, and is recomputed when it
    changes."""
    content = {k: manifest.get(k) for k in ("kind", "shape", "num_classes", "count")}
    content["shards"] = [(s["name"], s["sha256"]) for s in manifest["shards"]]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def shard_list(url: str, manifest: dict) -> list[tuple[str, int]]:
    """(shard URL, sample count) for every shard `url` names: all of the manifest's, or those of its brace pattern."""
    base, counts = location(url), {s["name"]: s["count"] for s in manifest["shards"]}
    names = [split_url(u)[1] for u in expand_url(url)] if url.endswith(".tar") else list(counts)
    unknown = [n for n in names if n not in counts]
    if unknown:
        raise DataError(f"{url}: shards {unknown[:3]} are not in {join_url(base, MANIFEST)}")
    return [(join_url(base, n), counts[n]) for n in names]


def verify(url: str) -> dict:
    """Check every shard's sha256 and size against the manifest; return the manifest, or raise naming each bad shard."""
    manifest = read_manifest(url)
    expected = {s["name"]: s for s in manifest["shards"]}
    problems = []
    for shard_url, _ in shard_list(url, manifest):
        entry = expected[split_url(shard_url)[1]]
        try:
            sha256, size = digest(shard_url)
        except FileNotFoundError:
            problems.append(f"{shard_url}: missing")
            continue
        if (sha256, size) != (entry["sha256"], entry["bytes"]):
            problems.append(f"{shard_url}: {size} bytes sha256 {sha256[:12]}..., the manifest says "
                            f"{entry['bytes']} bytes sha256 {entry['sha256'][:12]}...")
    if problems:
        raise DataError(f"{url}: {len(problems)} bad shard(s):\n  " + "\n  ".join(problems))
    return manifest
