"""Scaling sweeps and studies (`scmlab sweep`, jobs/sweep.py): a Ray Tune grid over model.size x optim.lr (x seeds
x any config key, `sweep.grid`, x named settings, `sweep.variants`), each trial a Ray Train run of the training
loop, one MLflow child run per trial under the sweep's parent run, and the analysis in the parent. A staged study
(`sweep.stages`) runs a diffusion teacher grid, then sCD and sCT students from each size's best teacher.

A sweep config is a training config (the base of every trial) plus a `sweep` section (`SweepConfig`). Everything
is parsed and checked before Ray or MLflow is touched: the grid (every axis value against its field), the presets,
each stage's metric against its objective, the dataset.

The Train V2 pattern (DESIGN.md section 7): the Tune trial is a function (`_trial`) that builds a TorchTrainer and
calls fit(), with `TuneReportCallback` in the Train RunConfig; it is the driver of its Train run, so it takes no
CPU of its own (its workers do). Names are deterministic: trial `tiny-lr0.001-seed0` (`scd-tiny-lr0.0001-seed0` in
a study) trains in `run.dir/trials/tiny-lr0.001-seed0` (its Ray Train run: storage `{run.storage or run.dir's
parent}/{run.name}/trials`) and logs to the MLflow child tagged with that location.

Stages run one after the other (one Tune grid each): a student's teacher is chosen once every teacher trial of its
size is recorded, and on a machine that trains 1-2 trials at a time the students gain little from starting earlier.

Resume: the driver records every finished trial in `run.dir/results.csv` (rewritten whole, atomically) as it
completes: `ok`, `failed` (diverged, or data or config its workers cannot use: not retried, the same steps would
fail again) or `crashed` (the infrastructure failed it: its workers exhausted train.max_failures, its Tune trial
died after Tune's own retries). A driver restarted with the same config (or a larger grid, or more stages) launches the trials not
recorded there and the crashed ones; a trial that was cut short (the driver killed) or crashed resumes its Train
run from its last checkpoint and continues its MLflow child run. One driver per sweep at a time (scmlab.train.lock).

Layout of run.dir (with local storage): the Tune experiment (trial directories, experiment state), trials/ (the
Train runs), results.csv, fit.json, loss_vs_compute.png, best_lr.png, fit_params.png, fit_flops.png (the law of the
first stage's training metric), and the study (scmlab.tune.report): report.md, study.json, study_params.png,
study_flops.png, ratios.csv (teacher and students), settings.csv (seeds, grid axes, variants).
"""

import dataclasses
import itertools
import json
import logging
import math
import os
import re
import typing
from dataclasses import dataclass, field

from ..config import Config, ConfigError, _check, _coerce, _one_of, _reject_unknown, apply_overrides
from ..tracking import MLflowTracker, ensure_experiment

log = logging.getLogger(__name__)

SCHEDULERS = ("fifo", "asha")
SWEEP_TAG = "scmlab.sweep"
TRIAL_TAG = "scmlab.trial"
STAGE_TAG, SIZE_TAG, SETTING_TAG, TEACHER_TAG = "scmlab.stage", "scmlab.size", "scmlab.setting", "scmlab.teacher"
RESULTS, FIT = "results.csv", "fit.json"
ASHA_METRIC = "loss/mean"  # what scmlab.train.distributed.RayCheckpoints reports to Train (and so to Tune)
EVAL_FIT = ("fid", "fd", "energy", "swd")  # eval keys a law can be fitted to: positive, lower is better


class SweepFailed(RuntimeError):
    """No trial of the sweep finished; the message gives their reasons."""


STAGE_KINDS = {"teacher": "diffusion", "scd": "scd", "sct": "sct"}  # sweep.stages, in the order they run
SHORTCUTS = {"model.size": "sizes", "optim.lr": "lrs", "train.seed": "seeds"}  # grid axes with a field of their own
MANAGED = ("run.", "tracking.")  # set by the sweep for every trial: not grid axes


@dataclass
class StageConfig:
    lrs: list[float] = field(default_factory=list)
    """optim.lr values of this stage (empty = sweep.lrs)."""
    metric: str = ""
    """The eval score that picks each size's best trial of this stage (empty = sweep.metric); the teacher stage's
    picks the teacher that the students start from."""
    overrides: dict = field(default_factory=dict)
    """`section.key: value` settings of this stage's trials over the base config (e.g. train.steps: 400,
    objective.warmup_steps: 100). objective.kind and objective.teacher are set by the stage; eval.steps is empty
    (the kind's default samplers) unless set here."""


