"""The paper presets against the paper: every preset in jobs/configs resolves, at every model size of its per_size
table (placeholder data paths included: nothing is read), and each paper preset holds the values transcribed below
from Lu & Song 2024 (arXiv 2410.11081, ICLR 2025: App. G, Tables 1-2 and 4-6), each row citing its source. Where
the paper defers to EDM (CIFAR-10 teacher, App. G.1) or EDM2 config G (ImageNet teachers, App. G.1), the row cites
the setting taken from there. A value given per size is a {size: value} dict; the sizes are those of the paper.
"""

import glob
import os

import pytest

from scmlab.config import PER_SIZE, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "jobs", "configs")
IN64 = ("S", "M", "L", "XL")
IN512 = ("S", "M", "L", "XL", "XXL")


def sized(*values, sizes):
    return dict(zip(sizes, values, strict=True))


CIFAR10_CM = [  # App. G.2, CIFAR-10: "for both sCT and sCD"
    ("model.size", "cifar10", "App. G.1: the DDPM++ architecture"),
    ("objective.teacher", "runs/cifar10-diffusion", "App. G.2: initialized from the teacher's EMA weights"),
    ("objective.P_mean", -1.0, "App. G.2"),
    ("objective.P_std", 1.4, "App. G.2"),
    ("objective.tangent_norm", "l2", "App. G.2: g / (||g|| + c)"),
    ("objective.tangent_c", 0.1, "App. G.2: c = 0.1"),
    ("objective.warmup_steps", 10000, "App. G.2: H = 10000"),
    ("optim.name", "radam", "App. G.2: RAdam"),
    ("optim.lr", 1e-4, "App. G.2"),
    ("optim.betas", [0.9, 0.99], "App. G.2"),
    ("optim.eps", 1e-8, "App. G.2"),
    ("optim.schedule", "constant", "App. G.2: without learning rate schedulers"),
    ("optim.warmup", 0, "App. G.2: without learning rate schedulers"),
    ("train.batch_size", 512, "App. G.2: the teacher's batch size"),
    ("train.ema", "halflife", "App. G.2: EMA half-life"),
    ("train.ema_half_life", 500000.0, "App. G.2: 0.5 Mimg"),
]

IN64_CM = [  # Table 4, "Shared details of consistency models", and App. G.2
    ("model.arch", "unet", "Table 4: EDM2 sizes"),
    ("model.label_dropout", 0.0, "App. G.1: EDM2 config G, label dropout only at 512x512"),
    ("model.dropout_max_res", 16, "App. G.2: dropout at resolutions <= 16 only"),
    ("objective.teacher", {s: f"runs/imagenet64-diffusion-{s}" for s in IN64}, "App. G.2: the same-size teacher"),
    ("objective.P_mean", -1.0, "Table 4"),
    ("objective.P_std", 1.6, "Table 4"),
    ("objective.tangent_norm", "l2", "sec. 4.2 / App. G.2"),
    ("objective.tangent_c", 0.1, "Table 4: c"),
    ("objective.warmup_steps", 10000, "Table 4: tangent warm up iterations"),
    ("optim.name", "adam", "Table 4: Adam"),
    ("optim.lr", sized(1e-4, 9e-5, 8e-5, 7e-5, sizes=IN64), "Table 4: learning rate max (alpha_ref)"),
    ("optim.betas", [0.9, 0.99], "Table 4"),
    ("optim.eps", 1e-11, "Table 4"),
    ("optim.schedule", "inv_sqrt", "Table 4: learning rate decay"),
    ("optim.t_ref", 35000, "Table 4: t_ref"),
    ("optim.warmup", 4883, "App. G.2: other settings as the teacher's (EDM2's 10 Mimg ramp-up at batch 2048)"),
    ("train.batch_size", 2048, "Table 4"),
    ("train.ema", "power", "App. G.2: EMA length sigma_rel"),
    ("train.ema_sigma_rel", 0.05, "App. G.2: sampling from CMs with sigma_rel = 0.05"),
]

