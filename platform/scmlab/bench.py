"""Benchmarks that print JSON. Suites:

- step: a TrigFlow diffusion training step against the sCT step of the same network, with each way of computing
  its JVP (DESIGN section 3), for MLP, UNet and DiT presets;
- data: loader samples/s from local disk against the local S3 server (SeaweedFS), for 1 and 2 loader workers;
- train: the training loop's steps/s, bare and under Ray Train;
- eval: images/s of sample generation and of the feature networks, and evaluation's share of `make demo`'s
  training time.

The step suite:

Every step is forward + backward + Adam update under the training precision (bf16 autocast on CUDA, fp32 on CPU);
the sCT step adds the tangent dF/dt: carried through the training forward (`sct_fused`, objective.jvp=fused), by a
separate forward-mode AD pass (`sct_autograd`) or by central differences (`sct_fd`). The variants run interleaved in
one process, one step each per round, after warmup rounds that are not timed; the ratio sCM / diffusion is of the
median step times. Peak memory is torch.cuda.max_memory_allocated per variant on CUDA (null on CPU, which has no
per-variant allocator peak). TFLOP/s (CUDA) divides the FLOPs that one step of the variant executes (counted once by
torch.utils.flop_counter, untimed) by its median time; on CPU the count is reported alone (it misses the fused
attention kernel's, which the counter does not see on CPU).

Needs torch only: no data, config-file or progress-bar packages are imported on this path.
"""

import argparse
import json
import logging
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import ModelConfig, net_config
from .nets import build_net
from .objectives import DiffusionLoss, SCMLoss

log = logging.getLogger(__name__)

# (arch, preset, data shape, batch). CPU: debug sizes, Fashion-MNIST's shape for images. CUDA: also the paper's
# CIFAR-10 UNet, EDM2 ImageNet-64 sizes, a DiT-B at 32x32 and a DiT-XL on ImageNet-256 latents, at batches that fit
# one 80 GB GPU.
CASES = {
    "cpu": [("mlp", "small", (2,), 512), ("unet", "ci", (1, 28, 28), 16), ("unet", "small", (1, 28, 28), 4),
            ("dit", "ci", (1, 28, 28), 16), ("dit", "small", (1, 28, 28), 4)],
    "cuda": [("mlp", "base", (2,), 4096), ("unet", "ci", (1, 28, 28), 256), ("unet", "small", (1, 28, 28), 256),
             ("unet", "cifar10", (3, 32, 32), 128), ("unet", "S", (3, 64, 64), 64), ("unet", "M", (3, 64, 64), 32),
             ("dit", "B", (3, 32, 32), 256), ("dit", "XL", (4, 32, 32), 64)],
}
VARIANTS = {
    "diffusion": lambda: DiffusionLoss(),
    "sct_autograd": lambda: SCMLoss("sct", warmup_steps=0, jvp="autograd"),
    "sct_fd": lambda: SCMLoss("sct", warmup_steps=0, jvp="fd"),
    "sct_fused": lambda: SCMLoss("sct", warmup_steps=0, jvp="fused"),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_case(arch: str, size: str, shape: tuple, batch: int, device: torch.device, *, warmup: int,
               iters: int) -> dict:
    """Median step time, peak memory and FLOPs of each variant for one preset, and the sCM / diffusion ratios."""
    torch.manual_seed(0)
    net = build_net(net_config(ModelConfig(arch=arch, size=size), 0.5), data_shape=shape).to(device)
    cuda = device.type == "cuda"
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.99),
                                 **({"fused": True} if cuda else {"foreach": True}))  # as training builds it
    amp = torch.bfloat16 if cuda else None
    x0 = torch.rand((batch, *shape), device=device) * 2 - 1
    losses = {name: make() for name, make in VARIANTS.items()}
    times = {name: [] for name in VARIANTS}
    peak = {name: 0 for name in VARIANTS}

    def step(loss_fn, i):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, _ = loss_fn(net, x0, step=i)
        loss.mean().backward()
        optimizer.step()

    flops = {}
    for name, loss_fn in losses.items():
        with FlopCounterMode(display=False) as counter:
            step(loss_fn, 0)
        flops[name] = counter.get_total_flops()
    for i in range(warmup + iters):
        for name, loss_fn in losses.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            step(loss_fn, i)
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
                if cuda:
                    peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return {
        "arch": arch, "preset": size, "data_shape": list(shape), "batch": batch,
        "params_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 3),
        "step_ms": {k: round(v, 3) for k, v in ms.items()},
        "ratio": {k: round(ms[k] / ms["diffusion"], 3) for k in ms if k != "diffusion"},
        "peak_mem_MiB": {k: round(v / 2**20, 1) for k, v in peak.items()} if cuda else None,
        "peak_mem_ratio": {k: round(peak[k] / peak["diffusion"], 3) for k in peak if k != "diffusion"}
        if cuda else None,
        "gflop_per_step": {k: round(v / 1e9, 3) for k, v in flops.items()},
        "tflop_per_s": {k: round(flops[k] / ms[k] / 1e9, 2) for k in ms} if cuda else None,
    }


