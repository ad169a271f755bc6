"""Rank 0's metric sinks: `{output_dir}/metrics.jsonl` (one JSON object per logged step), TensorBoard, a loss plot."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("mmscale.metrics")


class MetricsWriter:
    def __init__(self, output_dir: str | Path, enabled: bool, tensorboard: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
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
        with self.path.open("a") as f:  # appended: a resumed run continues the same file
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> int:
        """On resume: drop the records the interrupted run logged after the checkpoint it resumes from (they are
        about to be logged again, by this run). Rewritten atomically. Returns how many records were dropped."""
        if not (self.enabled and self.path.is_file()):
            return 0
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        keep = [line for line in lines if json.loads(line)["step"] <= step]
        if len(keep) != len(lines):
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            tmp.replace(self.path)
            log.info("metrics.jsonl: dropped %d record(s) logged after step %d by the interrupted run",
                     len(lines) - len(keep), step)
        return len(lines) - len(keep)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; after a resume, the last record of each step wins."""
    by_step: dict[tuple[int, bool], dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            by_step[(r["step"], "val_loss" not in r)] = r  # a training record may lack `loss` (a skipped step)
    return [by_step[k] for k in sorted(by_step)]


def plot_losses(metrics_path: str | Path, out_png: str | Path) -> Path | None:
    """Training and validation loss against step, as a PNG."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("next-token loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
