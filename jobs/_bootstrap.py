"""Put this checkout's platform/ first on sys.path, so that a job submitted with `ray job submit --working-dir .`
runs the submitted code even on nodes where another scmlab is installed; the training driver ships that same
package to its Ray workers (scmlab.train.distributed.connect)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "platform"))
