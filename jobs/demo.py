"""`make demo`: the main job on one machine, on the embedded defaults.

Starts the local S3 server and MLflow server (`scmlab services up`), writes the scikit-learn 8x8 digits (train and
held-out test split) as shards into S3, trains a class-conditional sCT UNet on 2 Ray Train CPU workers streaming
those shards (a local Ray started by this process; checkpoints in S3; live in MLflow, with the fd of 1- and 2-step
samples at every checkpoint), draws a 2-step sample grid from the final EMA weights and prints the final scores and
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

from mlflow import MlflowClient

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
    data.prepare("digits", config.eval.test, shard_size=100, split="test")  # held out: the floor of eval/fd
    summary = run(config)

    grid = os.path.join(args.out, "samples-2step.png")
    cli.main(["sample", "--checkpoint", summary["checkpoint"], "--steps", "2", "--n", "100",
              "--out", os.path.join(args.out, "samples-2step.npz"), "--grid", grid])
    minutes = (time.monotonic() - started) / 60
    scores = summary["metrics"]
    best = MlflowClient(state["mlflow"]["tracking_uri"]).get_run(summary["mlflow_run_id"]).data.tags
    print(f"""
scmlab demo done in {minutes:.1f} min: {summary['step']} sCT steps on {config.train.workers} Ray Train workers.
  sample quality at step {summary['step']} ({config.eval.n} samples; fd: Frechet distance of digit-classifier features,
  lower is better; the held-out test digits score the floor):
    fd 1-step {scores['eval/fd/1step']:.3g}, 2-step {scores['eval/fd/2step']:.3g}, floor {scores['eval/fd/floor']:.3g}
    classified as their class: 1-step {scores['eval/cls_acc/1step']:.1%}, 2-step {scores['eval/cls_acc/2step']:.1%}, \
test digits {scores['eval/cls_acc/floor']:.1%}
    best checkpoint by {config.eval.best}: step {best.get('checkpoint.best_step')} ({best.get('checkpoint.best')})
  2-step samples (one class per column, 0-9): {grid}
  MLflow UI:        {state['mlflow']['tracking_uri']}   (this run: {summary['mlflow_url']})
  EMA model:        {summary['model_uri']}
  checkpoints:      {summary['ray_checkpoint']} (Ray run storage), {summary['checkpoint']}
  stop the services: scmlab services down   (data and runs are kept in {services.resolve_home(args.home)})
""")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
