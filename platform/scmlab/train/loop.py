"""The training loop: steps, mixed precision, EMA, NaN guard, checkpoints, sample grids. No framework.

`train(config)` runs one process's share of a run. A launcher (Ray Train: scmlab.train.distributed) passes `rank`,
`world_size`, a `wrap` (DistributedDataParallel, or FSDP2's sharding: scmlab.train.parallel), its checkpoint store
and a tracker; nothing here reads global state. Each step reseeds every random draw (data order, t, z, dropout,
label dropout) from (seed, rank, step), so a run resumed from a checkpoint takes the same steps as an uninterrupted
one. Metrics are namespaced (loss/, tangent/, weight/, optim/, time/, data/, train/).
"""

import contextlib
import logging
import math
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import data, trigflow
from ..config import Config, ConfigError
from ..ema import EMA
from ..objectives import DiffusionLoss, SCMLoss
from ..tracking import NullTracker
from . import checkpoint, parallel
from .samples import build_model, class_labels, ema_model, sample_data, save_grid

log = logging.getLogger(__name__)

T_BINS = 4  # loss/bin{i} averages the per-sample loss over t in [i, i + 1) * (pi/2) / T_BINS  (as minRF's lossbin)
GRID_IMAGES, GRID_VECTORS = 64, 2000


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 32-bit seed that depends on (seed, rank, step) only: resumed runs redraw exactly what they would have."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device: cuda was asked for but torch sees no CUDA device; use train.device=cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA under `auto`, fp32 (no autocast) on CPU."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def build_objective(config: Config, teacher: torch.nn.Module | None):
    o = config.objective
    if o.kind == "diffusion":
        return DiffusionLoss(sigma_d=o.sigma_d, P_mean=o.P_mean, P_std=o.P_std, adaptive_weight=o.adaptive_weight)
    return SCMLoss(kind=o.kind, sigma_d=o.sigma_d, P_mean=o.P_mean, P_std=o.P_std, tangent_norm=o.tangent_norm,
                   tangent_c=o.tangent_c, warmup_steps=o.warmup_steps, adaptive_weight=o.adaptive_weight, jvp=o.jvp,
                   teacher=teacher if o.kind == "scd" else None, guidance_scale=o.guidance_scale,
                   guidance_max=o.guidance_max)


def build_optimizer(config: Config, params, device: torch.device = torch.device("cpu")) -> torch.optim.Optimizer:
    """Adam or RAdam, updating all tensors in multi-tensor (foreach) kernels; Adam on CUDA in its fused kernel."""
    o = config.optim
    cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[o.name]
    kernel = {"fused": True} if o.name == "adam" and device.type == "cuda" else {"foreach": True}
    return cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, **kernel)


def load_teacher(config: Config, manifest: dict) -> torch.nn.Module:
    """The EMA network of objective.teacher, frozen; its data must match the student's."""
    ckpt = checkpoint.load(config.objective.teacher)
    if ckpt["config"]["objective"]["kind"] != "diffusion":
        log.warning("objective.teacher %s was trained as %s, not diffusion", config.objective.teacher,
                    ckpt["config"]["objective"]["kind"])
    for key in ("shape", "num_classes"):
        if ckpt["manifest"].get(key) != manifest.get(key):
            raise ValueError(f"objective.teacher: the teacher's data {key} {ckpt['manifest'].get(key)} differs from "
                             f"data.train's {manifest.get(key)}")
    return ema_model(ckpt)


def init_from_teacher(net: torch.nn.Module, teacher: torch.nn.Module, path: str) -> None:
    """Start the student from the teacher's EMA weights (the paper's diffusion fine-tuning). Parameters the teacher
    lacks (a guidance input) keep their fresh initialization; any other mismatch is an error."""
    try:
        missing, unexpected = net.load_state_dict(teacher.state_dict(), strict=False)
    except RuntimeError as e:
        raise ValueError(f"objective.teacher: {path} does not fit model.arch/model.size: {e}") from None
    if unexpected:
        raise ValueError(f"objective.teacher: {path} has weights the student lacks: {unexpected[:5]}; use the "
                         f"teacher's model.arch and model.size")
    if missing:
        log.warning("initialized from the teacher except %d tensors (kept fresh): %s", len(missing), missing[:5])


