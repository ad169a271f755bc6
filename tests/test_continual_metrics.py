"""Continual-learning metrics (mmscale.continual.metrics): every metric against hand arithmetic on a fixed 3x3
matrix and a single task, NaN rules, the text table, the heatmap PNG, and the errors for bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mmscale.continual import (
    as_accuracy_matrix,
    average_accuracy,
    average_accuracy_curve,
    average_forgetting,
    backward_transfer,
    forgetting_per_task,
    format_table,
    forward_transfer,
    plot_heatmap,
    summarize,
)

# R[i][j]: task j after training task i. Chosen so that wrong definitions give other numbers:
# - task 0 improves after task 1 (0.90 -> 0.95), so forgetting (from the best row) differs from -BWT (from the
#   diagonal);
# - task 1 scores 0.90 before it is trained (row 0) but 0.80 once trained, so a forgetting max that wrongly
#   starts at row 0 instead of row j gives 0.15, not 0.05;
# - the rows' averages over tasks seen so far differ from whole-row averages.
R = [
    [0.90, 0.90, 0.20],
    [0.95, 0.80, 0.40],
    [0.60, 0.75, 0.85],
]
BASELINE = [float("nan"), 0.50, 0.25]  # b_0 is never used, so NaN is allowed there
APPROX = dict(abs=1e-12)


def test_3x3_every_metric_by_hand():
    # ACC = (R[2][0] + R[2][1] + R[2][2]) / 3 = (0.60 + 0.75 + 0.85) / 3 = 2.20 / 3
    assert average_accuracy(R) == pytest.approx(2.20 / 3, **APPROX)
    # ACC_0 = R[0][0] = 0.90;  ACC_1 = (0.95 + 0.80) / 2 = 0.875;  ACC_2 = 2.20 / 3
    assert average_accuracy_curve(R) == pytest.approx([0.90, 0.875, 2.20 / 3], **APPROX)
    # BWT = ((R[2][0] - R[0][0]) + (R[2][1] - R[1][1])) / 2 = ((0.60 - 0.90) + (0.75 - 0.80)) / 2
    #     = (-0.30 - 0.05) / 2 = -0.175
    assert backward_transfer(R) == pytest.approx(-0.175, **APPROX)
    # FWT = ((R[0][1] - b_1) + (R[1][2] - b_2)) / 2 = ((0.90 - 0.50) + (0.40 - 0.25)) / 2 = (0.40 + 0.15) / 2
    assert forward_transfer(R, BASELINE) == pytest.approx(0.275, **APPROX)
    assert forward_transfer(R) is None
    # f_0 = max(R[0][0], R[1][0]) - R[2][0] = max(0.90, 0.95) - 0.60 = 0.35
    # f_1 = max(R[1][1]) - R[2][1] = 0.80 - 0.75 = 0.05          (row 0, before task 1 was trained, left out)
    assert forgetting_per_task(R) == pytest.approx([0.35, 0.05], **APPROX)
    # F = (0.35 + 0.05) / 2 = 0.20
    assert average_forgetting(R) == pytest.approx(0.20, **APPROX)


def test_summarize_3x3_is_plain_json():
    s = summarize(R, BASELINE)
    assert set(s) == {"num_tasks", "average_accuracy", "average_accuracy_curve", "backward_transfer",
                      "forward_transfer", "average_forgetting", "forgetting", "matrix"}
    assert s["num_tasks"] == 3
    assert s["average_accuracy"] == pytest.approx(2.20 / 3, **APPROX)
    assert s["average_accuracy_curve"] == pytest.approx([0.90, 0.875, 2.20 / 3], **APPROX)
    assert s["backward_transfer"] == pytest.approx(-0.175, **APPROX)
    assert s["forward_transfer"] == pytest.approx(0.275, **APPROX)
    assert s["average_forgetting"] == pytest.approx(0.20, **APPROX)
    assert s["forgetting"] == pytest.approx([0.35, 0.05], **APPROX)
    assert s["matrix"] == R
    # plain Python types (not NumPy scalars), and strict JSON round-trips it unchanged
    scalars = [s["average_accuracy"], s["backward_transfer"], s["forward_transfer"], s["average_forgetting"],
               *s["average_accuracy_curve"], *s["forgetting"], *(v for row in s["matrix"] for v in row)]
    assert all(type(v) is float for v in scalars), [type(v) for v in scalars]
    assert type(s["num_tasks"]) is int
    assert json.loads(json.dumps(s, allow_nan=False)) == s
    assert summarize(R)["forward_transfer"] is None


def test_summarize_losses_keeps_the_signs_meaning():
    """R of losses (lower is better): loss 1.0 on task 0 after it was learned, 3.0 after task 1."""
    L = [[1.0, 5.0], [3.0, 0.5]]
    s = summarize(L, lower_is_better=True)
    assert s["average_forgetting"] == pytest.approx(2.0, **APPROX)  # the loss went up by 2: forgotten
    assert s["backward_transfer"] == pytest.approx(-2.0, **APPROX)  # negative: the later task hurt
    assert s["average_accuracy"] == pytest.approx(1.75, **APPROX)  # the mean final loss
    assert s["average_accuracy_curve"] == pytest.approx([1.0, 1.75], **APPROX)
    assert s["matrix"] == L and s["lower_is_better"] is True


def test_numpy_and_torch_inputs_give_the_same_numbers():
    expected = summarize(R, BASELINE)
    assert summarize(np.array(R), np.array(BASELINE)) == expected
    assert summarize(torch.tensor(R, dtype=torch.float64), BASELINE) == expected


def test_single_task():
    one = [[0.42]]
    assert average_accuracy(one) == pytest.approx(0.42, **APPROX)
    assert average_accuracy_curve(one) == pytest.approx([0.42], **APPROX)
    assert backward_transfer(one) is None  # 1/(T-1) with T = 1: undefined
    assert forward_transfer(one, [0.1]) is None
    assert forgetting_per_task(one) == []
    assert average_forgetting(one) is None
    s = summarize(one, [0.1])
    assert s["num_tasks"] == 1 and s["matrix"] == [[0.42]]
    assert json.loads(json.dumps(s, allow_nan=False)) == s


def test_negative_forgetting_is_not_clamped():
    # task 0: 0.50 after it was trained, 0.70 at the end: f_0 = max(R[0][0]) - R[1][0] = 0.50 - 0.70 = -0.20
    up = [[0.50, float("nan")], [0.70, 0.90]]
    assert forgetting_per_task(up) == pytest.approx([-0.20], **APPROX)
    assert average_forgetting(up) == pytest.approx(-0.20, **APPROX)
    # BWT = R[1][0] - R[0][0] = 0.70 - 0.50 = 0.20
    assert backward_transfer(up) == pytest.approx(0.20, **APPROX)


def test_nan_above_the_diagonal_is_allowed():
    # R[0][2] (task 2 before task 1 was trained) is read by no metric: NaN there changes nothing
    r = [row[:] for row in R]
    r[0][2] = float("nan")
    s = summarize(r, BASELINE)
    ref = summarize(R, BASELINE)
    for key in ("average_accuracy", "average_accuracy_curve", "backward_transfer", "forward_transfer",
                "average_forgetting", "forgetting"):
        assert s[key] == ref[key], key
    assert s["matrix"][0] == [0.90, 0.90, None]  # NaN written as None: strict JSON
    json.dumps(s, allow_nan=False)
    assert "-" in format_table(r).splitlines()[2].split()


def test_nan_on_the_superdiagonal_without_and_with_a_baseline():
    # FWT reads R[j-1][j]: without a baseline it is not computed and NaN there is fine
    r = [row[:] for row in R]
    r[0][1] = float("nan")
    assert forward_transfer(r) is None
    assert summarize(r)["average_forgetting"] == pytest.approx(0.20, **APPROX)
    with pytest.raises(ValueError, match=r"R\[0\]\[1\]"):
        forward_transfer(r, BASELINE)
    with pytest.raises(ValueError, match=r"R\[0\]\[1\]"):
        summarize(r, BASELINE)


@pytest.mark.parametrize("cell", [(0, 0), (1, 0), (2, 1), (2, 2)])
def test_nan_on_or_below_the_diagonal_is_refused(cell):
    r = [row[:] for row in R]
    i, j = cell
    r[i][j] = float("nan")
    with pytest.raises(ValueError, match=rf"NaN at R\[{i}\]\[{j}\].*j <= i"):
        summarize(r)


@pytest.mark.parametrize("cell", [(0, 2), (1, 1), (2, 0)])
@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_infinite_values_are_refused_anywhere(cell, value):
    r = [row[:] for row in R]
    i, j = cell
    r[i][j] = value
    with pytest.raises(ValueError, match=rf"infinite value\(s\) at R\[{i}\]\[{j}\]"):
        average_accuracy(r)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([[0.9, 0.1, 0.2], [0.8, 0.7, 0.3]], r"must be square.*\(2, 3\)"),
        ([0.9, 0.8], r"must be 2-D.*1-D"),
        ([[[0.9]]], r"must be 2-D.*3-D"),
        (np.zeros((0, 0)), r"at least 1 task.*\(0, 0\)"),
        ([[0.9, 0.1], [0.8]], r"cannot read it as a T x T array"),
        ([["high", "low"], ["low", "high"]], r"cannot read it as a T x T array"),
    ],
    ids=["not-square", "1-D", "3-D", "empty", "ragged", "strings"],
)
def test_bad_matrices_are_refused_with_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        as_accuracy_matrix(bad)
    with pytest.raises(ValueError, match=message):
        summarize(bad)


def test_bad_baselines_and_task_names_are_refused():
    with pytest.raises(ValueError, match=r"one accuracy per task \(3, b_0 unused\), got shape \(2,\)"):
        forward_transfer(R, [0.5, 0.25])
    with pytest.raises(ValueError, match=r"not finite at j = \[2\]"):
        forward_transfer(R, [0.1, 0.5, float("nan")])
    with pytest.raises(ValueError, match=r"one accuracy per task \(1, b_0 unused\)"):
        forward_transfer([[0.4]], [0.1, 0.2])  # checked even where FWT is undefined
    with pytest.raises(ValueError, match=r"task_names: 2 name\(s\) for 3 task\(s\)"):
        format_table(R, task_names=["a", "b"])
    with pytest.raises(ValueError, match=r"task_names: 4 name\(s\) for 3 task\(s\)"):
        plot_heatmap(R, "unused.png", task_names=["a", "b", "c", "d"])


def test_format_table():
    text = format_table(R, task_names=["colours", "counts", "shapes"], baseline=BASELINE)
    lines = text.splitlines()
    assert lines[0].split() == ["after", "\\", "on", "colours", "counts", "shapes"]
    assert lines[2].split() == ["after", "colours", "0.9000", "0.9000", "0.2000"]
    assert lines[3].split() == ["after", "counts", "0.9500", "0.8000", "0.4000"]
    assert lines[4].split() == ["after", "shapes", "0.6000", "0.7500", "0.8500"]
    assert lines[5] == ""

    def line(prefix):
        (found,) = [x for x in lines[6:] if x.startswith(prefix)]
        return found

    assert line("ACC  (").endswith("0.7333")
    assert line("ACC after each task").split()[-3:] == ["0.9000", "0.8750", "0.7333"]
    assert line("BWT").endswith("-0.1750")
    assert line("FWT").endswith("0.2750")
    assert line("F ").endswith("0.2000")
    assert line("forgetting per task").endswith("colours 0.3500, counts 0.0500")
    assert format_table(R).splitlines()[0].split()[-2:] == ["task", "2"]  # default names
    assert "FWT  (forward transfer)                      - (no baseline)" in format_table(R).splitlines()
    single = format_table([[0.42]]).splitlines()
    assert single[2].split() == ["after", "task", "0", "0.4200"]
    assert "BWT  (backward transfer)                     - (single task)" in single
    assert not any(line.startswith("forgetting per task") for line in single)


@pytest.mark.parametrize("matrix", [R, [[0.42]], [[0.50, float("nan")], [0.70, 0.90]]], ids=["3x3", "1x1", "nan"])
def test_plot_heatmap_writes_a_png(tmp_path, matrix):
    out = tmp_path / "sub" / "heatmap.png"  # parent folder made on the way
    returned = plot_heatmap(matrix, out, task_names=[f"t{j}" for j in range(len(matrix))], title="test")
    assert returned == out
    assert out.stat().st_size > 1000
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.width > 200 and im.height > 200
        # more than a blank canvas: cells, text, colour bar
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 50


def test_plot_heatmap_writes_the_value_in_the_cell(tmp_path):
    # One task: the figure's one cell is its most common colour after the white background. Inside the cell's
    # box, the value "0.420" is written in white: without the text the box is one flat colour.
    out = plot_heatmap([[0.42]], tmp_path / "one.png")
    with Image.open(out) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    colours, counts = np.unique(rgb.reshape(-1, 3), axis=0, return_counts=True)
    by_count = colours[np.argsort(counts)[::-1]]
    assert (by_count[0] == 255).all()  # white background first
    cell = np.abs(rgb - by_count[1]).sum(-1) <= 3
    rows = np.nonzero(cell.sum(1) > cell.sum(1).max() / 2)[0]
    cols = np.nonzero(cell.sum(0) > cell.sum(0).max() / 2)[0]
    assert len(rows) > 100 and len(cols) > 100  # the cell is a large square
    box = rgb[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    white = (box > 240).all(-1).sum()
    assert white > 50, f"{white} white text pixels in the cell"
