"""The analysis of a sweep in its parent run: per stage and sampler, the eval metric of each size's best trial
against parameters and against training FLOPs with the law fitted where there are enough sizes
(scmlab.tune.scaling), the student/teacher ratio per size, each grid setting's metric with its spread over seeds,
plots, and `report.md` (every trial, the fits, the ratios, the settings, and what the data support).

A stage's best trial of a size is the one with the lowest final stage metric (sweep.stages.NAME.metric, the row's
final_loss); its other samplers' scores (the same eval key: eval/fd/1step next to eval/fd/2step) are read from that
trial, so that every sampler of a stage describes the same trained models. A student's training FLOPs are its own
(the teacher's are the teacher stage's): FLOPs laws compare the cost of each stage, not of the pipeline.
"""

import csv
import json
import math
import os
import statistics
from collections import defaultdict

from scipy.stats import t as student_t

from .scaling import best_per_size, fit_power_law

STUDY, RATIOS, SETTINGS, REPORT = "study.json", "ratios.csv", "settings.csv", "report.md"
AGAINST = {"params": "parameters", "flops": "training FLOPs"}
SIGNIFICANT = 2.0  # standard errors: a variant's difference from the reference beyond this is read as resolved


def _series(metric: str, finals: dict) -> list[str]:
    """The scores of a stage: every logged sampler of its metric's eval key, or the metric alone."""
    if not metric.startswith("eval/"):
        return [metric]
    prefix = metric.rsplit("/", 1)[0] + "/"
    return sorted({k for values in finals.values() for k in values if k.startswith(prefix)}) or [metric]


def _value(row, key: str, metric: str, finals: dict) -> float:
    return row.final_loss if key == metric else finals.get(row.trial, {}).get(key, math.nan)


def analyse(rows: list, trials: list, finals: dict, metrics: dict, out_dir: str, kind: str = "") -> dict:
    """rows: the results table (TrialResult); trials: the sweep's Trial list; finals: {trial: {eval key: final
    value}}; metrics: {stage: its selection metric} ("" for an unstaged sweep, labelled `kind`). Writes study.json,
    ratios.csv (with a teacher and students), settings.csv (with seeds or grid axes), report.md and plots into
    out_dir. Returns {"files": names written, "metrics": flat scalars for the parent run, "fits", "ratios",
    "settings"}."""
    by_name = {t.name: t for t in trials}
    rows = [r for r in rows if r.trial in by_name]
    label = {stage: stage or kind or "trials" for stage in metrics}
    staged = {stage: [r for r in rows if by_name[r.trial].stage == stage] for stage in metrics}
    best = {stage: best_per_size(stage_rows) for stage, stage_rows in staged.items()}

    fits, flat, plotted = [], {}, defaultdict(list)
    for stage, metric in metrics.items():
        for key in _series(metric, {r.trial: finals.get(r.trial, {}) for r in staged[stage]}):
            points = [r for r in best[stage].values() if math.isfinite(_value(r, key, metric, finals))]
            for against in AGAINST:
                entry = {"stage": label[stage], "score": key, "against": against,
                         "points": [{"size": r.size, "trial": r.trial, "x": float(getattr(r, against)),
                                     "y": _value(r, key, metric, finals)} for r in points]}
                try:
                    fit = fit_power_law([p["x"] for p in entry["points"]], [p["y"] for p in entry["points"]],
                                        [p["size"] for p in entry["points"]])
                    entry.update(fit.summary(), notes=list(fit.notes))
                    for k in ("E", "A", "alpha", "E_err", "A_err", "alpha_err"):
                        if math.isfinite(entry[k]):
                            flat[f"law/{label[stage]}/{_short(key)}/{against}/{k}"] = entry[k]
                except ValueError as e:
                    fit, entry["error"] = None, str(e)
                fits.append(entry)
                plotted[against].append((f"{label[stage]} {_short(key)}", entry["points"], fit))

    ratios = _ratios(metrics, best, finals)
    for r in ratios:
        for stage_key, value in r["ratios"].items():
            flat[f"ratio/{stage_key}/{r['size']}"] = value
    settings = _settings(staged, by_name, metrics, finals, label)

    from . import plots

    files = []
    for against, series in plotted.items():
        name = f"study_{against}.png"
        plots.plot_study(series, os.path.join(out_dir, name), xlabel=AGAINST[against],
                         ylabel=" / ".join(dict.fromkeys(m.rsplit("/", 1)[0] for m in metrics.values())))
        files.append(name)
    with open(os.path.join(out_dir, STUDY), "w") as f:
        json.dump({"metrics": {label[s]: m for s, m in metrics.items()}, "fits": fits, "ratios": ratios,
                   "settings": settings}, f, indent=2, default=str)
    files.append(STUDY)
    if ratios:
        files.append(_write_csv(os.path.join(out_dir, RATIOS), [
            {"size": r["size"], "params": r["params"], "teacher": r["teacher"], "teacher_score": r["teacher_score"],
             **{f"{k}_score": v for k, v in r["students"].items()}, **{f"{k}_ratio": v for k, v in r["ratios"].items()}}
            for r in ratios]))
    if settings:
        files.append(_write_csv(os.path.join(out_dir, SETTINGS), settings))
    with open(os.path.join(out_dir, REPORT), "w") as f:
        f.write(_markdown(rows, by_name, finals, metrics, label, fits, ratios, settings))
    files.append(REPORT)
    return {"files": files, "metrics": flat, "fits": fits, "ratios": ratios, "settings": settings}


