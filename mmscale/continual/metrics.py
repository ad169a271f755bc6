"""Continual-learning metrics over an accuracy matrix.

The input is the accuracy matrix R of a run over T tasks trained one after another:

    R[i][j] = the metric (accuracy, or any score where higher is better) on task j's test set,
              measured after training on task i,        i, j in 0..T-1

Row i is one evaluation of every task after task i; the diagonal R[j][j] is task j just after it was learned;
entries below the diagonal (j < i) show what became of task j later; entries above it (j > i) measure tasks not
trained yet (forward transfer). Any scale works (0..1 or percent): every metric below is in R's units.

Which entries must be finite:

- on and below the diagonal (j <= i): always. Every metric here except FWT reads them, and a NaN there would
  silently change what an average means, so it is refused.
- above the diagonal (j > i): may be NaN ("not evaluated"; evaluating tasks before they are trained is optional).
  Only FWT reads them, and only the first superdiagonal R[j-1][j]: those must be finite when a baseline is given.
- +-inf: never.

Definitions (T tasks; the papers count from 1, here indices are 0-based):

- ACC, average accuracy after the last task (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual
  Learning", GEM, arXiv:1706.08840):   ACC = 1/T * sum_{j=0}^{T-1} R[T-1][j].
  Its curve: the average after each task i over the tasks seen so far, ACC_i = 1/(i+1) * sum_{j=0}^{i} R[i][j].
- BWT, backward transfer (GEM):   BWT = 1/(T-1) * sum_{j=0}^{T-2} (R[T-1][j] - R[j][j]).
  Negative: later tasks hurt earlier ones. Undefined (None) for T = 1.
- FWT, forward transfer (GEM), given b_j, task j's accuracy at random initialisation:
  FWT = 1/(T-1) * sum_{j=1}^{T-1} (R[j-1][j] - b_j). None without a baseline, or for T = 1.
- Forgetting (Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning: Understanding Forgetting and
  Intransigence", RWalk, arXiv:1801.10112): task j's forgetting after the last task is its best accuracy at an
  earlier evaluation minus its final accuracy,
      f_j = max_{l in [j, T-2]} R[l][j] - R[T-1][j],      j in 0..T-2,
  and the average forgetting F = 1/(T-1) * sum_{j=0}^{T-2} f_j (None for T = 1). RWalk writes the max over the
  earlier rows l < T-1; rows l < j come before task j was trained (and may be NaN here), so the max starts at
  row j: forgetting is measured from what the model had learned. f_j is not clamped at 0: a task that ends
  better than it ever was has negative forgetting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "as_accuracy_matrix",
    "average_accuracy",
    "average_accuracy_curve",
    "backward_transfer",
    "forward_transfer",
    "forgetting_per_task",
    "average_forgetting",
    "summarize",
    "format_table",
    "plot_heatmap",
]


def as_accuracy_matrix(R: Any) -> np.ndarray:
    """R (nested lists, a NumPy array or a CPU tensor) as a float64 (T, T) array, checked: 2-D, square, T >= 1,
    no +-inf anywhere, no NaN on or below the diagonal. Raises ValueError naming the problem."""
    try:
        a = np.array(R, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"accuracy matrix: cannot read it as a T x T array of numbers ({e})") from None
    if a.ndim != 2:
        raise ValueError(f"accuracy matrix must be 2-D (T x T, R[i][j] = task j after training task i), "
                         f"got {a.ndim}-D with shape {a.shape}")
    if a.shape[0] != a.shape[1]:
        raise ValueError(f"accuracy matrix must be square (T x T, R[i][j] = task j after training task i), "
                         f"got shape {a.shape}")
    if a.shape[0] < 1:
        raise ValueError(f"accuracy matrix needs at least 1 task, got shape {a.shape}")
    inf = np.argwhere(np.isinf(a))
    if len(inf):
        raise ValueError(f"accuracy matrix: infinite value(s) at {_cells(inf)}; use NaN for entries not evaluated "
                         f"(allowed only above the diagonal, j > i)")
    lower_nan = np.argwhere(np.isnan(a) & np.tri(a.shape[0], dtype=bool))
    if len(lower_nan):
        raise ValueError(f"accuracy matrix: NaN at {_cells(lower_nan)}; entries on or below the diagonal (j <= i: "
                         f"every task trained so far) must be evaluated, only j > i may be NaN")
    return a


def _cells(idx: np.ndarray, limit: int = 5) -> str:
    cells = [f"R[{i}][{j}]" for i, j in idx[:limit]]
    more = f" and {len(idx) - limit} more" if len(idx) > limit else ""
    return ", ".join(cells) + more


def average_accuracy(R: Any) -> float:
    """ACC = mean_j R[T-1][j]: the average over all tasks after training the last one (GEM)."""
    a = as_accuracy_matrix(R)
    return float(a[-1].mean())


def average_accuracy_curve(R: Any) -> list[float]:
    """[ACC_0, ..., ACC_{T-1}] with ACC_i = mean_{j <= i} R[i][j]: the average over the tasks seen so far, after
    each task. The last element is `average_accuracy(R)`."""
    a = as_accuracy_matrix(R)
    return [float(a[i, : i + 1].mean()) for i in range(a.shape[0])]


def backward_transfer(R: Any) -> float | None:
    """BWT = mean_{j < T-1} (R[T-1][j] - R[j][j]) (GEM); None for a single task."""
    a = as_accuracy_matrix(R)
    T = a.shape[0]
    if T == 1:
        return None
    return float(np.mean(a[-1, : T - 1] - np.diag(a)[: T - 1]))


def forward_transfer(R: Any, baseline: Sequence[float] | None = None) -> float | None:
    """FWT = mean_{j > 0} (R[j-1][j] - b_j) (GEM): how well task j does before it is trained, compared with
    `baseline[j]` = b_j, the accuracy of a randomly initialised model on task j. `baseline` has T entries; b_0 is
    not used (may be NaN). None without a baseline or for a single task. Raises ValueError if a superdiagonal
    entry R[j-1][j] it needs is NaN."""
    a = as_accuracy_matrix(R)
    T = a.shape[0]
    if baseline is None or T == 1:
        if baseline is not None:
            _baseline(baseline, T)  # still checked
        return None
    b = _baseline(baseline, T)
    before = np.array([a[j - 1, j] for j in range(1, T)])  # R[j-1][j], task j just before it is trained
    missing = [f"R[{j - 1}][{j}]" for j in range(1, T) if np.isnan(a[j - 1, j])]
    if missing:
        raise ValueError(f"forward transfer needs every task evaluated just before it is trained, R[j-1][j]; "
                         f"NaN at {', '.join(missing)} (pass baseline=None to skip FWT)")
    return float(np.mean(before - b[1:]))


def _baseline(baseline: Sequence[float], T: int) -> np.ndarray:
    try:
        b = np.array(baseline, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"baseline: cannot read it as {T} numbers ({e})") from None
    if b.shape != (T,):
        raise ValueError(f"baseline must hold one accuracy per task ({T}, b_0 unused), got shape {b.shape}")
    bad = [j for j in range(1, T) if not math.isfinite(b[j])]
    if bad:
        raise ValueError(f"baseline: b_j must be finite for j >= 1 (b_0 is not used); not finite at j = {bad}")
    return b


def forgetting_per_task(R: Any) -> list[float]:
    """[f_0, ..., f_{T-2}] with f_j = max_{l in [j, T-2]} R[l][j] - R[T-1][j] (RWalk, from row j on):
    task j's best accuracy before the last task minus its final one. Empty for a single task (the last task has
    no forgetting)."""
    a = as_accuracy_matrix(R)
    T = a.shape[0]
    return [float(a[j : T - 1, j].max() - a[T - 1, j]) for j in range(T - 1)]


def average_forgetting(R: Any) -> float | None:
    """F = mean_{j < T-1} f_j (RWalk, see `forgetting_per_task`); None for a single task."""
    f = forgetting_per_task(R)
    return float(np.mean(f)) if f else None


def summarize(R: Any, baseline: Sequence[float] | None = None, lower_is_better: bool = False) -> dict[str, Any]:
    """Every metric as plain floats, lists and None (JSON-serialisable with `allow_nan=False`):

    `num_tasks`, `average_accuracy` (ACC), `average_accuracy_curve`, `backward_transfer` (BWT, None for T = 1),
    `forward_transfer` (FWT, None without `baseline` or for T = 1), `average_forgetting` (None for T = 1),
    `forgetting` (per task 0..T-2), `matrix` (R as lists, NaN written as None).

    `lower_is_better` (R holds losses): the metrics are those of -R, so their signs keep their meaning (forgetting
    > 0: the loss went up from its best; BWT and FWT > 0: better than before), except that the "accuracy" average
    and curve are the mean losses themselves."""
    a = as_accuracy_matrix(R)
    sign = -1.0 if lower_is_better else 1.0
    s = a * sign
    base = None if baseline is None else [sign * b for b in baseline]
    return {
        "num_tasks": int(a.shape[0]),
        "average_accuracy": sign * average_accuracy(s),
        "average_accuracy_curve": [sign * v for v in average_accuracy_curve(s)],
        "backward_transfer": backward_transfer(s),
        "forward_transfer": forward_transfer(s, base),
        "average_forgetting": average_forgetting(s),
        "forgetting": forgetting_per_task(s),
        "matrix": [[None if math.isnan(v) else float(v) for v in row] for row in a.tolist()],
        **({"lower_is_better": True} if lower_is_better else {}),
    }


def _task_names(task_names: Sequence[str] | None, T: int) -> list[str]:
    if task_names is None:
        return [f"task {j}" for j in range(T)]
    names = [str(n) for n in task_names]
    if len(names) != T:
        raise ValueError(f"task_names: {len(names)} name(s) for {T} task(s): {names}")
    return names


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.{digits}f}"


def format_table(R: Any, task_names: Sequence[str] | None = None,
                 baseline: Sequence[float] | None = None) -> str:
    """R as a text table (rows: after training task i; columns: evaluated on task j; NaN shown as "-"), then one
    line per summary metric, for the log. Multi-line, no trailing newline."""
    a = as_accuracy_matrix(R)
    T = a.shape[0]
    names = _task_names(task_names, T)
    s = summarize(a, baseline)
    corner = "after \\ on"
    row_labels = [f"after {n}" for n in names]
    w0 = max(len(corner), *(len(x) for x in row_labels))
    cells = [[_fmt(v) for v in row] for row in a]
    widths = [max(len(names[j]), *(len(cells[i][j]) for i in range(T))) for j in range(T)]
    lines = ["  ".join([corner.ljust(w0)] + [names[j].rjust(widths[j]) for j in range(T)])]
    lines.append("-" * len(lines[0]))
    for i in range(T):
        lines.append("  ".join([row_labels[i].ljust(w0)] + [cells[i][j].rjust(widths[j]) for j in range(T)]))
    lines.append("")
    lines.append(f"ACC  (average accuracy after the last task)  {_fmt(s['average_accuracy'])}")
    lines.append("ACC after each task                          "
                 + " ".join(_fmt(v) for v in s["average_accuracy_curve"]))
    single = " (single task)" if T == 1 else ""
    lines.append(f"BWT  (backward transfer)                     {_fmt(s['backward_transfer'])}{single}")
    fwt = s["forward_transfer"]
    fwt_why = "" if fwt is not None else (single or " (no baseline)")
    lines.append(f"FWT  (forward transfer)                      {_fmt(fwt)}{fwt_why}")
    lines.append(f"F    (average forgetting)                    {_fmt(s['average_forgetting'])}{single}")
    if s["forgetting"]:
        lines.append("forgetting per task                          "
                     + ", ".join(f"{names[j]} {_fmt(v)}" for j, v in enumerate(s["forgetting"])))
    return "\n".join(lines)


def plot_heatmap(R: Any, path: str | Path, task_names: Sequence[str] | None = None,
                 title: str = "Accuracy matrix R[i][j]: task j after training task i") -> Path:
    """R as a PNG heatmap with each value written in its cell (NaN cells grey, "-"), ACC/BWT/F under the title.
    Draws on matplotlib's Agg canvas directly (no pyplot, no global backend switch). Creates missing parent
    folders; returns the path written."""
    a = as_accuracy_matrix(R)
    T = a.shape[0]
    names = _task_names(task_names, T)
    s = summarize(a)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    side = min(2.0 + 0.9 * T, 16.0)
    fig = Figure(figsize=(side + 1.5, side), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    finite = a[np.isfinite(a)]
    vmin, vmax = float(finite.min()), float(finite.max())
    if vmin == vmax:  # a constant matrix still gets a colour scale
        vmin, vmax = vmin - 0.5, vmax + 0.5
    im = ax.imshow(np.ma.masked_invalid(a), cmap=cmap, vmin=vmin, vmax=vmax)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fontsize = max(5.0, min(11.0, 60.0 / T))
    for i in range(T):
        for j in range(T):
            v = a[i, j]
            if math.isnan(v):
                ax.text(j, i, "-", ha="center", va="center", fontsize=fontsize, color="black")
            else:
                # dark text on the light end of viridis, white on the dark end
                light = (v - vmin) / (vmax - vmin) > 0.6
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=fontsize,
                        color="black" if light else "white")
    ax.set_xticks(range(T), names, rotation=45 if T > 4 else 0, ha="right" if T > 4 else "center")
    ax.set_yticks(range(T), names)
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task i")
    sub = f"ACC {_fmt(s['average_accuracy'], 3)}   BWT {_fmt(s['backward_transfer'], 3)}   " \
          f"F {_fmt(s['average_forgetting'], 3)}"
    ax.set_title(f"{title}\n{sub}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
