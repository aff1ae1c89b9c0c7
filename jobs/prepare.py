"""Entrypoint for `ray job submit ... -- python jobs/prepare.py ARGS`: the same as `scmlab prepare ARGS`."""

import sys

from scmlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