def run_step_suite(device: torch.device, *, presets=None, warmup: int = 2, iters: int = 5) -> dict:
    """The CASES of the device; `presets` selects some: `arch:size` or a bare size (every arch that has it)."""
    cases = [c for c in CASES[device.type] if presets is None or c[1] in presets or f"{c[0]}:{c[1]}" in presets]
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what runs in fp32, as training allows
    results = []
    for arch, size, shape, batch in cases:
        log.info("bench %s %s %s batch %d", arch, size, shape, batch)
        try:
            results.append(bench_case(arch, size, shape, batch, device, warmup=warmup, iters=iters))
        except torch.cuda.OutOfMemoryError as e:  # record and go on with the other presets
            results.append({"arch": arch, "preset": size, "data_shape": list(shape), "batch": batch,
                            "error": f"OOM: {e}"[:300]})
            torch.cuda.empty_cache()
    return {
        "suite": "step", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "threads": torch.get_num_threads(), "warmup": warmup, "iters": iters, "results": results,
    }


def run_data_suite(*, limit: int = 20_000, batch_size: int = 256, batches: int = 100, repeats: int = 3) -> dict:
    """Fashion-MNIST (`limit` images, 1000 per shard) prepared to a temporary folder and to the local object store
    (started for the run in a temporary home unless SCMLAB_HOME has one running), read back by make_loader."""
    import os
    import tempfile

    from . import data, services
    from .data import throughput

    with tempfile.TemporaryDirectory(prefix="scmlab-bench-") as tmp:
        home = os.environ.get("SCMLAB_HOME") or os.path.join(tmp, "home")
        started = services.services_status(home)["storage"] is None
        state = services.storage_up(home)
        try:
            os.environ.update(services.env_for_clients(home))
            data.configure_s3()
            local, remote = os.path.join(tmp, "fashion-mnist"), f"s3://{state['bucket']}/bench/fashion-mnist"
            for out in (local, remote):
                data.prepare("fashion-mnist", out, limit=limit, shard_size=1000, progress=False)
            result = throughput.compare(local, remote, batch_size=batch_size, batches=batches, repeats=repeats)
        finally:
            if started:
                services.services_down(home)
    return {"suite": "data", "dataset": f"fashion-mnist[:{limit}] 28x28, 1000 per shard",
            "batch_size": batch_size, "batches": batches, "repeats": repeats,
            "samples_per_s": result["samples_per_s"], "ratio_s3_over_local": result["ratio"]}


