"""Scaling-law fits: recovery of known laws from noisy synthetic points and training curves, uncertainty that covers
the truth and shrinks with more points, degenerate inputs, failed trials in the results table, CSV round trip, and
the plots."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

import scmlab
from scmlab.tune.scaling import (Curve, TrialResult, best_per_size, compute_frontier, fit_power_law,
                                 fit_scaling_law, read_results, write_results)

E, A, ALPHA = 0.2, 50.0, 0.3  # y = E + A x^-alpha over x = 1e5 .. 1e9 parameters: y from 1.8 down to 0.3


def law_points(n, noise=0.01, seed=0):
    """n sizes, log-spaced, with multiplicative (log-normal) noise of relative size `noise`."""
    rng = np.random.default_rng(seed)
    x = np.geomspace(1e5, 1e9, n)
    return x, (E + A * x**-ALPHA) * np.exp(noise * rng.standard_normal(n))


def test_fit_recovers_a_known_law():
    fit = fit_power_law(*law_points(8, noise=0.005))
    assert fit.n == 8 and fit.left_out == ()
    assert fit.alpha == pytest.approx(ALPHA, rel=0.05)
    assert fit.E == pytest.approx(E, rel=0.05)
    assert fit.A == pytest.approx(A, rel=0.2)
    np.testing.assert_allclose(fit.predict(fit.x), np.exp(np.log(fit.y) + fit.residuals), rtol=1e-9)


def test_standard_errors_cover_the_truth_and_shrink_with_more_points():
    """Over 40 noise draws: the truth lies within 3 standard errors (nearly) always, the residual scale estimates
    the noise, and 48 points give smaller errors than 8."""
    median_err = {}
    for n in (8, 48):
        fits = [fit_power_law(*law_points(n, noise=0.01, seed=seed)) for seed in range(40)]
        for name, truth in (("E", E), ("A", A), ("alpha", ALPHA)):
            covered = [abs(getattr(f, name) - truth) < 3 * getattr(f, f"{name}_err") for f in fits]
            assert np.mean(covered) >= 0.9, (n, name)
        scale = np.mean([np.sqrt(np.sum(np.square(f.residuals)) / (f.n - 3)) for f in fits])
        assert scale == pytest.approx(0.01, rel=0.15)
        median_err[n] = {name: np.median([getattr(f, f"{name}_err") for f in fits]) for name in ("E", "A", "alpha")}
    assert all(median_err[48][name] < 0.7 * median_err[8][name] for name in ("E", "A", "alpha"))


def test_bootstrap_intervals_cover_the_truth_and_narrow_with_more_points():
    width = {}
    for n in (8, 48):
        fits = [fit_power_law(*law_points(n, seed=seed), bootstrap=100, seed=seed) for seed in range(10)]
        assert all(f.intervals["level"] == 0.95 for f in fits)
        for name, truth in (("E", E), ("A", A), ("alpha", ALPHA)):
            # percentile intervals from few points run narrower than nominal (module docstring): 75-90% for 95%
            assert np.mean([f.intervals[name][0] < truth < f.intervals[name][1] for f in fits]) >= 0.6, (n, name)
        width[n] = np.median([f.intervals["alpha"][1] - f.intervals["alpha"][0] for f in fits])
    assert width[48] < 0.7 * width[8]
    few = fit_power_law(*law_points(8))
    assert any("Student t" in note for note in few.notes) and few.intervals is None


def chinchilla_curves(sizes, noise=0.005, seed=0):
    """Training curves of L(N, D) = E + A N^-a + B D^-b (Hoffmann et al. 2022, Eq. 2) at compute C = 6 N D: the
    lower envelope over all N is E + G C^-(ab / (a + b)) exactly, a known law in compute."""
    rng = np.random.default_rng(seed)
    curves = []
    for i, N in enumerate(sizes):
        D = np.geomspace(1e3, 1e9, 60)
        loss = (0.1 + 20 * N**-0.34 + 20 * D**-0.28) * np.exp(noise * rng.standard_normal(D.shape))
        curves.append(Curve(trial=f"trial{i}", size=f"s{i}", compute=6 * N * D, loss=loss))
    return curves


def test_fit_recovers_the_compute_law_from_the_frontier_of_synthetic_curves():
    curves = chinchilla_curves(np.geomspace(1e5, 1e8, 10))
    frontier = compute_frontier(curves, num=40).interior()
    assert {"s0", "s9"}.isdisjoint(frontier.sizes) and len(set(frontier.sizes)) == 8
    fit = fit_power_law(frontier.compute, frontier.loss, frontier.trials)
    assert fit.alpha == pytest.approx(0.34 * 0.28 / (0.34 + 0.28), rel=0.05)
    assert fit.E == pytest.approx(0.1, rel=0.05)


def test_pareto_frontier_is_the_lower_envelope():
    curves = chinchilla_curves(np.geomspace(1e5, 1e7, 3))
    curves.append(Curve("broken", "s0", np.array([0.0, 1e10, 2e10]), np.array([0.01, np.nan, np.inf])))
    front = compute_frontier(curves)
    assert np.all(np.diff(front.compute) >= 0) and np.all(np.diff(front.loss) < 0)
    assert "broken" not in front.trials  # zero compute and non-finite losses are skipped
    for curve in curves[:3]:
        for c, loss in zip(curve.compute, curve.loss):
            assert front.loss[front.compute <= c].min() <= loss
    with pytest.raises(ValueError, match="no curve"):
        compute_frontier([curves[-1]])


def test_degenerate_inputs_are_left_out_or_refused_with_a_reason():
    x, y = law_points(6)
    y[1], y[3], x[4] = np.nan, -0.5, 0.0
    fit = fit_power_law(x, y, [f"p{i}" for i in range(6)])
    assert fit.n == 3 and fit.labels == ("p0", "p2", "p5")
    reasons = dict(fit.left_out)
    assert set(reasons) == {"p1", "p3", "p4"}
    assert "not finite" in reasons["p1"] and "positive metric" in reasons["p3"] and "x=0.0" in reasons["p4"]
    assert math.isinf(fit.alpha_err) and any("exact fit" in note for note in fit.notes)
    with pytest.raises(ValueError, match=r"at least 3 points .* got 2 usable .*p1: not finite"):
        fit_power_law(x[:4], y[:4], [f"p{i}" for i in range(4)])
    with pytest.raises(ValueError, match="distinct x"):
        fit_power_law([1e6, 1e6, 1e7, 1e7], [0.5, 0.5, 0.4, 0.4])
    with pytest.raises(ValueError, match="same length"):
        fit_power_law([1, 2, 3], [1, 2])


def sweep_rows():
    """3 sizes x 2 learning rates + a size whose only trial diverged; final losses on the law E + A N^-alpha."""
    rows = []
    for size, params in (("S", 10**5), ("M", 10**6), ("L", 10**7), ("XL", 10**8)):
        for lr, excess in ((1e-4, 0.0), (1e-3, 0.05)):
            trial = f"{size}-lr{lr:g}"
            if size == "XL":
                rows.append(TrialResult(trial, size, params, lr, 0, "failed", math.nan, 3e15, "loss is NaN at step 40"))
            elif (size, lr) == ("M", 1e-3):
                rows.append(TrialResult(trial, size, params, lr, 0, "failed", reason="diverged: loss 1e9 > 100"))
            else:
                loss = (E + A * params**-ALPHA) * (1 + excess)
                rows.append(TrialResult(trial, size, params, lr, 0, "ok", loss, 6.0 * params * 1e6))
    rows.append(TrialResult("L-lr0.01", "L", 10**7, 1e-2, 0, "ok", math.nan, 6e13))
    return rows


def test_failed_trials_are_kept_and_the_fit_names_them():
    rows = sweep_rows()
    best = best_per_size(rows)
    assert list(best) == ["S", "M", "L"] and all(row.lr == 1e-4 for row in best.values())
    fit = fit_scaling_law(rows, against="params")
    assert fit.labels == ("S-lr0.0001", "M-lr0.0001", "L-lr0.0001")
    assert fit.E == pytest.approx(E, rel=1e-3) and fit.alpha == pytest.approx(ALPHA, rel=1e-3)
    reasons = dict(fit.left_out)
    assert reasons == {"XL-lr0.0001": "failed: loss is NaN at step 40", "XL-lr0.001": "failed: loss is NaN at step 40",
                       "M-lr0.001": "failed: diverged: loss 1e9 > 100", "L-lr0.01": "final loss is nan"}
    assert fit_scaling_law(rows, against="flops").alpha == pytest.approx(ALPHA, rel=1e-3)  # flops = 6e6 x params
    with pytest.raises(ValueError, match="trials left out: .*XL-lr0.0001: failed"):
        fit_scaling_law([row for row in rows if row.size != "S"])
    with pytest.raises(ValueError, match="'params' or 'flops'"):
        fit_scaling_law(rows, against="steps")


def test_results_csv_round_trip(tmp_path):
    rows = sweep_rows()
    path = str(tmp_path / "results.csv")
    write_results(rows, path)
    back = read_results(path)
    assert [repr(row) for row in back] == [repr(row) for row in rows]  # exact floats; NaN != NaN under ==
    assert all(type(row.params) is int and type(row.flops) is float for row in back)
    (tmp_path / "bad.csv").write_text("trial,size\nx,S\n")
    with pytest.raises(ValueError, match="columns"):
        read_results(str(tmp_path / "bad.csv"))
    with pytest.raises(ValueError, match="needs its reason"):
        TrialResult("t", "S", 1, 1e-4, 0, "failed")
    with pytest.raises(ValueError, match="status"):
        TrialResult("t", "S", 1, 1e-4, 0, "TERMINATED")


def test_plots_write_nonempty_pngs(tmp_path):
    from scmlab.tune import plots

    curves = chinchilla_curves(np.geomspace(1e5, 1e8, 4))
    frontier = compute_frontier(curves, num=30)
    rows = sweep_rows()
    paths = [
        plots.plot_loss_vs_compute(curves, str(tmp_path / "curves.png"), frontier=frontier,
                                   fit=fit_power_law(frontier.compute, frontier.loss)),
        plots.plot_best_lr(rows, str(tmp_path / "lr.png")),
        plots.plot_fit(fit_scaling_law(rows), str(tmp_path / "fit.png")),
    ]
    for path in paths:
        data = open(path, "rb").read()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_matplotlib_is_imported_only_to_draw():
    code = "import sys, scmlab.tune.plots; assert 'matplotlib' not in sys.modules"
    platform_dir = os.path.dirname(os.path.dirname(scmlab.__file__))
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": platform_dir})
