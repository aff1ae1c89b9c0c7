"""Benchmark entrypoint: `python jobs/bench.py --suite step --device cuda --json bench.json` (needs torch only)."""

import sys

from scmlab.bench import main

if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
