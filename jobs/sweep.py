"""Entrypoint for `ray job submit ... -- python jobs/sweep.py --config FILE [KEY=VALUE ...]`: the same as
`scmlab sweep ...` (a Ray Tune scaling sweep; scmlab.tune.sweep)."""

import sys

import _bootstrap  # noqa: F401  (this checkout's scmlab first)
from scmlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
