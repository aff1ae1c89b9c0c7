"""`make demo`: the main job on one machine, on the embedded defaults.

Starts the local S3 server and MLflow server (`scmlab services up`), writes the scikit-learn 8x8 digits as shards
into S3, trains a class-conditional sCT UNet on 2 Ray Train CPU workers streaming those shards (a local Ray started
by this process; checkpoints in S3; live in MLflow), draws a 2-step sample grid from the final EMA weights and prints
where to look. The services keep running afterwards (`scmlab services down` stops them); Ray stops with this process.

The same steps by hand, and on a cluster, are in the README. Credentials stay in the environment: this process
takes the services' client environment, and the local Ray it starts hands it to the workers.

    python jobs/demo.py [--out runs/demo] [--home .scmlab] [train.steps=1200 ...]
"""

import argparse
import logging
import os
import sys
import time

import _bootstrap  # noqa: F401  (this checkout's scmlab first)

from scmlab import cli, data, services
from scmlab.config import load_config
from scmlab.train.driver import run

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "digits-sct-ray.yaml")
log = logging.getLogger("scmlab.demo")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="run directory, final checkpoint and sample grid")
    p.add_argument("--home", default=None, help="services state directory (default: $SCMLAB_HOME or ./.scmlab)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"overrides of {os.path.relpath(CONFIG)}")
    args = cli.parse(p, argv)  # overrides anywhere on the line
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    started = time.monotonic()

    state = services.services_up(args.home)
    os.environ.update(services.env_for_clients(args.home))
    # A Ray of this process's own: one that runs already would lack the services' environment.
    os.environ.setdefault("RAY_ADDRESS", "local")
    config = load_config(CONFIG, [f"run.dir={os.path.join(args.out, 'run')}", *args.overrides])
    data.prepare("digits", config.data.train, shard_size=100)  # uploads only what is missing
    summary = run(config)

    grid = os.path.join(args.out, "samples-2step.png")
    cli.main(["sample", "--checkpoint", summary["checkpoint"], "--steps", "2", "--n", "100",
              "--out", os.path.join(args.out, "samples-2step.npz"), "--grid", grid])
    minutes = (time.monotonic() - started) / 60
    print(f"""
scmlab demo done in {minutes:.1f} min: {summary['step']} sCT steps on {config.train.workers} Ray Train workers.
  2-step samples (one class per column, 0-9): {grid}
  MLflow UI:        {state['mlflow']['tracking_uri']}   (this run: {summary['mlflow_url']})
  EMA model:        {summary['model_uri']}
  checkpoints:      {summary['ray_checkpoint']} (Ray run storage), {summary['checkpoint']}
  stop the services: scmlab services down   (data and runs are kept in {services.resolve_home(args.home)})
""")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
