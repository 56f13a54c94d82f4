"""elim.plots: the results table and the two figures."""

from __future__ import annotations

import doctest

import elim.plots
import numpy as np
from elim.plots import format_results_table, plot_training_curves, plot_va_scatter
from test_train_helpers import read_png_size


def test_table_shows_every_metric_with_three_decimals():
    metrics = {"rmse_v": 0.1234, "rmse_a": 0.2, "sagr_v": 0.9, "sagr_a": 0.8}
    metrics |= {"pcc_v": 0.5, "pcc_a": -0.25, "ccc_v": 0.456, "ccc_a": 0.0}
    lines = format_results_table(metrics, "a long title here").splitlines()
    assert "RMSE" in lines[0] and "CCC" in lines[0]
    assert lines[2].split("|")[1:-1] == [
        " valence           ",
        "  0.123 ",
        "  0.900 ",
        "  0.500 ",
        "  0.456 ",
    ]
    assert " -0.250 " in lines[3]
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_plots_are_written(tmp_path):
    rng = np.random.default_rng(0)
    true = rng.uniform(-1, 1, size=(50, 2))
    path = plot_va_scatter(true + rng.normal(0, 0.1, true.shape), true, tmp_path / "s.png", "t")
    assert read_png_size(path)[0] > 300
    train_log = [
        {"step": s, "loss_main": 1 / s, "loss_elim": 0.1 if s > 5 else 0.0} for s in range(1, 30)
    ]
    eval_log = [{"step": 10, "ccc_v": 0.1, "ccc_a": 0.2}, {"step": 20, "ccc_v": 0.3, "ccc_a": 0.4}]
    assert read_png_size(plot_training_curves(train_log, eval_log, tmp_path / "c.png"))[0] > 300
    # A baseline log (no ELIM loss) and no evaluations yet must still plot.
    baseline = [{"step": s, "loss_main": 1.0, "loss_elim": 0.0} for s in range(1, 5)]
    assert read_png_size(plot_training_curves(baseline, [], tmp_path / "b.png"))[1] > 200


def test_smoothing_is_bias_corrected():
    out = elim.plots._smooth([2.0, 2.0, 2.0])
    np.testing.assert_allclose(out, [2.0, 2.0, 2.0])  # no pull towards 0 at the start


def test_docstring_examples():
    result = doctest.testmod(elim.plots)
    assert result.attempted > 0 and result.failed == 0
