"""Continual learning callbacks: `replay` (experience replay from a disk-backed reservoir) and `distill` (dark
experience replay: the model's own logits, stored with each buffered sample, pull its later outputs back).

replay
------
Every sample the trainer trains on is offered to a `mmscale.continual.replay_buffer.ReservoirBuffer` under
`{output_dir}/replay` (each rank keeps its share of `capacity`; uniform over everything seen, or balanced per class
or per task). The buffer stores what a sample is made of, as read from the shards (image bytes, caption, `.cls`
label) plus the task it came from, never decoded tensors. Each micro batch gets `round(ratio * micro_batch_size)`
samples drawn from the buffer appended to it, decoded the way the training stream decodes, so the number of micro
batches per rank never changes (a rank's micro batch only grows; every rank replays the same number once its buffer
holds anything, which is from the second micro batch on, on every rank alike). The drawn samples are those of the
buffer before this micro batch's own samples join it.
The buffer commits with every checkpoint (its state, an index of a few bytes per slot, is in the checkpoint); a
resume continues with the same buffer, the same draws and the same decisions as an uninterrupted run.

distill
-------
With a `replay` in the same job, each sample entering the buffer carries the model's logits for it at that moment
(the classification head's, or the language model's top-k per caption token), as a member of the stored sample: no
second model in memory. When the sample is replayed, `weight * T^2 * KL(stored || now)` at temperature T is added
to the loss (over the classes the stored logits had active: LwF's restriction to old classes; or over the stored
top-k tokens of each caption position). Buzzega et al., "Dark Experience for General Continual Learning" (NeurIPS
2020) and Li & Hoiem, "Learning without Forgetting" (2016).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from mmscale.callbacks import register_callback
from mmscale.objectives import active_objectives
from mmscale.continual.replay_buffer import BALANCE_MEMBERS, ReservoirBuffer
from mmscale.media import bind_media
from mmscale.training.callbacks import Callback

log = logging.getLogger("mmscale.continual")

# members a batch row adds to its sample when it enters the buffer: (batch, out, rows) -> one dict per new row
MemberProvider = Callable[[dict[str, Any], Any, int], list[dict[str, bytes]]]


def _task_of(trainer: Any) -> int:
    return len(trainer.task_rows) if trainer.tasks is not None else 0


@register_callback("replay")
class Replay(Callback):
    """Experience replay: `capacity` samples over all ranks on disk, `ratio` replayed samples per new one."""

    needs_raw_samples = True  # the buffer stores what samples are made of, as read

    def __init__(self, capacity: int, ratio: float = 1.0, balance: str | None = None, directory: str = ""):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity={capacity!r}: the buffer's size over all ranks, an integer >= 1")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 16:
            raise ValueError(f"ratio={ratio!r}: replayed samples per new sample in each micro batch, a number in "
                             f"(0, 16] (1.0: as many replayed as new)")
        if balance is not None and balance not in BALANCE_MEMBERS:
            raise ValueError(f"balance={balance!r}: null (uniform over everything seen), 'class' or 'task'")
        if not isinstance(directory, str):
            raise TypeError(f"directory={directory!r}: a path (empty: {{output_dir}}/replay)")
        self.capacity, self.ratio, self.balance, self.directory = capacity, float(ratio), balance, directory
        self.buffer: ReservoirBuffer | None = None
        self.providers: list[MemberProvider] = []  # distill adds the model's logits to what is stored
        self.replayed = 0  # samples replayed by this rank in this process
        self._pending: dict[str, Any] | None = None  # a checkpoint's state, loaded before the buffer exists
        self._new: list[dict[str, Any]] = []
        self._data_cfg = self._tokenizer = None
        self._media: list = []
        self._k = 0

    def config_problems(self, cfg: Any) -> list[str]:
        problems = []
        if round(self.ratio * cfg.train.micro_batch_size) < 1:
            problems.append(f"ratio {self.ratio} x train.micro_batch_size {cfg.train.micro_batch_size} rounds to "
                            f"no replayed sample per micro batch; raise ratio to at least "
                            f"{0.5 / cfg.train.micro_batch_size:.3g}")
        if self.balance == "class" and cfg.model.num_classes <= 0:
            problems.append("balance: 'class' groups samples by their .cls label, which only a classification "
                            "head reads; set model.num_classes or use balance: task / null")
        if self.balance == "task" and not cfg.continual.tasks:
            problems.append("balance: 'task' needs a task sequence (continual.tasks); use balance: null")
        return problems

    # ------------------------------------------------------------------------------------------- events

    def on_train_start(self, trainer: Any) -> None:
        cfg = trainer.cfg
        if self.capacity < trainer.world_size:
            raise ValueError(f"callbacks replay: capacity {self.capacity} < {trainer.world_size} ranks; every rank "
                             f"keeps capacity // world_size samples, so give at least one per rank")
        root = Path(self.directory) if self.directory else trainer.output_dir / "replay"
        if self._pending is None:  # a fresh run: what an earlier run left here is not this run's buffer
            shutil.rmtree(root / f"rank{trainer.rank}", ignore_errors=True)
        t = cfg.train
        # a resume may fall back to any kept checkpoint (the newest may be damaged): their buffer states stay usable
        keep = t.keep_checkpoints + (1 if t.keep_best else 0) + 2
        self.buffer = ReservoirBuffer(root, self.capacity, trainer.rank, trainer.world_size, seed=t.seed,
                                      balance=self.balance, keep_commits=keep)
        if self._pending is not None:
            self.buffer.load_state_dict(self._pending["buffer"])
            self.replayed = int(self._pending.get("replayed", 0))
            self._pending = None
        self._data_cfg, self._tokenizer = cfg.data, trainer.tokenizer
        self._media = bind_media(cfg, trainer.tokenizer)  # a replayed video or sound decodes as it did in training
        self._k = max(1, round(self.ratio * t.micro_batch_size))
        if trainer.is_main:
            log.info("replay: %d samples over %d rank(s) in %s (%s), %d replayed per micro batch of %d; rank 0 holds "
                     "%d of %d seen", self.capacity, trainer.world_size, root, self.balance or "uniform", self._k,
                     t.micro_batch_size, len(self.buffer), self.buffer.seen)

    def on_batch(self, trainer: Any, batch: dict[str, Any]) -> dict[str, Any]:
        from mmscale.data.collate import collate_samples
        from mmscale.data.decode import decode_for_training
        from mmscale.data.reading import SampleError

        if "__raw__" not in batch:
            raise RuntimeError("callbacks replay: the training batch carries no raw samples (`__raw__`); replay "
                               "needs mmscale's TrainLoader (or batches with `__raw__`, one member dict per row)")
        self._new = batch["__raw__"]
        if not len(self.buffer):
            return batch
        drawn = self.buffer.sample(self._k)
        try:
            samples = [decode_for_training(r, self._data_cfg, self._tokenizer, 0, self._media) for r in drawn]
        except SampleError as e:  # it decoded when it was trained on: the buffer's files changed since
            raise RuntimeError(f"callbacks replay: a buffered sample no longer decodes ({e}); the buffer under "
                               f"{self.buffer.root} is damaged") from None
        tok = self._tokenizer
        extra = collate_samples(samples, pad_id=tok.pad_id, image_token_id=tok.image_token_id,
                                max_images=self._data_cfg.max_images, seq_len=batch["input_ids"].shape[1],
                                media=self._media, image_shape=tuple(batch["pixel_values"].shape[2:]))
        out = dict(batch)
        for key, value in extra.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                out[key] = torch.cat([batch[key], value])
        out["__key__"] = list(batch["__key__"]) + [f"replay:{r.get('src_key', r['__key__'])}" for r in drawn]
        out["__replay__"] = drawn
        self.replayed += len(drawn)
        return out

    def on_loss(self, trainer: Any, batch: dict[str, Any], out: Any, loss: torch.Tensor) -> torch.Tensor:
        rows, task = self._new, _task_of(trainer)
        extras = [provide(batch, out, len(rows)) for provide in self.providers]
        for i, raw in enumerate(rows):
            sample = {**raw, "task": task}
            for extra in extras:
                sample.update(extra[i])
            self.buffer.add(sample)
        self._new = []
        return loss

    def on_task_end(self, trainer: Any, task: int, row: list[float]) -> None:
        if trainer.is_main:
            groups = self.buffer.group_counts()
            log.info("replay after task %d: rank 0 holds %d samples of %d seen%s; %d replayed so far", task,
                     len(self.buffer), self.buffer.seen, f", per {self.balance} {groups}" if groups else "",
                     self.replayed)

    # ------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        if self.buffer is None:  # saved before training started: what was loaded, unchanged
            return dict(self._pending or {})
        return {"buffer": self.buffer.state_dict(), "replayed": self.replayed}  # commits the buffer first

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.buffer is None:  # a resume: the buffer opens in on_train_start
            self._pending = state
            return
        self.buffer.load_state_dict(state["buffer"])  # a rollback to a checkpoint mid-run
        self.replayed = int(state.get("replayed", 0))


# ----------------------------------------------------------------------------------------------- distill


def _class_targets(out: Any, rows: int) -> list[dict[str, bytes]]:
    logits = out.terms["classification"]["logits"][:rows].detach().float().cpu().numpy()
    return [{"logits": row.astype("<f4").tobytes()} for row in logits]


def _lm_targets(out: Any, batch: dict[str, Any], rows: int, k: int) -> list[dict[str, bytes]]:
    """Top-k logits of each caption position (position t predicts token t + 1); index -1 where no token is due."""
    logits = out.logits[:rows, :-1].detach().float()
    values, index = logits.topk(k, dim=-1)  # (rows, L-1, k)
    due = (batch["labels"][:rows, 1:] != -100).unsqueeze(-1).to(index.device)
    index = torch.where(due, index, torch.full_like(index, -1))
    values, index = values.cpu().numpy(), index.cpu().numpy()
    return [{"logits": v.astype("<f4").tobytes(), "logits_idx": i.astype("<i4").tobytes()}
            for v, i in zip(values, index)]


def class_distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row KL(softmax(teacher / T) || softmax(student / T)) over the classes the teacher had active (its masked
    classes hold the dtype's lowest value), times T^2. (rows,)"""
    active = teacher > torch.finfo(torch.float32).min / 2
    logp = torch.log_softmax(teacher.masked_fill(~active, float("-inf")) / temperature, dim=-1)
    logq = torch.log_softmax(student.float().masked_fill(~active, float("-inf")) / temperature, dim=-1)
    diff = torch.where(active, logp - logq, torch.zeros_like(logp))
    return (logp.exp() * diff).sum(-1) * temperature**2


