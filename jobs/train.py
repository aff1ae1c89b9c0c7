"""Entrypoint for `ray job submit ... -- python jobs/train.py ARGS`: the same as `scmlab train ARGS`."""

import sys

import _bootstrap  # noqa: F401  (this checkout's scmlab first)
from scmlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