def run_train_suite(*, steps: int = 120, batch_size: int = 64, repeats: int = 3) -> dict:
    """The training loop on the 8x8 digits (UNet `ci`, sCT, global batch `batch_size`, fp32 on CPU), one CPU per
    process: in this process (bare, 1 thread), under Ray Train with 1 worker of 1 CPU, and with 2 workers of 1 CPU
    (DDP, gloo, half the batch each). One thread each, so that the first ratio is Ray's overhead and the second the
    data-parallel speed-up, not torch's intra-op threading. steps/s comes from the loop's own step timer (data,
    step, all-reduce; not checkpoints) over the second half of each run, so start-up is excluded; the variants run
    `repeats` times, interleaved, and the median is kept."""
    import os
    import statistics
    import tempfile

    from . import data
    from .config import Config
    from .train import loop
    from .train.distributed import fit

    os.environ.setdefault("RAY_ADDRESS", "local")  # a Ray of this process's own, on this machine's CPUs
    variants = {"bare": 0, "ray_1_worker": 1, "ray_2_workers": 2}
    timed = {name: [] for name in variants}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="scmlab-bench-") as tmp:
        shards = os.path.join(tmp, "digits")
        data.prepare("digits", shards, shard_size=100, progress=False)
        for repeat in range(repeats):
            for name, workers in variants.items():
                config = Config.from_dict({
                    "data": {"train": shards}, "model": {"arch": "unet", "size": "ci"},
                    "objective": {"kind": "sct", "warmup_steps": 1000}, "optim": {"name": "radam", "lr": 1e-3},
                    "train": {"steps": steps, "batch_size": batch_size, "log_every": steps // 2,
                              "checkpoint_every": steps, "device": "cpu", "workers": workers, "cpus_per_worker": 1},
                    "tracking": {"kind": "none"}, "run": {"dir": os.path.join(tmp, f"{name}-{repeat}")}})
                if workers:
                    summary = fit(config, None)
                else:
                    torch.set_num_threads(1)  # as Ray gives a worker of 1 CPU (OMP_NUM_THREADS=1)
                    try:
                        summary = loop.train(config)
                    finally:
                        torch.set_num_threads(threads)
                timed[name].append(round(1 / summary["metrics"]["time/step_s"], 3))
                log.info("%s: %.2f steps/s", name, timed[name][-1])
    steps_per_s = {name: round(statistics.median(v), 3) for name, v in timed.items()}
    return {"suite": "train", "device": "cpu", "cpus": os.cpu_count(), "torch": torch.__version__,
            "case": f"digits 8x8, UNet ci, sCT, global batch {batch_size}, 1 thread per process, {steps} steps "
                    f"(second half timed)",
            "repeats": repeats, "steps_per_s": steps_per_s, "runs": timed,
            "ratio_ray_1_worker_over_bare": round(steps_per_s["ray_1_worker"] / steps_per_s["bare"], 3),
            "ratio_2_workers_over_1": round(steps_per_s["ray_2_workers"] / steps_per_s["ray_1_worker"], 3)}