def check_inputs(config: Config) -> dict:
    """What can be checked before any worker starts: the dataset is there (its manifest reads), its sigma_d is the
    objective's, it has classes if the teacher is to be guided, the teacher checkpoint exists, evaluation can score
    this data. Returns the manifest. Errors name the field or URL."""
    manifest = data.read_manifest(config.data.train)
    if float(manifest["sigma_d"]) != config.objective.sigma_d:  # vectors were normalized to the dataset's sigma_d
        raise ConfigError(f"objective.sigma_d: {config.objective.sigma_d} differs from the dataset's sigma_d "
                          f"{manifest['sigma_d']} (data.train manifest); set objective.sigma_d={manifest['sigma_d']}")
    guided = config.objective.guidance_scale != 1.0 or config.objective.guidance_max > 1
    if guided and not int(manifest.get("num_classes", 0)):
        raise ConfigError("objective.guidance_scale / objective.guidance_max: classifier-free guidance needs class "
                          f"labels, and the data of data.train ({config.data.train}) has none")
    if config.objective.teacher:
        try:
            checkpoint.resolve(config.objective.teacher)
        except FileNotFoundError as e:
            raise ConfigError(f"objective.teacher: {e}") from None
    if config.eval.every:
        from ..eval.training import check

        check(config, manifest)
    return manifest


def train(config: Config, *, rank: int = 0, world_size: int = 1, wrap=None, progress: bool = False,
          checkpoints=None, tracker=None) -> dict:
    """Train to config.train.steps, resuming from the latest checkpoint. Returns a summary dict:
    {"step", "bad_steps", "checkpoint" (latest path or URI), "metrics" (last logged), "samples" (last grid or None),
    "mlflow_run_id" (None when not tracked)}.

    `checkpoints`: the store (default: checkpoint.LocalCheckpoints of run.dir); every rank calls its `save` at each
    checkpoint step, which lets a launcher's store synchronize there. `tracker`: on rank 0, a callable taking the
    MLflow run id stored in the resumed checkpoint (None for a fresh run) and returning the scmlab.tracking.Tracker
    to log to; it is finished with the run (FAILED on an exception). Other ranks log nothing.
    """
    cfg, run_dir = config.train, config.run.dir
    device = resolve_device(cfg.device)
    amp = autocast_dtype(cfg.precision, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the matmuls that autocast leaves in fp32
    if cfg.batch_size % world_size:
        raise ConfigError(f"train.batch_size: {cfg.batch_size} does not split evenly over {world_size} workers")
    local_batch = cfg.batch_size // world_size
    manifest = check_inputs(config)
    store = checkpoints or checkpoint.LocalCheckpoints(run_dir, keep=cfg.keep_checkpoints, rank=rank)

    torch.manual_seed(cfg.seed)  # the same initialization on every rank
    net = build_model(config, manifest).to(device)
    resumed = store.restore(map_location=device)
    if resumed:
        checkpoint.check_resume(resumed, config, manifest, store.last())
    teacher = None
    if config.objective.teacher and (config.objective.kind == "scd" or not resumed):
        teacher = load_teacher(config, manifest).to(device)
        if not resumed:
            init_from_teacher(net, teacher, config.objective.teacher)
    ema = EMA(net, batch_size=cfg.batch_size, **({"half_life_images": cfg.ema_half_life} if cfg.ema == "halflife"
                                                  else {"sigma_rel": cfg.ema_sigma_rel}))
    state = {"step": 0, "bad_steps": 0}
    if resumed:
        net.load_state_dict(resumed["model"])
        ema.load_state_dict(resumed["ema"])
        state = {"step": resumed["step"], "bad_steps": resumed["bad_steps"]}
    # Wrapped before the optimizer is built: FSDP2 replaces the parameters by their shards (a checkpoint holds whole
    # tensors, loaded above into the whole network).
    model = wrap(net) if wrap is not None else net
    sharded = parallel.is_sharded(net)
    optimizer = build_optimizer(config, net.parameters(), device)
    if resumed:
        if sharded:
            parallel.load_optimizer(net, optimizer, resumed["optimizer"])
        else:
            optimizer.load_state_dict(resumed["optimizer"])
        log.info("resumed at step %d", state["step"])
    run = (tracker or (lambda run_id: NullTracker()))(resumed and resumed.get("mlflow_run_id")) if rank == 0 \
        else NullTracker()
    evaluator = _evaluator(config, manifest, rank, world_size, device, resumed)
    del resumed  # the loaded tensors: the model, EMA and optimizer hold copies now
    with run:
        if rank == 0:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "config.yaml"), "w") as f:
                f.write(config.to_yaml())
            log.info("%s %s/%s: %.2fM parameters, data %s %s, %d classes, device %s, autocast %s, %d worker(s) x "
                     "batch %d%s", config.objective.kind, config.model.arch, config.model.size,
                     sum(p.numel() for p in net.parameters()) / 1e6, manifest["kind"], manifest["shape"],
                     manifest.get("num_classes", 0), device, amp, world_size, local_batch,
                     ", weights sharded (FSDP2)" if sharded else "")
            run.log_params(config.to_dict())
            run.set_tags({"scmlab.kind": config.objective.kind, "scmlab.data": config.data.train,
                          "scmlab.workers": str(world_size), "scmlab.device": str(device)})
            if state["step"]:
                run.log_metrics({"train/resumed_from": state["step"]}, step=state["step"])
        return _steps(config, rank=rank, world_size=world_size, model=model, net=net, ema=ema, optimizer=optimizer,
                      teacher=teacher, manifest=manifest, state=state, store=store, run=run, device=device, amp=amp,
                      local_batch=local_batch, progress=progress, evaluator=evaluator)


