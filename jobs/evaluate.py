"""Entrypoint for `ray job submit ... -- python jobs/evaluate.py ARGS`: the same as `scmlab evaluate ARGS`."""

import sys

import _bootstrap  # noqa: F401  (this checkout's scmlab first)
from scmlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