@dataclass
class SweepConfig:
    sizes: list[str] = field(default_factory=list)
    """model.size presets to sweep (of the base's model.arch). A law with an irreducible term has 3 parameters:
    sweep at least 4 sizes for a fit with standard errors (with 3 it is exact; with fewer it is skipped, saying
    why)."""
    lrs: list[float] = field(default_factory=list)
    """optim.lr values to sweep at every size (the best per size enters the fit)."""
    seeds: list[int] = field(default_factory=list)
    """train.seed values (repeats of every grid point); empty = the base's train.seed only."""
    grid: dict = field(default_factory=dict)
    """More grid axes: any `section.key` of the training config with a list of values, e.g.
    {objective.tangent_norm: [l2, none], model.time_embedding: [positional, fourier_logsigma]}: every
    combination runs at every size x lr x seed, and the analysis reports each setting with its spread over seeds.
    model.size, optim.lr and train.seed given here are sizes, lrs and seeds. Each value is checked against its field
    before Ray starts."""
    variants: dict = field(default_factory=dict)
    """Named settings, one more axis whose points change several keys or none: {base: {}, no_warmup:
    {objective.warmup_steps: 0}, ...} (an ablation: each change alone against the first variant, the reference of
    the report's comparisons). Names are trial name suffixes (`tiny-lr0.001-seed0-no_warmup`)."""
    stages: dict = field(default_factory=dict)
    """A staged study (empty = one stage: the base config as it is): {teacher: {...}, scd: {...}, sct: {...}}, each
    a StageConfig (lrs, metric, overrides). `teacher` trains TrigFlow diffusion over the grid; then for each size
    its best teacher (lowest final `metric`) gives its final EMA weights to the `scd` (frozen teacher, student
    initialized from them) and `sct` (initialized from them) trials of that size."""
    metric: str = "loss/mse"
    """The logged metric whose final value the law is fitted to. It must be positive: `loss/mse` (the unweighted
    diffusion loss), `loss/mean` with objective.adaptive_weight=false (the adaptive-weighted loss can be
    negative), or an eval score `eval/<fid|fd|energy|swd>/<sampler>` (needs eval.every > 0)."""
    scheduler: str = "fifo"
    """`fifo`: every trial to train.steps (the scaling grid); `asha`: stop poor learning rates early, for
    learning-rate pre-sweeps only (stopping small models early biases a scaling fit). ASHA ranks trials by the
    training loss `loss/mean` that the Train run reports at its checkpoint steps (train.checkpoint_every sets how
    often it can decide); the table still records sweep.metric."""
    grace_steps: int = 0
    """ASHA: steps every trial trains before it can be stopped (0 = train.steps / 4)."""
    max_concurrent_trials: int = 0
    """Trials training at once; 0 = as many as the cluster's GPUs (or CPUs) hold train.workers x
    train.cpus_per_worker for."""

    def __post_init__(self):
        for key, name in SHORTCUTS.items():  # model.size: [...] in the grid is sizes: [...]
            if key in self.grid:
                _check(not getattr(self, name), f"sweep.grid.{key}: give it once, as sweep.grid.{key} or "
                                                f"sweep.{name}")
                setattr(self, name, self.grid.pop(key))
        for name, stage in self.stages.items():
            _one_of("sweep.stages", name, tuple(STAGE_KINDS))
            stage.lrs = stage.lrs or list(self.lrs)
            _check(len(stage.lrs) > 0, f"sweep.stages.{name}.lrs is required (or sweep.lrs), e.g. [1e-3,3e-3]")
            _check(all(lr > 0 for lr in stage.lrs), f"sweep.stages.{name}.lrs: every learning rate must be > 0, "
                                                    f"got {stage.lrs}")
            stage.metric = stage.metric or self.metric
        self.stages = {name: self.stages[name] for name in STAGE_KINDS if name in self.stages}  # the order they run
        _check(not self.stages or "teacher" in self.stages,
               f"sweep.stages: {', '.join(self.stages)} start from each size's best teacher; add sweep.stages.teacher")
        for name in ("sizes",) if self.stages else ("sizes", "lrs"):  # a stage may have lrs of its own
            _check(len(getattr(self, name)) > 0, f"sweep.{name} is required: a list, e.g. "
                                                 "sweep.sizes=[tiny,small,base] sweep.lrs=[1e-3,3e-3]")
        for name in ("sizes", "lrs", "seeds"):
            values = getattr(self, name)
            _check(len(set(map(repr, values))) == len(values), f"sweep.{name}: {values} has repeated values")
        for key, values in self.grid.items():
            _check(isinstance(values, list) and len(values) > 0,
                   f"sweep.grid.{key}: expected a non-empty list of values, got {values!r}")
            _check(len(set(map(repr, values))) == len(values), f"sweep.grid.{key}: {values} has repeated values")
        _check(all(lr > 0 for lr in self.lrs), f"sweep.lrs: every learning rate must be > 0, got {self.lrs}")
        _check(all(s >= 0 for s in self.seeds), f"sweep.seeds: seeds must be >= 0, got {self.seeds}")
        _check(bool(self.metric), "sweep.metric: must not be empty (e.g. loss/mse)")
        _one_of("sweep.scheduler", self.scheduler, SCHEDULERS)
        _check(self.grace_steps >= 0, f"sweep.grace_steps: must be >= 0, got {self.grace_steps}")
        _check(self.max_concurrent_trials >= 0,
               f"sweep.max_concurrent_trials: must be >= 0 (0 = from the cluster's resources), got "
               f"{self.max_concurrent_trials}")

    @classmethod
    def from_dict(cls, d: dict) -> "SweepConfig":
        _check(isinstance(d, dict), f"sweep: expected a mapping of keys (sizes, lrs, ...), got {d!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        _reject_unknown(d, fields, "sweep.")
        hints = typing.get_type_hints(cls)
        d = dict(d)
        grid = _settings("sweep.grid", d.pop("grid", None) or {}, as_lists=True)
        variants = d.pop("variants", None) or {}
        _check(isinstance(variants, dict), f"sweep.variants: expected a mapping {{name: {{section.key: value}}}}, "
                                           f"got {variants!r}")
        for name in variants:
            _check(bool(re.fullmatch(r"[A-Za-z0-9_.+-]+", str(name))),
                   f"sweep.variants.{name}: a variant's name is part of trial names: letters, digits, _ . + -")
        variants = {str(name): _settings(f"sweep.variants.{name}", v or {}) for name, v in variants.items()}
        stages = d.pop("stages", None) or {}
        _check(isinstance(stages, dict), f"sweep.stages: expected a mapping {{teacher: {{lrs: [...]}}, scd: ...}}, "
                                         f"got {stages!r}")
        staged = {}
        for name, s in stages.items():
            s = dict(s or {})
            _check(isinstance(s, dict), f"sweep.stages.{name}: expected a mapping (lrs, metric, overrides)")
            _reject_unknown(s, {f.name for f in dataclasses.fields(StageConfig)}, f"sweep.stages.{name}.")
            staged[name] = StageConfig(
                lrs=_coerce(f"sweep.stages.{name}.lrs", s.get("lrs") or [], list[float]),
                metric=_coerce(f"sweep.stages.{name}.metric", s.get("metric") or "", str),
                overrides=_settings(f"sweep.stages.{name}.overrides", s.get("overrides") or {}))
        return cls(grid=grid, variants=variants, stages=staged,
                   **{k: _coerce(f"sweep.{k}", v, hints[k]) for k, v in d.items()})

    def check(self, base: Config) -> None:
        """What the sweep needs of the base config (errors name the field to change), and every grid value and
        stage override applied alone to the base config (errors name the key and the value)."""
        from ..nets import PRESETS

        presets = PRESETS[base.model.arch]
        unknown = [s for s in self.sizes if s not in presets]
        _check(not unknown, f"sweep.sizes: {unknown} are not {base.model.arch} presets; choose from "
                            f"{', '.join(presets)}")
        _check(base.train.workers >= 1, "train.workers: a sweep trial is a Ray Train run; set train.workers >= 1")
        _check(base.tracking.kind == "mlflow",
               "tracking.uri: a sweep logs its trials and its fit to MLflow; set tracking.uri (or MLFLOW_TRACKING_URI; "
               "`scmlab services up` prints it; a sqlite:///path URI needs no server)")
        varied = [*self.grid, *(k for v in self.variants.values() for k in v),
                  *(k for s in self.stages.values() for k in s.overrides)]
        for key in ("objective.kind", "objective.teacher"):
            _check(not self.stages or key not in varied, f"sweep.stages: {key} is set by each stage; it cannot be a "
                                                         "grid axis, a variant's or a stage's override")
        for stage in self.stages or [""]:
            stage_base = self.stage_base(base, stage)
            metric = self.stages[stage].metric if stage else self.metric
            _check_metric(f"sweep.stages.{stage}.metric" if stage else "sweep.metric", metric, stage_base)
            for key, values in self.grid.items():
                for value in values:
                    try:
                        _apply(stage_base, {key: value})
                    except ConfigError as e:
                        raise ConfigError(f"sweep.grid.{key}: the value {value!r} is refused: {e}") from None
            for name, values in self.variants.items():
                try:
                    _apply(stage_base, values)
                except ConfigError as e:
                    raise ConfigError(f"sweep.variants.{name}: refused: {e}") from None

    def stage_base(self, base: Config, stage: str, teacher: str = "") -> Config:
        """The base config of a stage's trials: objective.kind of the stage, objective.teacher (a student's: the
        checkpoint of its size's best teacher; before that is known, a stand-in), eval.steps emptied (the kind's
        default samplers), then the stage's overrides."""
        if not stage:
            return base
        values = {"objective.kind": STAGE_KINDS[stage], "eval.steps": [],
                  "objective.teacher": None if stage == "teacher" else teacher or "(the best teacher of the size)"}
        if values["objective.kind"] == "diffusion" and base.eval.best:
            values["eval.best"] = ""  # a student's eval.best names a consistency sampler
        try:
            return _apply(base, {**values, **self.stages[stage].overrides})
        except ConfigError as e:
            raise ConfigError(f"sweep.stages.{stage}: {e}") from None

    def trials(self, base: Config) -> list["Trial"]:
        """Every grid point of every stage, in the order they run (stage, size, lr, seed, the other axes)."""
        seeds = self.seeds or [base.train.seed]
        axes = [[(key, v) for v in values] for key, values in self.grid.items()]
        lrs = {name: stage.lrs for name, stage in self.stages.items()} if self.stages else {"": self.lrs}
        variants = list(self.variants.items()) or [("", {})]
        trials = [Trial(size, lr, seed, tuple(settings), stage, variant, tuple(values.items()))
                  for stage in [*STAGE_KINDS, ""] if stage in lrs
                  for size, lr, seed, *settings, (variant, values) in itertools.product(
                      self.sizes, lrs[stage], seeds, *axes, variants)]
        names = [t.name for t in trials]
        repeated = sorted({n for n in names if names.count(n) > 1})
        _check(not repeated, f"sweep.grid: values that differ only in characters a trial name cannot hold give "
                             f"repeated trial names {repeated[:3]}")
        return trials


def _settings(name: str, d, as_lists: bool = False) -> dict:
    """`section.key: value` entries (values lists of values with as_lists), each key a field of the training config
    and each value of its field's type; run.* and tracking.* are the sweep's own."""
    from ..config import SECTIONS

    _check(isinstance(d, dict), f"{name}: expected a mapping of section.key: {'[values]' if as_lists else 'value'}, "
                                f"got {d!r}")
    out = {}
    for key, values in d.items():
        section, dot, fname = str(key).partition(".")
        _check(bool(dot), f"{name}.{key}: expected section.key, e.g. objective.tangent_norm")
        _reject_unknown({section: None}, SECTIONS, f"{name}.")
        hints = typing.get_type_hints(SECTIONS[section])
        _reject_unknown({fname: None}, hints, f"{name}.{section}.")
        _check(not key.startswith(MANAGED), f"{name}.{key}: run.* and tracking.* are set by the sweep for every "
                                            "trial; they cannot vary")
        if as_lists:
            _check(isinstance(values, list) and values, f"{name}.{key}: expected a non-empty list of values, got "
                                                        f"{values!r}")
            out[key] = [_coerce(f"{name}.{key}[{i}]", v, hints[fname]) for i, v in enumerate(values)]
        else:
            out[key] = _coerce(f"{name}.{key}", values, hints[fname])
    return out


def _apply(config: Config, values: dict) -> Config:
    """`config` with `section.key: value` settings, validated."""
    d = config.to_dict()
    for key, value in values.items():
        section, _, name = key.partition(".")
        d[section][name] = value
    return Config.from_dict(d)


def _check_metric(name: str, metric: str, base: Config) -> None:
    """The metric a sweep (or a stage) picks and fits by: positive, logged for this objective."""
    if metric == "loss/mean":
        _check(not base.objective.adaptive_weight,
               f"{name}: loss/mean is the adaptive-weighted loss, which can be negative; set "
               "objective.adaptive_weight=false, or sweep.metric=loss/mse with objective.kind=diffusion")
    elif metric == "loss/mse":
        _check(base.objective.kind == "diffusion",
               f"{name}: loss/mse is logged by objective.kind=diffusion only, not {base.objective.kind}; "
               "use sweep.metric=loss/mean with objective.adaptive_weight=false")
    elif metric.startswith("eval/"):
        parts = metric.split("/")
        _check(len(parts) == 3 and parts[1] in EVAL_FIT,
               f"{name}: {metric!r} is not a positive eval score of which lower is better: "
               f"eval/<{'|'.join(EVAL_FIT)}>/<sampler>, e.g. eval/fd/2step (kid, an unbiased estimate, can be "
               "negative)")
        _check(base.eval.every > 0, f"{name}: {metric} is logged by evaluations; set eval.every > 0 "
                                    f"(e.g. eval.every={base.train.steps}: once, at the end)")
        samplers = base.eval_samplers()
        _check(parts[2] in samplers, f"{name}: {metric} names sampler {parts[2]!r}, but eval.steps "
                                     f"scores {', '.join(samplers)} for objective.kind={base.objective.kind}")
        _check(not base.eval.metrics or parts[1] in base.eval.metrics,
               f"{name}: {metric} is not logged: eval.metrics is {base.eval.metrics}; add {parts[1]}")
    else:
        _check(metric.startswith("loss/bin"),
               f"{name}: {metric!r} is not a positive training metric; use loss/mse (diffusion), "
               "loss/mean (with objective.adaptive_weight=false) or an eval score (eval/fd/2step)")


def _format(value) -> str:
    """A grid value as it appears in a trial name: no '/', no spaces."""
    text = f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else \
        ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return re.sub(r"[^A-Za-z0-9._,+-]", "_", text)


@dataclass(frozen=True)
class Trial:
    size: str
    lr: float
    seed: int
    settings: tuple = ()
    """(section.key, value) of the sweep.grid axes at this grid point."""
    stage: str = ""
    """`teacher`, `scd`, `sct`, or empty for an unstaged sweep."""
    variant: str = ""
    """The sweep.variants name at this grid point (empty without variants)."""
    variant_settings: tuple = ()
    """Its (section.key, value) settings."""

    @property
    def name(self) -> str:
        """Deterministic, so that a restarted sweep finds the trial's Train run, MLflow run and record again:
        [stage-]size-lrLR-seedS[-key=value...] (key: the field's name, its section too where two axes share it)."""
        short = [key.partition(".")[2] for key, _ in self.settings]
        keys = [s if short.count(s) == 1 else key.replace(".", "_") for s, (key, _) in zip(short, self.settings)]
        return (f"{self.stage}-" if self.stage else "") + f"{self.size}-lr{self.lr:g}-seed{self.seed}" + "".join(
            f"-{k}={_format(v)}" for k, (_, v) in zip(keys, self.settings)) + (f"-{self.variant}" if self.variant
                                                                               else "")

    @property
    def setting(self) -> str:
        """The grid axes' values and the variant as one label (`objective.tangent_norm=none no_warmup`), empty
        without sweep.grid and sweep.variants."""
        return " ".join([f"{key}={_format(v)}" for key, v in self.settings] + [self.variant] * bool(self.variant))


def load_sweep(path: str, overrides: list[str] = ()) -> tuple[Config, SweepConfig]:
    """Read a sweep config (a training config plus a `sweep` section), apply `section.key=value` overrides
    (`sweep.lrs=[1e-4,3e-4]` too) and validate it all, before any Ray or MLflow resource is requested."""
    import yaml

    with open(path) as f:
        d = yaml.safe_load(f) or {}
    _check(isinstance(d, dict), f"{path}: expected a mapping of sections (data, model, ..., sweep)")
    sweep_d = dict(d.pop("sweep", None) or {})
    _check(bool(sweep_d), f"{path}: the `sweep` section is missing (sweep.sizes, sweep.lrs, ...); a plain training "
                          "config runs with `scmlab train`")
    rest = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if key.strip().startswith("sweep."):
            _check(bool(sep), f"override {item!r}: expected sweep.key=value")
            _set_nested(sweep_d, key.strip().removeprefix("sweep."), yaml.safe_load(raw) if raw.strip() else None)
        else:
            rest.append(item)
    base = Config.from_dict(apply_overrides(d, rest))
    sweep = SweepConfig.from_dict(sweep_d)
    sweep.check(base)
    return base, sweep


def _set_nested(sweep_d: dict, key: str, value) -> None:
    """An override of the sweep section: `lrs`, `grid.objective.tangent_norm` (the axis key keeps its dot),
    `stages.scd.lrs`, `stages.scd.overrides.train.steps`."""
    head, _, rest = key.partition(".")
    if head == "grid" and rest:
        sweep_d["grid"] = {**(sweep_d.get("grid") or {}), rest: value}
    elif head == "stages" and rest:
        name, _, field_name = rest.partition(".")
        stages = sweep_d["stages"] = dict(sweep_d.get("stages") or {})
        stage = stages[name] = dict(stages.get(name) or {})
        if field_name.startswith("overrides."):
            stage["overrides"] = {**(stage.get("overrides") or {}), field_name.removeprefix("overrides."): value}
        elif field_name:
            stage[field_name] = value
        else:
            stages[name] = value
    else:
        sweep_d[key] = value


def trial_config(base: Config, trial: Trial) -> Config:
    """The base config (a stage's: SweepConfig.stage_base) at one grid point: its size, lr, seed and other axes,
    its run directory and Train run under the sweep's."""
    from ..train import distributed

    sweep_uri = distributed.location(base)[2]
    d = base.to_dict()
    d["model"]["size"], d["optim"]["lr"], d["train"]["seed"] = trial.size, trial.lr, trial.seed
    for key, value in (*trial.settings, *trial.variant_settings):
        section, _, name = key.partition(".")
        d[section][name] = value
    d["run"] |= {"dir": os.path.join(os.path.abspath(base.run.dir), "trials", trial.name), "name": trial.name,
                 "storage": f"{sweep_uri}/trials"}
    return Config.from_dict(d)


def compute(config: Config, manifest: dict) -> dict:
    """Compute accounting of a trial (scmlab.tune.flops): parameters, training FLOPs per sample and per step (the
    global batch), and in total for train.steps."""
    from . import flops

    shape, num_classes = tuple(manifest["shape"]), int(manifest.get("num_classes", 0))
    guided = config.objective.guidance_scale != 1.0 or config.objective.guidance_max > 1  # 2 teacher forwards
    per_sample = flops.train_flops_per_sample(config.model, config.objective.kind, shape, num_classes,
                                              cfg_guidance=guided, jvp=config.objective.jvp)
    per_step = per_sample * config.train.batch_size
    return {"params": flops.parameter_count(config.model, shape, num_classes), "flops_per_sample": per_sample,
            "flops_per_step": per_step, "total_flops": per_step * config.train.steps}


def run(base: Config, sweep: SweepConfig) -> dict:
    """Run the sweep to the end (resuming a recorded one), stage after stage, and analyse it. Returns {"trials":
    names trained now, "reused": names found recorded, "results": path of the table, "fit": the fit summary (see
    `analyse`), "study": the study's analysis (scmlab.tune.report), "mlflow_run_id" and "mlflow_url": the parent run
    (the URL None without a tracking server)}."""
    from ..eval.training import metrics as eval_metrics
    from ..eval.training import prepare as prepare_eval
    from ..train import distributed, lock
    from ..train.loop import check_inputs

    base = base.with_absolute_paths()  # the same meaning in every trial and on every worker as here
    manifest = check_inputs(base)
    stages = {stage: sweep.stage_base(base, stage) for stage in sweep.stages or [""]}
    metrics = {stage: sweep.stages[stage].metric if stage else sweep.metric for stage in stages}
    for stage, config in stages.items():
        metric = metrics[stage]
        if metric.startswith("eval/") and metric.split("/")[1] not in eval_metrics(config, manifest):
            raise ConfigError(f"{f'sweep.stages.{stage}.metric' if stage else 'sweep.metric'}: {metric} is not "
                              f"logged: eval.metrics resolves to {eval_metrics(config, manifest)} for this data; set "
                              "eval.metrics")
        prepare_eval(config)  # the classifier and reference statistics, once, before the trials read them
    distributed.connect()  # only now: the checks above fail before Ray is touched
    base = distributed.placed(base)  # train.device decided here, for every trial
    stages = {stage: sweep.stage_base(base, stage) for stage in stages}  # again, on the placed base
    grid = sweep.trials(base)
    configs = {t.name: trial_config(stages[t.stage], t) for t in grid}  # students: a stand-in teacher until chosen
    accounting = {t.name: compute(configs[t.name], manifest) for t in grid}
    for t in grid:
        if t.name == next(u.name for u in grid if (u.stage, u.size) == (t.stage, t.size)):
            c = accounting[t.name]
            log.info("%s%s: %.3gM parameters, %.3g training FLOPs per step, %.3g per trial",
                     f"{t.stage} " if t.stage else "", t.size, c["params"] / 1e6, c["flops_per_step"],
                     c["total_flops"])
    with lock.held(base):  # one driver per sweep
        return _run(base, sweep, stages, metrics, grid, configs, accounting)


def _run(base: Config, sweep: SweepConfig, stages: dict, metrics: dict, grid: list["Trial"], configs: dict,
         accounting: dict) -> dict:
    from mlflow import MlflowClient

    from ..train import distributed
    from . import report
    from .scaling import read_results, write_results

    out_dir = os.path.abspath(base.run.dir)
    os.makedirs(out_dir, exist_ok=True)
    results_path = os.path.join(out_dir, RESULTS)
    recorded = {row.trial: row for row in read_results(results_path)} if os.path.exists(results_path) else {}
    crashed = [t.name for t in grid if t.name in recorded and recorded[t.name].status == "crashed"]
    for name in crashed:
        log.info("trial %s crashed last time (%s): retrying it", name, recorded.pop(name).reason)
    reused = [t.name for t in grid if t.name in recorded]
    if reused:
        log.info("%d trial(s) already recorded in %s, not rerun: %s", len(reused), results_path, ", ".join(reused))

    uri = base.tracking.uri
    experiment_id = ensure_experiment(uri, base.tracking.experiment)
    sweep_key = distributed.location(base)[2]
    parent_id = _find_or_create(uri, experiment_id, SWEEP_TAG, sweep_key, base.run.name)
    parent = MLflowTracker(uri, run_id=parent_id, flush_timeout=base.tracking.flush_timeout)
    trained = []
    with parent:
        parent.log_params({"sweep": dataclasses.asdict(sweep), **base.to_dict()})
        parent.log_params({"compute": {f"{t.stage}_{t.size}" if t.stage else t.size: accounting[t.name]
                                       for t in grid}})
        children = {t.name: _find_or_create(uri, experiment_id, TRIAL_TAG, distributed.location(configs[t.name])[2],
                                            t.name, parent_id=parent_id,
                                            tags={STAGE_TAG: t.stage or base.objective.kind, SIZE_TAG: t.size,
                                                  SETTING_TAG: t.setting}) for t in grid}
        teachers = {}
        for stage, stage_base in stages.items():
            trials = [t for t in grid if t.stage == stage]
            if stage in ("scd", "sct"):  # each size's best teacher, once its teacher trials are all recorded
                teachers = teachers or _teachers(sweep, grid, recorded, configs)
                for t in trials:
                    if t.size in teachers:
                        teacher = teachers[t.size]
                        configs[t.name] = trial_config(sweep.stage_base(base, stage, teacher["checkpoint"]), t)
                        if t.name not in recorded:
                            client = MlflowClient(uri)
                            client.set_tag(children[t.name], TEACHER_TAG, teacher["trial"])
                            client.set_tag(children[t.name], "scmlab.teacher_checkpoint", teacher["checkpoint"])
                trials = [t for t in trials if t.size in teachers]
            todo = [t for t in trials if t.name not in recorded]
            if todo:
                log.info("stage %s: %d trial(s)", stage or base.objective.kind, len(todo))
                specs = [_spec(t, configs[t.name], metrics[stage], accounting[t.name], uri, experiment_id,
                               children[t.name]) for t in todo]
                _tune(stage_base, sweep, specs, recorded, results_path)
                trained += [t.name for t in todo]
        rows = [recorded[t.name] for t in grid if t.name in recorded]
        settled = {size for size in sweep.sizes if all(t.name in recorded for t in grid
                                                       if t.stage == "teacher" and t.size == size)}
        orphans = [t.name for t in grid if t.stage in ("scd", "sct") and t.size in settled and t.size not in teachers]
        if orphans:
            log.warning("no finished teacher for %s: left out of the study", ", ".join(orphans))
        missing = [t.name for t in grid if t.name not in recorded and t.name not in orphans]
        if missing:
            raise RuntimeError(f"trials {missing} did not finish (see the Tune output above; a student trains once "
                               "its size has a finished teacher); rerun the same command to resume them")
        first = next(iter(stages))  # the law of the teacher stage (or of the unstaged grid) as before stages
        names = {t.name for t in grid if t.stage == first}
        fit = analyse([r for r in rows if r.trial in names], _curves(uri, [t for t in grid if t.name in names],
                                                                     children, metrics[first], accounting),
                      out_dir, metrics[first])
        write_results(rows, results_path)  # every stage's rows (analyse wrote the first stage's)
        study = report.analyse(rows, grid, _finals(uri, grid, children), metrics, out_dir, base.objective.kind)
        for name in (RESULTS, FIT, *fit["plots"], *study["files"]):
            parent.log_artifact(os.path.join(out_dir, name))
        parent.log_metrics({f"fit/{against}/{k}": v for against, s in fit["fits"].items() if "error" not in s
                            for k, v in s.items() if isinstance(v, (int, float)) and math.isfinite(v)}, step=0)
        parent.log_metrics(study["metrics"], step=0)
        parent.set_tags({"scmlab.fit": json.dumps({a: s.get("error", "ok") for a, s in fit["fits"].items()})[:5000]})
        if all(row.status != "ok" for row in rows):  # the parent run ends FAILED (the tracker's __exit__)
            raise SweepFailed(f"every trial of the sweep failed ({results_path}): " + "; ".join(
                f"{row.trial}: {row.reason}" for row in rows[:3]) + (" ..." if len(rows) > 3 else ""))
        if crashed := [row.trial for row in rows if row.status == "crashed"]:
            log.warning("trial(s) %s crashed (see results.csv and the Tune output); the fit leaves them out. Rerun "
                        "the same command to retry them from their last checkpoints", ", ".join(crashed))
    url = f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{parent_id}" if uri.startswith("http") else None
    return {"trials": trained, "reused": reused, "results": results_path, "fit": fit, "study": study,
            "mlflow_run_id": parent_id, "mlflow_url": url}


def _teachers(sweep: SweepConfig, grid: list[Trial], recorded: dict, configs: dict) -> dict:
    """{size: {"trial", "checkpoint", "value"}}: each size's finished teacher trial with the lowest final
    sweep.stages.teacher.metric, once every teacher trial of that size is recorded, and its last checkpoint (the
    final EMA weights; the step-N directory of its Ray Train run). Sizes without one are named in the log."""
    from ..train import distributed
    from .scaling import best_per_size

    teachers = {}
    for size in sweep.sizes:
        trials = [t for t in grid if t.stage == "teacher" and t.size == size]
        if any(t.name not in recorded for t in trials):
            log.warning("size %s: %d teacher trial(s) not recorded yet: its students wait for the next run", size,
                        sum(t.name not in recorded for t in trials))
            continue
        best = best_per_size([recorded[t.name] for t in trials]).get(size)
        if best is None:
            log.warning("size %s: no teacher trial finished with a finite %s: no students of this size", size,
                        sweep.stages["teacher"].metric)
            continue
        config = configs[best.trial]
        teachers[size] = {"trial": best.trial, "value": best.final_loss,
                          "checkpoint": f"{distributed.location(config)[2]}/step-{config.train.steps:09d}"}
        log.info("size %s: teacher %s (%s = %.4g) -> %s", size, best.trial, sweep.stages["teacher"].metric,
                 best.final_loss, teachers[size]["checkpoint"])
    return teachers


def _finals(uri: str, grid: list[Trial], children: dict) -> dict:
    """{trial name: {eval key: its value at the last logged step}} of every trial's eval scores (floors and
    bookkeeping left out)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return {t.name: {k: v for k, v in client.get_run(children[t.name]).data.metrics.items()
                     if k.startswith("eval/") and not k.endswith("/floor")} for t in grid}


def _find_or_create(uri: str, experiment_id: str, tag: str, key: str, name: str, parent_id: str | None = None,
                    tags: dict | None = None) -> str:
    """The MLflow run tagged `tag`=`key` (a restarted sweep continues it), else a new one (under `parent_id`). Only
    the driver creates runs: concurrent creation races on the server's sqlite store."""
    from mlflow import MlflowClient

    found = MlflowClient(uri).search_runs([experiment_id], filter_string=f"tags.`{tag}` = '{key}'",
                                         order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        return found[0].info.run_id
    tracker = MLflowTracker(uri, experiment_id=experiment_id, run_name=name, parent_run_id=parent_id,
                            tags={tag: key, **(tags or {})})
    return tracker.run_id


def _spec(trial: Trial, config: Config, metric: str, accounting: dict, uri: str, experiment_id: str,
          run_id: str) -> dict:
    """What a Tune trial receives: plain values only."""
    return {"name": trial.name, "metric": metric, "size": trial.size, "lr": trial.lr, "seed": trial.seed,
            "config": config.to_dict(),
            "compute": accounting, "target": {"uri": uri, "experiment_id": experiment_id, "run_id": run_id,
                                              "system_metrics": config.tracking.system_metrics,
                                              "flush_timeout": config.tracking.flush_timeout}}


def max_concurrent(base: Config, sweep: SweepConfig, resources: dict, gpu: bool, num_trials: int) -> int:
    """sweep.max_concurrent_trials, or the trials whose workers the cluster holds at once (at least 1): Train runs
    wait for all their workers, so more trial drivers than that would only queue."""
    if sweep.max_concurrent_trials:
        return sweep.max_concurrent_trials
    if gpu:
        fits = resources.get("GPU", 0) // base.train.workers
    else:
        fits = resources.get("CPU", 0) // (base.train.workers * base.train.cpus_per_worker)
    return max(1, min(num_trials, int(fits)))


def _tune(base: Config, sweep: SweepConfig, specs: list[dict], recorded: dict, results_path: str) -> None:
    """Run the trials of `specs` with Ray Tune; `recorded` and results.csv gain a row as each trial completes."""
    from mlflow import MlflowClient
    from ray import tune

    from ..train import distributed
    from .scaling import COLUMNS, TrialResult, write_results

    concurrent = max_concurrent(base, sweep, distributed.total(distributed.capacity()), base.train.device == "cuda",
                                len(specs))
    storage_path, filesystem, uri = distributed.location(base)
    scheduler = None
    if sweep.scheduler == "asha":
        # max_t past the last step: a trial that trains to the end finishes itself and reports its row (ASHA would
        # stop it on the Train report of its last step, before that).
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="step", metric=ASHA_METRIC, mode="min", max_t=base.train.steps + 1,
            grace_period=sweep.grace_steps or max(1, base.train.steps // 4))
    log.info("sweep %s: %d trial(s), %d at a time, %s scheduler, metric %s", uri, len(specs), concurrent,
             sweep.scheduler, specs[0]["metric"])

    class Recorder(tune.Callback):
        """Writes each trial's row to results.csv as it completes (in the driver), so a restart skips it."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            if "status" not in result:  # stopped by ASHA: its last logged metric; its MLflow child ends KILLED
                spec = trial.config["trial"]
                step = int(result.get("step", 0))
                MlflowClient(spec["target"]["uri"]).set_terminated(spec["target"]["run_id"], status="KILLED")
                result = {"trial": spec["name"], "size": spec["size"], "params": spec["compute"]["params"],
                          "lr": spec["lr"], "seed": spec["seed"], "status": "ok",
                          "final_loss": _last_logged(spec["target"]["uri"], spec["target"]["run_id"], spec["metric"],
                                                     math.nan),
                          "flops": float(spec["compute"]["flops_per_step"] * step),
                          "reason": f"stopped by ASHA at step {step}"}
            self._record(TrialResult(**{k: result[k] for k in COLUMNS}))

        def on_trial_error(self, iteration, trials, trial, **info):
            """The trial function itself died (its node lost, killed) after Tune's own retries: crashed."""
            spec, error = trial.config["trial"], trial.get_error()
            message = str(error).strip().splitlines()[-1] if error else "see the Tune output"
            MlflowClient(spec["target"]["uri"]).set_terminated(spec["target"]["run_id"], status="FAILED")
            self._record(TrialResult(spec["name"], spec["size"], spec["compute"]["params"], spec["lr"], spec["seed"],
                                     "crashed", reason=f"trial error: {message[:500]} ({trial.error_file})"))

        def _record(self, row):
            recorded[row.trial] = row
            write_results(list(recorded.values()), results_path)
            log.info("trial %s: %s %s", row.trial, row.status, row.reason or f"{specs[0]['metric']}={row.final_loss:.4g}")

    tuner = tune.Tuner(
        tune.with_resources(_trial, {"CPU": 0, "memory": 1}),  # the trial drives its Train run: no CPU of its own
        param_space={"trial": tune.grid_search(specs)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, scheduler=scheduler,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        # A trial whose function dies (its node lost) is restarted by Tune, and resumes its Train run.
        run_config=tune.RunConfig(name=base.run.name, storage_path=storage_path, storage_filesystem=filesystem,
                                  failure_config=tune.FailureConfig(max_failures=base.train.max_failures),
                                  callbacks=[Recorder()], verbose=1),
    )
    tuner.fit()


def _trial_name(trial) -> str:
    return trial.config["trial"]["name"]


def _trial(tune_config: dict) -> None:
    """A Tune trial: the driver of one grid point's Ray Train run (Train V2 pattern). A run that diverged or whose
    data or config the workers could not use is reported as a `failed` row with its reason, one whose workers
    exhausted train.max_failures as `crashed` (retried by the next run of the sweep); the MLflow child ends FAILED
    and the sweep goes on."""
    spec = tune_config["trial"]
    config = Config.from_dict(spec["config"])
    import ray.train
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..train import distributed

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    target, accounting = spec["target"], spec["compute"]
    run_uri = distributed.location(config)[2]
    context = tune.get_context()
    child = MLflowTracker(target["uri"], run_id=target["run_id"], flush_timeout=target["flush_timeout"])
    child.log_params({"compute": accounting})
    child.set_tags({"ray.trial_id": context.get_trial_id(), "ray.trial_name": context.get_trial_name(),
                    "ray.trial_dir": context.get_trial_dir(), "ray.train_run": run_uri})
    trainer = distributed.trainer(config, target, callbacks=[TuneReportCallback()])
    metric, summary, status = spec["metric"], {}, "ok"
    try:
        summary = trainer.fit().return_value
        failed = summary.get("failed")
        reason = f"{failed['type']}: {failed['message']}"[:2000] if failed else ""
        status = "failed" if failed else "ok"
    except ray.train.TrainingFailedError as e:  # workers failed train.max_failures + 1 times
        reason, status = distributed.failure_reason(e)[:2000], "crashed"
    if reason:
        log.error("trial %s %s: %s", spec["name"], status, reason)
    # From the run's history, not the loop's summary: a Train run resumed at its last step trains (and logs) nothing.
    steps = int(_last_logged(target["uri"], target["run_id"], "train/step", 0))
    final = _last_logged(target["uri"], target["run_id"], metric, math.nan)
    row = {"trial": spec["name"], "size": spec["size"], "params": accounting["params"], "lr": spec["lr"],
           "seed": spec["seed"], "status": status, "final_loss": final,
           "flops": float(accounting["flops_per_step"] * steps), "reason": reason}
    child.log_metrics({"compute/flops": row["flops"], **({f"final/{metric}": final} if not reason else {})},
                      step=steps)
    if reason:
        child.set_tags({"scmlab.failure": reason[:5000]})
    child.finish("FAILED" if reason else "FINISHED")
    tune.report({**row, "step": steps, ASHA_METRIC: float(summary.get("metrics", {}).get(ASHA_METRIC, math.nan))})


def _last_logged(uri: str, run_id: str, key: str, default: float) -> float:
    """The value of metric `key` at the run's last logged step (`default` if never logged): the final metric, and
    the last step (a failed run's FLOPs are counted up to there)."""
    from mlflow import MlflowClient

    history = MlflowClient(uri).get_metric_history(run_id, key)
    return float(max(history, key=lambda m: (m.step, m.timestamp)).value) if history else default


def _curves(uri: str, grid: list[Trial], children: dict, metric: str, accounting: dict) -> list:
    """Each trial's logged `metric` against its cumulative training FLOPs (step x FLOPs per step)."""
    import numpy as np
    from mlflow import MlflowClient

    from .scaling import Curve

    client, curves = MlflowClient(uri), []
    for t in grid:
        history = sorted((m.step, m.value) for m in client.get_metric_history(children[t.name], metric))
        if history:
            steps, values = map(np.array, zip(*history))
            curves.append(Curve(t.name, t.size, steps * float(accounting[t.name]["flops_per_step"]), values))
    return curves


def analyse(rows: list, curves: list, out_dir: str, metric: str) -> dict:
    """The results table, the law fitted against parameters and against FLOPs (failed trials left out and named),
    and the plots, in out_dir. Returns {"fits": {"params": summary | {"error"}, "flops": ...}, "plots": [names]}.
    A fit that cannot be made (fewer than 3 sizes with a finished trial) is skipped with its reason."""
    from . import plots
    from .scaling import compute_frontier, fit_scaling_law, write_results

    write_results(rows, os.path.join(out_dir, RESULTS))
    fits, fitted, names = {}, {}, []
    for against, xlabel in (("params", "parameters"), ("flops", "training FLOPs")):
        try:
            fit = fit_scaling_law(rows, against=against)
        except ValueError as e:
            log.warning("no fit against %s: %s", against, e)
            fits[against] = {"error": str(e)}
            continue
        fitted[against] = fit
        fits[against] = {**fit.summary(), "left_out": [f"{k}: {r}" for k, r in fit.left_out],
                         "notes": list(fit.notes)}
        for label, reason in fit.left_out:
            log.warning("fit against %s leaves out %s: %s", against, label, reason)
        names.append(os.path.basename(plots.plot_fit(fit, os.path.join(out_dir, f"fit_{against}.png"),
                                                     xlabel=xlabel, ylabel=f"final {metric}")))
    if curves:
        frontier = compute_frontier(curves)
        names.append(os.path.basename(plots.plot_loss_vs_compute(
            curves, os.path.join(out_dir, "loss_vs_compute.png"), frontier=frontier, fit=fitted.get("flops"),
            ylabel=metric)))
    names.append(os.path.basename(plots.plot_best_lr(rows, os.path.join(out_dir, "best_lr.png"))))
    with open(os.path.join(out_dir, FIT), "w") as f:
        json.dump({"metric": metric, "fits": fits}, f, indent=2)
    return {"fits": fits, "plots": names}
