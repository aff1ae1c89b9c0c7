"""Benchmark entrypoint: `python jobs/bench.py --suite step --device cuda --json bench.json` (the step suite needs
torch only; `--suite data` the services, `--suite train` Ray)."""

import sys

from scmlab.bench import main

if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