IN512_CM = [  # Table 5, "Shared details of consistency models", and App. G.2
    ("model.arch", "unet", "Table 5: EDM2 sizes"),
    ("model.dropout_max_res", 16, "App. G.2: dropout at resolutions <= 16 only"),
    ("objective.teacher", {s: f"runs/imagenet512-diffusion-{s}" for s in IN512}, "App. G.2: the same-size teacher"),
    ("objective.P_mean", -0.8, "Table 5"),
    ("objective.P_std", 1.6, "Table 5"),
    ("objective.tangent_norm", "l2", "sec. 4.2 / App. G.2"),
    ("objective.tangent_c", 0.1, "Table 5: c"),
    ("objective.warmup_steps", 10000, "Table 5: tangent warm up iterations"),
    ("optim.name", "adam", "Table 5: Adam"),
    ("optim.lr", sized(1e-4, 9e-5, 8e-5, 7e-5, 6.5e-5, sizes=IN512), "Table 5: learning rate max (alpha_ref)"),
    ("optim.betas", [0.9, 0.99], "Table 5"),
    ("optim.eps", 1e-11, "Table 5"),
    ("optim.schedule", "inv_sqrt", "Table 5: learning rate decay"),
    ("optim.t_ref", 70000, "Table 5: t_ref"),
    ("optim.warmup", 4883, "App. G.2: other settings as the teacher's (EDM2's 10 Mimg ramp-up at batch 2048)"),
    ("train.batch_size", 2048, "Table 5"),
    ("train.ema", "power", "App. G.2: EMA length sigma_rel"),
    ("train.ema_sigma_rel", 0.05, "App. G.2: sampling from CMs with sigma_rel = 0.05"),
]

EDM2_TEACHER = [  # App. G.1: "exactly the same setting in EDM2 config G ... the only difference: Adam eps 1e-11"
    ("model.arch", "unet", "EDM2 UNet"),
    ("objective.kind", "diffusion", "App. G.1: TrigFlow diffusion"),
    ("objective.adaptive_weight", True, "EDM2's learned uncertainty weighting"),
    ("optim.name", "adam", "Tables 4-5: Adam"),
    ("optim.betas", [0.9, 0.99], "Tables 4-5"),
    ("optim.eps", 1e-11, "App. G.1, Tables 4-5"),
    ("optim.schedule", "inv_sqrt", "Tables 4-5: learning rate decay"),
    ("optim.warmup", 4883, "EDM2 learning_rate_schedule: rampup_Mimg = 10 at batch 2048"),
    ("train.batch_size", 2048, "Tables 4-5"),
    ("train.ema", "power", "Tables 4-5: EMA length (sigma_rel) of pretrained diffusion"),
]

