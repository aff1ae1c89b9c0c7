"""PNG plots of a scaling sweep: loss-vs-compute curves with the frontier and the fitted law, the best learning
rate per size, and a fitted law against its points.

matplotlib is imported when a plot is drawn, through its object-oriented API (a Figure saved by the Agg canvas): no
pyplot state, no display, nothing changed for the caller's own plotting.
"""

from collections.abc import Iterable, Sequence

import numpy as np

from .scaling import Curve, Frontier, PowerLawFit, TrialResult, best_per_size


def _axes(xlabel: str, ylabel: str, title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, which="both", alpha=0.25)
    return fig, ax


def _law(ax, fit: PowerLawFit, lo: float, hi: float) -> None:
    x = np.geomspace(lo, hi, 200)
    ax.plot(x, fit.predict(x), "k--", lw=1.2,
            label=f"fit: {fit.E:.3g} + {fit.A:.3g} x^-{fit.alpha:.3f} (alpha +- {fit.alpha_err:.2g}, n={fit.n})")
    ax.axhline(fit.E, color="grey", lw=0.8, ls=":", label=f"E = {fit.E:.3g} +- {fit.E_err:.2g}")


def _save(fig, path: str) -> str:
    fig.savefig(path, format="png")
    return path


def plot_loss_vs_compute(curves: Iterable[Curve], path: str, *, frontier: Frontier | None = None,
                         fit: PowerLawFit | None = None, ylabel: str = "training loss") -> str:
    """Every trial's curve (one color per size, in order of first appearance), the frontier and the fitted law."""
    from matplotlib import colormaps

    fig, ax = _axes("training FLOPs", ylabel, "loss vs compute")
    curves = list(curves)
    sizes = list(dict.fromkeys(c.size for c in curves))
    colors = {size: colormaps["viridis"](i / max(len(sizes) - 1, 1)) for i, size in enumerate(sizes)}
    labelled = set()  # one legend entry per size
    for curve in curves:
        compute, loss = np.asarray(curve.compute, dtype=float), np.asarray(curve.loss, dtype=float)
        ok = (compute > 0) & np.isfinite(loss) & (loss > 0)  # what a log-log axis can show
        ax.plot(compute[ok], loss[ok], color=colors[curve.size], lw=1, alpha=0.7,
                label=None if curve.size in labelled else curve.size)
        labelled.add(curve.size)
    if frontier is not None:
        ax.plot(frontier.compute, frontier.loss, color="crimson", lw=2, label="frontier")
    if fit is not None:
        _law(ax, fit, min(fit.x), max(fit.x))
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_best_lr(rows: Sequence[TrialResult], path: str) -> str:
    """Learning rate against parameters: every finished trial, the failed and crashed ones (x), and each size's
    best."""
    fig, ax = _axes("parameters", "learning rate", "best learning rate per size")
    ok = [r for r in rows if r.status == "ok"]
    failed = [r for r in rows if r.status != "ok"]
    if ok:
        ax.scatter([r.params for r in ok], [r.lr for r in ok], s=14, color="grey", label="finished")
    if failed:
        ax.scatter([r.params for r in failed], [r.lr for r in failed], marker="x", color="crimson", label="failed")
    best = list(best_per_size(rows).values())
    if best:
        ax.plot([r.params for r in best], [r.lr for r in best], "o-", color="k", label="best (lowest final loss)")
        for r in best:
            ax.annotate(r.size, (r.params, r.lr), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_fit(fit: PowerLawFit, path: str, *, xlabel: str = "parameters", ylabel: str = "final loss") -> str:
    """The fitted points, the law with its asymptote E, and the reasons for any point left out."""
    fig, ax = _axes(xlabel, ylabel, f"{ylabel} vs {xlabel}")
    ax.scatter(fit.x, fit.y, color="k", zorder=3, label="fitted points")
    _law(ax, fit, min(fit.x) / 2, max(fit.x) * 2)
    if fit.left_out:
        text = "left out:\n" + "\n".join(f"{label}: {reason}"[:70] for label, reason in fit.left_out)
        ax.text(0.02, 0.02, text, transform=ax.transAxes, fontsize=6, va="bottom", color="crimson",
                bbox=dict(facecolor="white", alpha=0.85, linewidth=0))
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_study(series: Sequence, path: str, *, xlabel: str, ylabel: str) -> str:
    """Several scores against one x (a study's stages and samplers): each (label, points [{"x", "y", "size"}], fit
    or None) as markers joined in order of x, its law dashed in the same color where one was fitted."""
    from matplotlib import colormaps

    fig, ax = _axes(xlabel, ylabel, f"{ylabel} vs {xlabel}")
    for i, (label, points, fit) in enumerate(series):
        color = colormaps["tab10"](i % 10)
        points = sorted((p for p in points if p["x"] > 0 and p["y"] > 0), key=lambda p: p["x"])
        if not points:
            continue
        ax.plot([p["x"] for p in points], [p["y"] for p in points], "o-", color=color, lw=1, ms=4,
                label=label if fit is None else f"{label}: alpha {fit.alpha:.3g} +- {fit.alpha_err:.2g}")
        if fit is not None:
            x = np.geomspace(min(fit.x) / 1.5, max(fit.x) * 1.5, 100)
            ax.plot(x, fit.predict(x), "--", color=color, lw=0.8)
    ax.legend(fontsize=6)
    return _save(fig, path)