def _evaluator(config: Config, manifest: dict, rank: int, world_size: int, device, resumed: dict | None):
    """The sample-quality hook of the `eval` section (scmlab.eval.training), or None when eval.every is 0."""
    if not config.eval.every:
        return None
    from ..eval.training import TrainingEval

    evaluator = TrainingEval(config, manifest, rank=rank, world_size=world_size, device=device)
    evaluator.load_state_dict((resumed or {}).get("eval"))
    return evaluator


def _steps(config: Config, *, rank, world_size, model, net, ema, optimizer, teacher, manifest, state, store, run,
           device, amp, local_batch, progress, evaluator) -> dict:
    """The step loop of `train`, from state["step"] to train.steps."""
    cfg = config.train
    objective = build_objective(config, teacher)
    loader = data.make_loader(config.data.train, batch_size=local_batch, seed=cfg.seed, rank=rank,
                              world_size=world_size, num_workers=config.data.num_workers, start_step=state["step"],
                              on_error=config.data.on_error, pin_memory=device.type == "cuda")
    guidance = None  # a student with a guidance input sees a fixed scale, or the objective draws one per sample
    if config.model.guidance_input and config.objective.guidance_max == 1:
        guidance = torch.full((local_batch,), config.objective.guidance_scale, device=device)
    distributed = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    sharded = parallel.is_sharded(net)

    def snapshot(gathered: tuple[dict, dict] | None) -> dict:
        model_state, optimizer_state = gathered or (net.state_dict(), optimizer.state_dict())
        return {"model": model_state, "ema": ema.state_dict(), "optimizer": optimizer_state,
                "step": state["step"], "bad_steps": state["bad_steps"], "config": config.to_dict(),
                "manifest": manifest, "mlflow_run_id": run.run_id,
                "eval": evaluator.state_dict() if evaluator is not None else None}

    summary = {"step": state["step"], "checkpoint": store.last(), "metrics": {}, "samples": None,
               "mlflow_run_id": run.run_id}
    window = _Window(device)
    consecutive_bad = 0
    data_error = None
    net.train()
    bar = tqdm(total=cfg.steps, initial=state["step"], disable=not progress or rank != 0, unit="step",
               dynamic_ncols=True)
    t_start = time.perf_counter()
    while state["step"] < cfg.steps:
        step = state["step"]
        t0 = time.perf_counter()
        try:
            x0, labels = next(loader)
        except data.DataError as e:
            if not distributed:
                raise
            # The other ranks are about to enter this step's collectives: take part with a stand-in batch, and
            # stop together after the step (below), so that no rank waits forever and nothing is retried.
            data_error = e
            x0 = torch.zeros((local_batch, *manifest["shape"]))
            labels = torch.zeros(local_batch, dtype=torch.long) if manifest.get("num_classes") else None
        x0 = x0.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True) if labels is not None else None
        t_data = time.perf_counter() - t0

        seed = step_seed(cfg.seed, rank, step)
        torch.manual_seed(seed)  # dropout and label dropout draw from the global generator
        generator = torch.Generator(device=device).manual_seed(seed)
        # The step's t and z for the whole local batch, whatever train.grad_accum: accumulation changes how the
        # batch goes through the network, not what it is.
        t = trigflow.sample_t(x0.shape[0], config.objective.P_mean, config.objective.P_std,
                              config.objective.sigma_d, generator=generator, device=device, dtype=x0.dtype)
        z = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype) * config.objective.sigma_d
        optimizer.zero_grad(set_to_none=True)
        per_sample, stats = backward(
            objective, model, x0, labels, t, z, step=step, generator=generator, micro_batches=cfg.grad_accum,
            guidance=guidance,
            autocast=lambda: torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None))
        loss = per_sample.mean()
        # A sharded model's norm is a replicated DTensor: its local value is the whole norm.
        grad_norm = parallel.local(torch.nn.utils.clip_grad_norm_(net.parameters(),
                                                                  config.optim.grad_clip or math.inf))
        # Gradients (hence their norm) are all-reduced under DDP, the loss is not: agree on the decision, so that
        # every rank skips the same steps and stops at the same step (-1: a rank could not read its data). The flag
        # is formed on the device and read once: the step's only wait for the device (the metrics stay there until a
        # log step). Skipping needs the read: zeroing a bad step's update on the device would still move Adam's
        # moments and step count.
        if data_error is not None:
            good = torch.full((), -1.0, device=device)
        else:
            good = (torch.isfinite(grad_norm) & torch.isfinite(loss)).float()
        if distributed:
            torch.distributed.all_reduce(good, op=torch.distributed.ReduceOp.MIN)
        flag = good.item()
        if flag < 0:
            raise data.DataError(_shared_message(data_error, rank, world_size, device))
        if flag:
            lr = config.optim.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            ema.update(net, step)
            consecutive_bad = 0
            window.add(per_sample.detach(), t, stats, grad_norm, lr)
        else:
            consecutive_bad += 1
            state["bad_steps"] += 1
            log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s); step skipped", step,
                        float(loss.detach()), float(grad_norm))
            if consecutive_bad >= cfg.max_bad_steps:
                raise TrainingDiverged(
                    f"{consecutive_bad} consecutive steps (up to step {step}) had a non-finite loss or gradient, "
                    f"stopping (train.max_bad_steps={cfg.max_bad_steps}). Last good checkpoint: "
                    f"{store.last()}. Try a lower optim.lr, optim.grad_clip > 0 or train.precision=fp32.")
        window.time(time.perf_counter() - t0, t_data)
        state["step"] = step + 1
        bar.update(1)
        done = state["step"] == cfg.steps

        logged = state["step"] % cfg.log_every == 0 or done
        if logged:
            skipped = torch.tensor(float(getattr(loader, "skipped", 0)), device=device)
            if distributed:
                torch.distributed.all_reduce(skipped)  # summed over the ranks' loaders
            metrics = window.metrics(config, state, time.perf_counter() - t_start, int(skipped.item()))
            window = _Window(device)
            summary["metrics"] = metrics
            if rank == 0:
                log.info("step %d %s", state["step"], " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
                bar.set_postfix(loss=_fmt(metrics.get("loss/mean", float("nan"))))
                run.log_metrics(metrics, step=state["step"])
        if evaluator is not None and evaluator.due(state["step"], done):
            summary["metrics"] = {**summary["metrics"], **evaluator(ema.module, state["step"], run)}
        # A preemption notice (spot) is asked for at every log step (a collective) and answered with a checkpoint
        # now: this step's own when it is a checkpoint step, so that a notice costs one checkpoint, not two.
        notice = logged and store.preempted()
        if state["step"] % cfg.checkpoint_every == 0 or done or notice:
            _refuse_nonfinite(net, ema, optimizer, state["step"], store, device, distributed)
            gathered = parallel.full_state(net, optimizer) if sharded else None  # a collective: every rank
            uri = store.save(lambda: snapshot(gathered), state["step"], summary["metrics"])
            if rank == 0:
                summary["checkpoint"] = uri
                run.set_tags({"checkpoint.latest": uri, "checkpoint.latest_step": str(state["step"])})
            if evaluator is not None:
                evaluator.saved(state["step"], uri, run)
        if rank == 0 and cfg.sample_every and (state["step"] % cfg.sample_every == 0 or done):
            summary["samples"] = write_grid(config, ema.module, manifest, state["step"], device)
            run.log_image(summary["samples"], "samples", step=state["step"])
    bar.close()
    summary["step"] = state["step"]
    summary["bad_steps"] = state["bad_steps"]
    return summary


def backward(objective, model, x0, labels, t, z, *, step: int, generator, micro_batches: int = 1, guidance=None,
             autocast=contextlib.nullcontext):
    """Forward and backward of one step's local batch (x0, labels, t, z, guidance: B rows) in `micro_batches` equal
    parts (gradient accumulation, train.grad_accum). Each part back-propagates the sum of its per-sample losses over
    B, so the gradients add up to those of the whole batch's mean loss; under DDP every part but the last runs in
    `no_sync()`, so the gradients are all-reduced once. An FSDP2 model (no `no_sync`) reduce-scatters every part's:
    its gradients stay sharded, where skipping the sync would hold them whole on every rank. The forwards run under
    `autocast()`, the backwards outside it. Returns the per-sample losses (B,) and the statistics: the parts' mean,
    or their maximum for `*_max` keys."""
    B = x0.shape[0]
    size = B // micro_batches
    no_sync = getattr(model, "no_sync", None)
    per_sample, stats = [], []
    for i in range(0, B, size):
        rows = slice(i, i + size)
        last = i + size >= B
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            with autocast():
                extra = {} if guidance is None else {"guidance": guidance[rows]}
                part, part_stats = objective(model, x0[rows], None if labels is None else labels[rows], step=step,
                                             generator=generator, t=t[rows], z=z[rows], **extra)
            (part.sum() / B).backward()
        per_sample.append(part.detach())
        stats.append(part_stats)
    if len(stats) == 1:
        return per_sample[0], stats[0]
    return torch.cat(per_sample), {key: _combine([s[key] for s in stats], key.endswith("_max")) for key in stats[0]}


def _combine(values: list, maximum: bool):
    """The maximum or the mean of per-part statistics (0-dim tensors stay on their device: no sync here)."""
    if isinstance(values[0], torch.Tensor):
        stacked = torch.stack(values)
        return stacked.amax() if maximum else stacked.mean()
    return max(values) if maximum else sum(values) / len(values)


def _refuse_nonfinite(net, ema, optimizer, step: int, store, device, distributed: bool) -> None:
    """Raise TrainingDiverged, before a checkpoint is written, if the weights, the EMA or the optimizer state hold
    NaN or Inf (a weight can go non-finite while the loss stays finite: an unused parameter, an overflowing update,
    the EMA). So no checkpoint is ever written from them, `keep_checkpoints` can never prune the last finite one, and
    the one the message names is finite. Checked at checkpoint steps only (one sync), agreed over the ranks."""
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    tensors |= {f"optimizer.{i}.{k}": v for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()
                if torch.is_tensor(v)}
    tensors = {k: parallel.local(v) for k, v in tensors.items() if v.is_floating_point()}  # a rank's shards
    finite = torch.stack([torch.isfinite(v).all() for v in tensors.values()]).to(device)
    ok = finite.all().float()
    if distributed:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    if not ok.item():
        bad = [k for k, f in zip(tensors, finite.tolist()) if not f] or ["(another rank's)"]
        raise TrainingDiverged(
            f"step {step}: non-finite values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; no checkpoint "
            f"was written from them. Last good checkpoint: {store.last()}. Try a lower optim.lr, optim.grad_clip > 0 "
            f"or train.precision=fp32.")


def _shared_message(error: Exception | None, rank: int, world_size: int, device: torch.device) -> str:
    """Every rank gets the message of the lowest rank that failed (a collective: all ranks call it)."""
    failed = torch.tensor(rank if error is not None else world_size, device=device)
    torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MIN)
    message = [f"rank {rank}: {error}" if error is not None else None]
    torch.distributed.broadcast_object_list(message, src=int(failed))
    return message[0]