PAPER = {
    "cifar10-diffusion": [  # App. G.1: "the same settings of EDM"
        ("model.size", "cifar10", "App. G.1: DDPM++"),
        ("model.dropout", 0.13, "App. G.1"),
        ("objective.kind", "diffusion", "App. G.1"),
        ("objective.P_mean", -1.2, "EDM (Karras et al. 2022, Table 1), per App. G.1"),
        ("objective.P_std", 1.2, "EDM, per App. G.1"),
        ("objective.adaptive_weight", False, "EDM's fixed weighting, per App. G.1"),
        ("optim.name", "adam", "App. G.1"),
        ("optim.lr", 1e-3, "App. G.1"),
        ("optim.betas", [0.9, 0.999], "App. G.1"),
        ("optim.eps", 1e-8, "App. G.1"),
        ("optim.warmup", 19531, "EDM's lr_rampup_kimg = 10000 at batch 512, per App. G.1"),
        ("train.steps", 400000, "App. G.1"),
        ("train.batch_size", 512, "App. G.1"),
        ("train.ema_half_life", 500000.0, "EDM's ema_halflife_kimg = 500, per App. G.1"),
        ("train.sample_steps", 18, "App. G.1: 18 Heun steps, NFE 35"),
    ],
    "cifar10-sct": CIFAR10_CM + [
        ("objective.kind", "sct", "Table 1"),
        ("model.dropout", 0.2, "App. G.2: dropout 0.20 for sCT"),
    ],
    "cifar10-scd": CIFAR10_CM + [
        ("objective.kind", "scd", "Table 1"),
        ("model.dropout", 0.0, "App. G.2: no dropout for sCD"),
    ],
    "imagenet64-diffusion": EDM2_TEACHER + [
        ("model.label_dropout", 0.0, "App. G.1: EDM2 config G; label dropout only at 512x512"),
        ("model.dropout_max_res", None, "EDM2: dropout in every block"),
        ("objective.P_mean", -0.8, "Table 4, diffusion"),
        ("objective.P_std", 1.6, "Table 4, diffusion"),
        ("optim.t_ref", 35000, "Table 4"),
        ("train.steps", sized(1048000, 1486000, 761000, 540000, sizes=IN64), "Table 4: training iterations"),
        ("optim.lr", sized(1e-2, 9e-3, 8e-3, 7e-3, sizes=IN64), "Table 4: learning rate max (alpha_ref)"),
        ("model.dropout", sized(0.0, 0.1, 0.1, 0.1, sizes=IN64), "Table 4: dropout probability"),
        ("train.ema_sigma_rel", sized(0.075, 0.06, 0.04, 0.04, sizes=IN64), "Table 4: EMA length of the teacher"),
        ("run.dir", {s: f"runs/imagenet64-diffusion-{s}" for s in IN64}, "one run per size"),
    ],
    "imagenet64-sct": IN64_CM + [
        ("objective.kind", "sct", "Table 4, sCT"),
        ("train.steps", 400000, "Table 4, sCT: training iterations"),
        ("model.dropout", 0.45, "Table 4, sCT: dropout for resolution <= 16"),
    ],
    "imagenet64-scd": IN64_CM + [
        ("objective.kind", "scd", "Table 4, sCD"),
        ("train.steps", 400000, "Table 4, sCD: training iterations"),
        ("model.dropout", 0.0, "Table 4, sCD: dropout for resolution <= 16"),
        ("objective.guidance_max", 1.0, "sec. 5.2: guidance input at 512x512 only"),
    ],
    "imagenet512-diffusion": EDM2_TEACHER + [
        ("model.label_dropout", 0.1, "App. G.1: label dropout 0.1 for classifier-free guidance"),
        ("model.dropout_max_res", None, "EDM2: dropout in every block"),
        ("objective.P_mean", -0.4, "Table 5, diffusion"),
        ("objective.P_std", 1.0, "Table 5, diffusion"),
        ("optim.t_ref", 70000, "Table 5"),
        ("train.sample_steps", 32, "App. G.1: 32 Heun steps, NFE 63"),
        ("train.steps", sized(1048000, 1048000, 696000, 598000, 376000, sizes=IN512), "Table 5: iterations"),
        ("optim.lr", sized(1e-2, 9e-3, 8e-3, 7e-3, 6.5e-3, sizes=IN512), "Table 5: alpha_ref"),
        ("model.dropout", sized(0.0, 0.1, 0.1, 0.1, 0.1, sizes=IN512), "Table 5: dropout probability"),
        ("train.ema_sigma_rel", sized(0.025, 0.03, 0.015, 0.02, 0.015, sizes=IN512), "Table 5: EMA length"),
        ("train.sample_guidance", sized(1.4, 1.2, 1.2, 1.2, 1.2, sizes=IN512), "Table 6: guidance scale for FID"),
        ("run.dir", {s: f"runs/imagenet512-diffusion-{s}" for s in IN512}, "one run per size"),
    ],
    "imagenet512-sct": IN512_CM + [
        ("objective.kind", "sct", "Table 5, sCT"),
        ("train.steps", 100000, "Table 5, sCT: training iterations"),
        ("model.dropout", sized(0.25, 0.35, 0.35, 0.35, 0.35, sizes=IN512), "Table 5, sCT: dropout, res <= 16"),
    ],
    "imagenet512-scd": IN512_CM + [
        ("objective.kind", "scd", "Table 5, sCD"),
        ("train.steps", 200000, "Table 5, sCD: training iterations"),
        ("model.dropout", sized(0.0, 0.1, 0.1, 0.1, 0.1, sizes=IN512), "Table 5, sCD: dropout, res <= 16"),
        ("model.guidance_input", True, "sec. 5.2: an additional input s, the guidance scale"),
        ("objective.guidance_max", 2.0, "Table 5: maximum of CFG scale; sec. 5.2: s uniform in [1, 2]"),
        ("train.sample_guidance", sized(1.4, 1.2, 1.2, 1.2, 1.2, sizes=IN512), "Table 6: sCD 2-step FID guidance"),
    ],
}

TEACHERS = {"cifar10-sct": "cifar10-diffusion", "cifar10-scd": "cifar10-diffusion",
            "imagenet64-sct": "imagenet64-diffusion", "imagenet64-scd": "imagenet64-diffusion",
            "imagenet512-sct": "imagenet512-diffusion", "imagenet512-scd": "imagenet512-diffusion"}


