"""Entrypoint for `ray job submit ... -- python jobs/prepare.py ARGS`: the same as `scmlab prepare ARGS`."""

import sys

import _bootstrap  # noqa: F401  (this checkout's scmlab first)
from scmlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
