"""Rank 0's metric sinks: `{output_dir}/metrics.jsonl` (one JSON object per logged step), TensorBoard, a loss plot.

Each record is fsynced as it is appended, so every record up to a checkpoint survives a power loss with it. A crash
in the middle of an append can still leave a torn last line: readers drop it with a warning (and any other line
that is not a record, naming its line number), and the next append starts on a line of its own. An append that
fails (a full disk, EIO) stops the run with the OSError, naming the errno and metrics.jsonl.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from mmscale.training.checkpoint import raise_named, write_durably

log = logging.getLogger("mmscale.metrics")


class MetricsWriter:
    def __init__(self, output_dir: str | Path, enabled: bool, tensorboard: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tail_checked = False  # whether the file's last line was checked for a torn append (once per run)
        self.tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        try:
            with self.path.open("a") as f:  # appended: a resumed run continues the same file
                if not self._tail_checked:
                    self._tail_checked = True
                    if _ends_torn(self.path):  # a crash mid-append: the torn line stays alone (readers drop it)
                        f.write("\n")
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())  # a few ms per logged step: the record survives a power loss
        except OSError as e:  # (a full disk, EIO): the run stops; a torn line is dropped by the next resume
            raise_named(e, self.path)
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> int:
        """On resume: drop the records the interrupted run logged after the checkpoint it resumes from (they are
        about to be logged again, by this run). Rewritten atomically. Returns how many records were dropped."""
        if not (self.enabled and self.path.is_file()):
            return 0
        text = self.path.read_text(errors="replace")
        records = parse_records(text, self.path)
        keep = [line for _, line, r in records if r["step"] <= step]
        dropped = len(records) - len(keep)
        if dropped or len(records) != sum(1 for line in text.splitlines() if line.strip()) or \
                (text and not text.endswith("\n")):
            write_durably(self.path, "".join(line + "\n" for line in keep))
            self._tail_checked = True  # rewritten whole: it ends with a newline
            if dropped:
                log.info("metrics.jsonl: dropped %d record(s) logged after step %d by the interrupted run",
                         dropped, step)
        return dropped

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def _ends_torn(path: Path) -> bool:
    """Whether the file's last line lacks its newline (an append that did not finish)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def parse_records(text: str, where: str | Path = "metrics.jsonl") -> list[tuple[int, str, dict[str, Any]]]:
    """(line number, line, record) of every well-formed record. A torn last line (a crash or a full disk in the
    middle of an append) and any other line that is not a JSON object with an integer `step` are dropped with a
    warning that names the line: never a crash, which on resume would stop rank 0 alone."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            if not (isinstance(r, dict) and isinstance(r.get("step"), int)):
                raise ValueError("not a record with an integer step")
        except ValueError as e:
            if i == len(lines) and not text.endswith("\n"):
                log.warning("%s: dropped a torn last line %d (an append that did not finish: a crash or a full "
                            "disk): %.80r", where, i, line)
            else:
                log.warning("%s: dropped line %d, not a metrics record (%s): %.80r", where, i, e, line)
            continue
        out.append((i, line, r))
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; after a resume, the last record of each step wins."""
    by_step: dict[tuple[int, bool], dict[str, Any]] = {}
    for _, _, r in parse_records(Path(path).read_text(errors="replace"), path):
        # a training record and a validation record (its keys val_*) of the same step are kept apart
        by_step[(r["step"], not any(k.startswith("val_") for k in r))] = r
    return [by_step[k] for k in sorted(by_step)]


def plot_losses(metrics_path: str | Path, out_png: str | Path,
                series: tuple[tuple[str, str], ...] = (("loss", "val_loss"),)) -> Path | None:
    """Training and validation losses against step, as a PNG: one (training key, validation key) pair per
    objective (`series`; the trainer passes each objective's headline metrics)."""
    records = read_metrics(metrics_path)
    lines = []
    for train_key, val_key in series:
        train = [(r["step"], r[train_key]) for r in records if r.get(train_key) is not None]
        val = [(r["step"], r[val_key]) for r in records if r.get(val_key) is not None]
        lines += [(f"train {train_key}", "-", train), (f"{val_key}", "o-", val)]
    if not any(points for _, _, points in lines):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for label, style, points in lines:
        if points:
            ax.plot(*zip(*points), style, label=label, lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