def path(name: str) -> str:
    return os.path.join(CONFIGS, f"{name}.yaml")


def sizes_of(name: str) -> list[str | None]:
    """The model sizes a preset resolves for: its per_size rows, or just its own size (None)."""
    import yaml

    with open(path(name)) as f:
        return list(yaml.safe_load(f).get(PER_SIZE) or [None])


def resolve(name: str, size: str | None):
    return load_config(path(name), [f"model.size={size}"] if size else [])


def value(config, key: str):
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


TRAINING_PRESETS = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONFIGS, "*.yaml"))
                          if not os.path.basename(p).startswith("sweep-"))


@pytest.mark.parametrize("name", TRAINING_PRESETS)
def test_every_preset_resolves_at_every_size(name):
    for size in sizes_of(name):
        config = resolve(name, size)
        assert size is None or config.model.size == size


def test_every_paper_preset_is_checked():
    """A preset named after a paper dataset cannot skip the table below."""
    paper_like = {n for n in TRAINING_PRESETS if n.startswith(("cifar10-", "imagenet"))}
    assert paper_like == set(PAPER)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_preset_holds_the_papers_values(name):
    rows = PAPER[name]
    per_size = [set(v) for _, v, _ in rows if isinstance(v, dict)]
    sizes = sizes_of(name)
    assert all(s == set(sizes) for s in per_size), (name, sizes, per_size)  # rows cover exactly the paper's sizes
    keys = [key for key, _, _ in rows]
    assert len(keys) == len(set(keys)), name  # one row per key
    wrong = []
    for size in sizes:
        config = resolve(name, size)
        for key, expected, source in rows:
            want = expected[size] if isinstance(expected, dict) else expected
            if value(config, key) != want:
                wrong.append(f"{name} {size or ''} {key} = {value(config, key)!r}, the paper: {want!r} ({source})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("student", sorted(TEACHERS))
def test_students_start_from_their_teacher_preset(student):
    """App. G.2: every consistency model, sCT included, starts from the EMA weights of its teacher, of its own size:
    the student's objective.teacher is the teacher preset's run directory at the same model.size."""
    for size in sizes_of(student):
        s, t = resolve(student, size), resolve(TEACHERS[student], size)
        assert t.objective.kind == "diffusion"
        assert s.objective.teacher == t.run.dir
        assert (s.model.arch, s.model.size, s.data.train) == (t.model.arch, t.model.size, t.data.train)
        assert s.train.batch_size == t.train.batch_size  # App. G.2: the teacher's batch size


def test_gpu_presets_fit_the_shipped_cluster():
    """Issue 14: every GPU preset and GPU study, at every size, can be placed on cluster.yaml at full scale (4 GPUs),
    keeping its global batch through gradient accumulation (the paper presets: micro-batches of 32 per GPU)."""
    import yaml

    from scmlab.train import distributed
    from scmlab.tune.sweep import load_sweep

    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        nodes = distributed.configured_nodes(yaml.safe_load(f), "cluster.yaml")
    configs = [(f"{name} {size or ''}", resolve(name, size)) for name in TRAINING_PRESETS for size in sizes_of(name)]
    configs += [(os.path.basename(p), load_sweep(p, ["tracking.uri=http://127.0.0.1:5000"])[0])
                for p in glob.glob(os.path.join(CONFIGS, "sweep-study-*.yaml"))]
    on_gpu = [(name, config) for name, config in configs if config.train.device == "cuda"]
    assert len(on_gpu) >= 10
    for name, config in on_gpu:
        distributed.check_fits(config, nodes, gpu=True)
        train = config.train
        micro = train.batch_size // (train.workers * train.grad_accum)
        assert micro * train.workers * train.grad_accum == train.batch_size, name
        assert micro == 32 or not name.startswith(("cifar10-", "imagenet")), (name, micro)


def test_xl_and_xxl_presets_shard_over_their_workers():
    """Issue 14: the ImageNet presets' XL and XXL sizes train with FSDP (their replicas outgrow the shipped cluster's
    GPUs), the smaller ones with DDP."""
    for name in (n for n in TRAINING_PRESETS if n.startswith("imagenet")):
        for size in sizes_of(name):
            assert resolve(name, size).train.parallel == ("fsdp" if size in ("XL", "XXL") else "ddp"), (name, size)