def _throughput(fns: dict, batch: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Images per second of each fn() on `batch` images: one untimed call each, then `repeats` rounds of one timed
    call each, interleaved (so that load from other work affects every variant alike); the median time."""
    times = {name: [] for name in fns}
    for i in range(repeats + 1):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i:
                times[name].append(time.perf_counter() - t0)
    return {name: round(batch / statistics.median(t), 1) for name, t in times.items()}


def run_eval_suite(device: torch.device, *, train_steps: int = 400, repeats: int = 5) -> dict:
    """Evaluation costs (scmlab.eval): images/s of generation (UNet `ci`, 1 and 2 consistency steps, 8x8 digits) and
    of the feature networks (the digits classifier; Inception-v3 on 8x8 and 32x32 inputs resized to 299), on
    `device`; then the share of a training run's wall time that evaluation takes at `make demo`'s cadence
    (jobs/configs/digits-sct-ray.yaml: fd of eval.n samples per sampler every eval.every steps, on its 2 Ray Train
    CPU workers), from a shortened run of that config (`train_steps` steps, local shards, no tracking): the loop's
    own step time and the evaluator's own time (`time/eval_s`), projected to the demo's steps."""
    import os
    import tempfile

    from . import data
    from .config import load_config
    from .eval.classifier import Classifier
    from .eval.inception import InceptionV3
    from .eval.training import prepare as prepare_eval
    from .train.distributed import fit
    from .train.samples import build_model, generate

    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "jobs",
                        "configs", "digits-sct-ray.yaml")
    with tempfile.TemporaryDirectory(prefix="scmlab-bench-") as tmp:
        train_url, test_url = os.path.join(tmp, "digits"), os.path.join(tmp, "digits-test")
        data.prepare("digits", train_url, shard_size=100, progress=False)
        data.prepare("digits", test_url, shard_size=100, split="test", progress=False)
        config = load_config(demo, [f"data.train={train_url}", f"eval.test={test_url}", "tracking.kind=none",
                                    f"run.dir={os.path.join(tmp, 'run')}", "run.storage=''"])
        manifest = data.read_manifest(train_url)
        t0 = time.perf_counter()
        clf = Classifier(train_url, device)
        classifier_s = time.perf_counter() - t0
        net = build_model(config, manifest).to(device).eval()
        batch = config.eval.batch_size
        noise = torch.randn((batch, *manifest["shape"]), device=device)
        labels = torch.arange(batch, device=device) % 10
        throughput = _throughput({
            "generate_1step": lambda: generate(net, config, noise, steps=1, class_labels=labels),
            "generate_2step": lambda: generate(net, config, noise, steps=2, class_labels=labels),
            "classifier_features": lambda: clf(noise.clamp(-1, 1))}, batch, repeats, device)
        inception = InceptionV3(device=device)
        small = 128 if device.type == "cuda" else 16
        x = {size: torch.rand((small, 3, size, size), device=device) * 2 - 1 for size in (8, 32)}
        throughput.update(_throughput({f"inception_features_{size}px": (lambda v=v: inception(v))
                                       for size, v in x.items()}, small, repeats, device))

        if device.type == "cpu":  # the demo's cadence: its 2 Ray Train CPU workers
            os.environ.setdefault("RAY_ADDRESS", "local")
            c = config.train
            short = load_config(demo, [f"data.train={train_url}", f"eval.test={test_url}", "tracking.kind=none",
                                       f"run.dir={os.path.join(tmp, 'run')}", "run.storage=''",
                                       f"train.steps={train_steps}", f"train.log_every={train_steps // 4}",
                                       f"train.checkpoint_every={config.eval.every}", "train.sample_every=0"])
            prepare_eval(short.with_absolute_paths())  # reference statistics made before the run, as drivers do
            t0 = time.perf_counter()
            metrics = fit(short, None)["metrics"]
            wall = time.perf_counter() - t0
            evals = c.steps // config.eval.every
            train_s, eval_s = c.steps * metrics["time/step_s"], evals * metrics["time/eval_s"]
            share = {"demo_steps": c.steps, "eval_every": config.eval.every, "eval_n": config.eval.n,
                     "samplers": list(config.eval_samplers()), "metrics": config.eval.metrics,
                     "step_s": round(metrics["time/step_s"], 4), "eval_s": round(metrics["time/eval_s"], 3),
                     "bench_run_steps": train_steps, "bench_run_wall_s": round(wall, 1),
                     "eval_share_of_demo_training": round(eval_s / (train_s + eval_s), 4),
                     "eval_fd_2step_at_bench_end": round(metrics["eval/fd/2step"], 3)}
        else:
            share = None
    return {"suite": "eval", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": batch,
            "inception_batch": small, "images_per_s": throughput, "classifier_train_s": round(classifier_s, 1),
            "classifier_held_out_accuracy": clf.info["accuracy"], "demo_cadence": share}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Benchmark a diffusion training step against an sCM step.")
    p.add_argument("--suite", choices=("step", "data", "train", "eval"), default="step",
                   help="step: one training step, diffusion vs sCM; data: loader samples/s, local disk vs S3; "
                        "train: the training loop's steps/s bare vs under Ray Train with 1 and 2 CPU workers; "
                        "eval: generation and feature images/s, and evaluation's share of the demo's training time")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--presets", help="comma-separated presets, `arch:size` or a size for every arch that has it "
                                     "(default: those that fit the device, e.g. unet:ci,dit:ci)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--iters", type=int, default=5, help="timed rounds (the median is reported)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.suite == "data":
        result = run_data_suite()
    elif args.suite == "train":
        result = run_train_suite()
    elif args.suite == "eval":
        result = run_eval_suite(torch.device(args.device))
    else:
        result = run_step_suite(torch.device(args.device),
                                presets=args.presets.split(",") if args.presets else None,
                                warmup=args.warmup, iters=args.iters)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return result