def _short(key: str) -> str:
    """eval/fd/2step -> fd/2step; loss/mse stays."""
    return key.removeprefix("eval/")


def _ratios(metrics: dict, best: dict, finals: dict) -> list[dict]:
    """Per size with a teacher and a student: each student stage's scores (every sampler of its eval key) over the
    teacher's selection score, both from each stage's best trial of the size."""
    if "teacher" not in metrics:
        return []
    out = []
    for size, teacher in best["teacher"].items():
        students, ratios = {}, {}
        for stage in ("scd", "sct"):
            if stage not in metrics or size not in best[stage]:
                continue
            student = best[stage][size]
            for key in _series(metrics[stage], {student.trial: finals.get(student.trial, {})}):
                value = _value(student, key, metrics[stage], finals)
                students[f"{stage}/{_short(key).split('/')[-1]}"] = value
                ratios[f"{stage}/{_short(key).split('/')[-1]}"] = value / teacher.final_loss
        if students:
            out.append({"size": size, "params": teacher.params, "teacher": teacher.trial,
                        "teacher_score": teacher.final_loss, "students": students, "ratios": ratios})
    return out


def _settings(staged: dict, by_name: dict, metrics: dict, finals: dict, label: dict) -> list[dict]:
    """Each (stage, size, lr, grid setting) over its seeds: mean, standard deviation (n - 1) and count of every
    score; only for sweeps with more than one seed or with grid axes."""
    out = []
    for stage, rows in staged.items():
        groups = defaultdict(list)
        for r in rows:
            if r.status == "ok":
                t = by_name[r.trial]
                groups[(t.size, t.lr, t.setting)].append(r)
        if not any(len(g) > 1 or key[2] for key, g in groups.items()):
            continue
        keys = _series(metrics[stage], {r.trial: finals.get(r.trial, {}) for r in rows})
        for (size, lr, setting), group in groups.items():
            entry = {"stage": label[stage], "size": size, "lr": lr, "setting": setting or "(base)",
                     "seeds": len(group)}
            for key in keys:
                values = [v for r in group if math.isfinite(v := _value(r, key, metrics[stage], finals))]
                entry[f"{_short(key)} mean"] = statistics.fmean(values) if values else math.nan
                entry[f"{_short(key)} std"] = statistics.stdev(values) if len(values) > 1 else math.nan
            out.append(entry)
    return out


def _write_csv(path: str, records: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(records)
    return os.path.basename(path)


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(header: list[str], lines: list[list]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] +
                     ["| " + " | ".join(_num(v).replace("|", "/") for v in line) + " |" for line in lines]) + "\n"


def _markdown(rows, by_name, finals, metrics, label, fits, ratios, settings) -> str:
    keys = list(dict.fromkeys(k for s, m in metrics.items()
                              for k in _series(m, {r.trial: finals.get(r.trial, {}) for r in rows})))
    out = ["# Scaling study\n",
           "Each stage's best trial of a size is the one with the lowest final selection metric: " +
           ", ".join(f"{label[s]} `{m}`" for s, m in metrics.items()) + ". Student FLOPs are their own training's.\n",
           "\n## Trials\n\n",
           _table(["trial", "stage", "size", "params", "lr", "seed", "setting", "status",
                   *[_short(k) for k in keys], "FLOPs", "reason"],
                  [[r.trial, label[by_name[r.trial].stage], r.size, r.params, r.lr, r.seed,
                    by_name[r.trial].setting, r.status,
                    *[(r.final_loss if k == metrics[by_name[r.trial].stage] else finals.get(r.trial, {}).get(k, ""))
                      for k in keys], r.flops, r.reason[:80]] for r in rows]),
           "\n## Laws: score = E + A x^-alpha over each size's best trial\n\n",
           _table(["stage", "score", "against", "n", "E", "A", "alpha", "notes"],
                  [[f["stage"], _short(f["score"]), f["against"], len(f["points"]),
                    *(("", "", "") if "error" in f else (f"{f['E']:.4g} ± {f['E_err']:.2g}",
                                                          f"{f['A']:.4g} ± {f['A_err']:.2g}",
                                                          f"{f['alpha']:.4g} ± {f['alpha_err']:.2g}")),
                    f.get("error") or "; ".join(f["notes"])] for f in fits])]
    if ratios:
        cols = list(dict.fromkeys(k for r in ratios for k in r["ratios"]))
        out += ["\n## Student / teacher (each size's best of each stage; ratio = student score / teacher score)\n\n",
                _table(["size", "params", "teacher", "teacher score", *[f"{c}" for c in cols],
                        *[f"{c} ratio" for c in cols]],
                       [[r["size"], r["params"], r["teacher"], r["teacher_score"],
                         *[r["students"].get(c, "") for c in cols], *[r["ratios"].get(c, "") for c in cols]]
                        for r in ratios])]
    if settings:
        cols = [k for k in settings[0] if k not in ("stage", "size", "lr", "setting", "seeds")]
        out += ["\n## Settings over seeds (mean ± sample standard deviation)\n\n",
                _table(["stage", "size", "lr", "setting", "seeds",
                        *[c.removesuffix(" mean") for c in cols if c.endswith(" mean")]],
                       [[s["stage"], s["size"], s["lr"], s["setting"], s["seeds"],
                         *[f"{s[c]:.4g} ± {s[c.replace(' mean', ' std')]:.2g}" for c in cols if c.endswith(" mean")]]
                        for s in settings])]
    out += ["\n## What the data support\n\n", *[f"- {line}\n" for line in _findings(fits, ratios, settings)]]
    return "".join(out)