def write_grid(config: Config, net: torch.nn.Module, manifest: dict, step: int, device: torch.device) -> str:
    """Sample from the EMA weights with noise fixed by train.seed (grids comparable across steps); data space PNG."""
    n = GRID_IMAGES if manifest["kind"] == "image" else GRID_VECTORS
    generator = torch.Generator(device=device).manual_seed(config.train.seed)
    noise = torch.randn((n, *manifest["shape"]), generator=generator, device=device)
    labels = class_labels(n, int(manifest.get("num_classes", 0)), device)
    was_training = net.training
    net.eval()
    samples = sample_data(net, config, manifest, noise, steps=config.train.sample_steps, class_labels=labels,
                          generator=generator).cpu().numpy()
    net.train(was_training)
    os.makedirs(os.path.join(config.run.dir, "samples"), exist_ok=True)
    path = os.path.join(config.run.dir, "samples", f"step-{step:09d}.png")
    save_grid(samples, path, manifest["kind"])
    log.info("samples %s", path)
    return path


class _Window:
    """Running sums of the metrics between two log lines, kept on the device until `metrics` reads them."""

    def __init__(self, device: torch.device):
        self.n = 0
        self.sums: dict[str, torch.Tensor | float] = {}
        self.bin_sum = torch.zeros(T_BINS, dtype=torch.float64, device=device)
        self.bin_count = torch.zeros(T_BINS, dtype=torch.float64, device=device)
        self.step_s = self.data_s = 0.0
        self.steps_timed = 0
        self.lr = float("nan")

    def add(self, per_sample: torch.Tensor, t: torch.Tensor, stats: dict, grad_norm: torch.Tensor, lr: float):
        self.n += 1
        values = {"loss/mean": per_sample.float().mean(), "optim/grad_norm": grad_norm, **stats}
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + (v.detach().double() if isinstance(v, torch.Tensor) else v)
        bins = (t.float() / (math.pi / 2) * T_BINS).long().clamp(0, T_BINS - 1)
        self.bin_sum.index_add_(0, bins, per_sample.detach().double())
        self.bin_count.index_add_(0, bins, torch.ones_like(bins, dtype=torch.float64))
        self.lr = lr

    def time(self, step_s: float, data_s: float):
        self.steps_timed += 1
        self.step_s += step_s
        self.data_s += data_s

    def metrics(self, config: Config, state: dict, elapsed: float, skipped_samples: int) -> dict:
        m = {k: float(v) / self.n for k, v in self.sums.items()} if self.n else {}
        bin_sum, bin_count = self.bin_sum.cpu(), self.bin_count.cpu()
        for i in range(T_BINS):
            if bin_count[i] > 0:
                m[f"loss/bin{i}"] = float(bin_sum[i] / bin_count[i])
        per_step = self.step_s / max(self.steps_timed, 1)
        m.update({
            "optim/lr": self.lr,
            "time/step_s": per_step,
            "time/data_s": self.data_s / max(self.steps_timed, 1),
            "time/data_fraction": self.data_s / self.step_s if self.step_s > 0 else 0.0,
            "time/samples_per_s": config.train.batch_size / per_step if per_step > 0 else 0.0,
            "time/elapsed_s": elapsed,
            "data/samples_seen": float(state["step"] * config.train.batch_size),
            "data/skipped_samples": float(skipped_samples),
            "train/step": float(state["step"]),
            "train/skipped_steps": float(state["bad_steps"]),
        })
        return m


def _fmt(v: float) -> str:
    return f"{v:.4g}"
