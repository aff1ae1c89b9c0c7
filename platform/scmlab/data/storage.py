"""Dataset locations as URLs: the one place that opens, joins and expands them.

A location is a local path, a `file://` URL, or `scheme://...` for a scheme registered with `register_scheme`.
Everything that reads a dataset (the manifest reader, the shard reader, checksum verification, and webdataset's
own `gopen`) opens through `open_url`; `s3://` (scmlab.data.s3, boto3 streaming) is registered here, so stock
`webdataset.WebDataset("s3://bucket/prefix/name-{000000..000009}.tar")` reads object storage too.
"""

import hashlib
import os
from collections.abc import Callable
from typing import BinaryIO
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand
import webdataset

from . import s3

Opener = Callable[[str], BinaryIO]


def file_path(url: str) -> str | None:
    """The file system path of a local location (a path or file:// URL); None for any other scheme."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return url2pathname(parsed.path)
    return url if parsed.scheme == "" else None


def _open_local(url: str) -> BinaryIO:
    return open(file_path(url), "rb")


_OPENERS: dict[str, Opener] = {"": _open_local, "file": _open_local}


def register_scheme(scheme: str, opener: Opener) -> None:
    """Open `scheme://...` URLs with `opener(url) -> binary stream`, here and in webdataset's `gopen`. The opener
    raises FileNotFoundError for a missing object (a dataset without manifest.json is reported as incomplete)."""
    _OPENERS[scheme] = opener

    def gopen(url, mode="rb", bufsize=8192, **kw):  # webdataset's handler signature
        if mode != "rb":
            raise ValueError(f"{url}: {scheme}:// is registered read-only")
        return opener(url)

    webdataset.gopen_schemes[scheme] = gopen


def open_url(url: str) -> BinaryIO:
    """A binary read stream for `url`."""
    scheme = urlparse(url).scheme
    if scheme not in _OPENERS:
        raise ValueError(f"{url}: no opener for {scheme}:// URLs (known: local paths, "
                         f"{', '.join(s + '://' for s in _OPENERS if s)})")
    return _OPENERS[scheme](url)


def write_bytes(url: str, data: bytes) -> None:
    """Store `data` at `url` whole or not at all: a local file is written to a temporary name (its directory made
    if missing), synced and renamed; an s3:// object is one PUT."""
    path = file_path(url)
    if path is None:
        if urlparse(url).scheme != "s3":
            raise ValueError(f"{url}: cannot write there (writable: local paths, s3://)")
        s3.put_bytes(url, data)
        return
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def join_url(base: str, name: str) -> str:
    """`name` inside the location `base` (a directory or a URL prefix)."""
    return base.rstrip("/") + "/" + name


def split_url(url: str) -> tuple[str, str]:
    """(parent location, last name) of `url`."""
    parent, _, name = url.rpartition("/")
    return parent or ".", name


def expand_url(pattern: str) -> list[str]:
    """The URLs of a brace pattern, e.g. `dir/x-{000000..000003}.tar`."""
    return list(braceexpand.braceexpand(pattern))


def digest(url: str) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of the object at `url`, streamed."""
    sha, size = hashlib.sha256(), 0
    with open_url(url) as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


register_scheme("s3", s3.open_s3)