def topk_distill_loss(student: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Per row mean over its due positions of KL(teacher's top-k || student) at temperature T, times T^2: the
    teacher is softmax over its k stored logits, the student's log-probabilities are of its full softmax at those
    k tokens. `student` (rows, P, V), `values`/`index` (rows, P, k) with index -1 at positions with no token due."""
    due = index[..., 0] >= 0  # (rows, P)
    logq = torch.log_softmax(student.float() / temperature, dim=-1).gather(-1, index.clamp(min=0))
    logp = torch.log_softmax(values / temperature, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1) * due  # (rows, P)
    return kl.sum(-1) / due.sum(-1).clamp(min=1) * temperature**2


@register_callback("distill")
class Distill(Callback):
    """Dark experience replay: the logits of each buffered sample stored with it, a KL term towards them."""

    TARGETS = ("auto", "class", "lm")

    def __init__(self, weight: float = 1.0, temperature: float = 2.0, target: str = "auto", top_k: int = 16):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"weight={weight!r}: the KL term's factor, a number > 0")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature={temperature!r}: a number > 0 (1: the logits as they are)")
        if target not in self.TARGETS:
            raise ValueError(f"target={target!r}: 'class' (the classification head), 'lm' (the caption tokens' "
                             f"top-k logits) or 'auto' (class when the classification objective trains, else lm)")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k={top_k!r}: logits kept per caption position (target lm), an integer >= 1")
        self.weight, self.temperature, self.target, self.top_k = float(weight), float(temperature), target, top_k
        self._window: list[float] = []  # the KL terms of this step's micro batches

    def _target(self, cfg: Any) -> str:
        if self.target != "auto":
            return self.target
        active = active_objectives(cfg)
        return "class" if "classification" in active and (active["classification"] or {}).get("weight", 1.0) > 0 \
            else "lm"

    def config_problems(self, cfg: Any) -> list[str]:
        problems = []
        if not any(spec.name == "replay" for spec in cfg.callbacks):
            problems.append("distill stores its logits with the replayed samples: add a replay callback, e.g. "
                            "callbacks=[{name: replay, args: {capacity: 500}}, {name: distill}]")
        if self._target(cfg) == "class" and "classification" not in active_objectives(cfg):
            problems.append("target: 'class' distills the classification head's logits; add the classification "
                            "objective (objectives.classification.weight=1, with model.num_classes)")
        return problems

    def on_train_start(self, trainer: Any) -> None:
        replays = [cb for cb in trainer.callbacks if isinstance(cb, Replay)]
        self._kind = self._target(trainer.cfg)
        for replay in replays:  # every buffer stores the logits of what enters it
            replay.providers.append(self._members)

    def _members(self, batch: dict[str, Any], out: Any, rows: int) -> list[dict[str, bytes]]:
        if self._kind == "class":
            return _class_targets(out, rows)
        return _lm_targets(out, batch, rows, min(self.top_k, out.logits.shape[-1]))

    def on_loss(self, trainer: Any, batch: dict[str, Any], out: Any, loss: torch.Tensor) -> torch.Tensor:
        drawn = batch.get("__replay__")
        if not drawn:
            return loss
        first = len(batch["__raw__"])  # replayed rows follow the new ones
        rows = [i for i, r in enumerate(drawn) if "logits" in r]  # stored before distill was on: none
        if not rows:
            return loss
        at = torch.tensor([first + i for i in rows])
        if self._kind == "class":
            teacher = torch.from_numpy(np.stack([np.frombuffer(drawn[i]["logits"], "<f4") for i in rows]))
            class_logits = out.terms["classification"]["logits"]
            student = class_logits[at.to(class_logits.device)]
            kl = class_distill_loss(student, teacher.to(student.device), self.temperature)
        else:
            positions = out.logits.shape[1] - 1
            shape = (len(rows), positions, -1)
            values = torch.from_numpy(np.stack([np.frombuffer(drawn[i]["logits"], "<f4") for i in rows])).view(shape)
            index = torch.from_numpy(np.stack([np.frombuffer(drawn[i]["logits_idx"], "<i4") for i in rows])
                                     ).view(shape).long()
            student = out.logits[at.to(out.logits.device), :-1]
            kl = topk_distill_loss(student, values.to(student.device), index.to(student.device), self.temperature)
        # a mean over this micro batch's replayed samples: the engine's averaging over micro batches and ranks
        # makes it the mean over the step's (every rank replays as many per micro batch)
        term = self.weight * kl.sum() / len(drawn)
        self._window.append(float(term.detach()))
        return loss + term.to(loss.dtype)

    def on_step_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        if self._window:  # this rank's (rank 0's, in the log) mean KL term over the step's micro batches
            metrics["distill_loss"] = sum(self._window) / len(self._window)
            self._window = []