def _findings(fits, ratios, settings) -> list[str]:
    """Plain statements read off the numbers, each with the evidence."""
    lines = []
    for f in fits:
        name = f"{f['stage']} {_short(f['score'])} vs {AGAINST[f['against']]}"
        ys = [p["y"] for p in sorted(f["points"], key=lambda p: p["x"])]
        trend = "has one size" if len(ys) < 2 else "falls with every size" if all(
            b < a for a, b in zip(ys, ys[1:])) else \
            "does not fall with every size (" + ", ".join(f"{p['size']} {p['y']:.3g}" for p in
                                                          sorted(f["points"], key=lambda p: p["x"])) + ")"
        if "error" in f:
            lines.append(f"{name}: no law ({f['error']}); the score {trend}.")
        elif not math.isfinite(f["alpha_err"]):
            lines.append(f"{name}: an exact fit through {f['n']} points, no uncertainty: sweep another size. The "
                         f"score {trend}.")
        elif any("bound" in n for n in f["notes"]):
            lines.append(f"{name}: the law is not constrained ({'; '.join(f['notes'])}); the score {trend}.")
        elif f["alpha"] > (t := student_t.ppf(0.975, f["n"] - 3)) * f["alpha_err"]:
            lines.append(f"{name}: alpha = {f['alpha']:.3g} ± {f['alpha_err']:.2g}, beyond the 95% interval of 0 "
                         f"({t:.3g} standard errors at {f['n'] - 3} degrees of freedom): the score improves with "
                         f"scale; it {trend}.")
        else:
            lines.append(f"{name}: alpha = {f['alpha']:.3g} ± {f['alpha_err']:.2g}, within the 95% interval of 0 "
                         f"({t:.3g} standard errors at {f['n'] - 3} degrees of freedom): {f['n']} sizes do not "
                         f"resolve the exponent; the score {trend}.")
    cols = dict.fromkeys(k for r in ratios for k in r["ratios"])
    for c in cols:
        values = [(r["size"], r["ratios"][c]) for r in ratios if c in r["ratios"]]
        lines.append(f"{c} over the teacher: " + ", ".join(f"{s} {v:.3g}" for s, v in values) +
                     (" (the ratio falls as the size grows)" if all(b[1] < a[1] for a, b in zip(values, values[1:]))
                      and len(values) > 1 else ""))
    groups = defaultdict(list)
    for s in settings:
        groups[(s["stage"], s["size"], s["lr"])].append(s)
    for (stage, size, lr), entries in groups.items():
        base = entries[0]
        for s, col in ((s, c) for s in entries[1:] for c in s if c.endswith(" mean")):
            sd = col.replace(" mean", " std")
            if not (s["seeds"] > 1 and base["seeds"] > 1 and math.isfinite(s[col]) and math.isfinite(base[col])):
                continue
            diff = s[col] - base[col]
            err = math.sqrt(s[sd] ** 2 / s["seeds"] + base[sd] ** 2 / base["seeds"])
            verdict = "beyond" if abs(diff) > SIGNIFICANT * err else "within"
            lines.append(f"{stage} {size} lr {lr:g}: {s['setting']} vs {base['setting']}: "
                         f"{col.removesuffix(' mean')} {s[col]:.4g} vs {base[col]:.4g} "
                         f"({'+' if diff >= 0 else ''}{diff:.3g}, {verdict} {SIGNIFICANT:g} standard errors of the "
                         f"difference over {s['seeds']}/{base['seeds']} seeds; lower is better).")
    return lines
