"""The training loop: small, named steps over an `Engine`.

    train_step:  grad_accum micro batches -> forward_backward_step each -> one optimizer step
    evaluate:    held-out micro batches -> token-weighted mean loss over all ranks
    save/resume: DeepSpeed shards + trainer state (step, data position, callbacks, RNG) per rank + a manifest
    guard:       a step with a non-finite loss or gradient norm is skipped on every rank and counted; several in
                 a row roll back to the last checkpoint at a lower learning rate (or stop)

Data is any object with `__iter__`, `state_dict()` and `load_state_dict()` (mmscale.data's loaders are): the data
position is checkpointed state like the weights.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import re
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tqdm import tqdm

from mmscale.config import JobConfig
from mmscale.data.reading import BAD_KINDS, NETWORK_RETRY, BadDataError, BadInputMonitor
from mmscale.media import media_input_keys
from mmscale.training import checkpoint
from mmscale.training import cluster, run_paths
from mmscale.training.callbacks import Callback
from mmscale.training.engine import (  # PeerFailureError: the launchers import it from here
    Engine, PeerFailureError, Rank0FailedError, all_gather_object, all_reduce_sum, barrier, broadcast_object,
    param_dtype, rank0_done, rank0_failure, rank0_work, rendezvous_store,
)
from mmscale.training.metrics import MetricsWriter, plot_losses

log = logging.getLogger("mmscale.trainer")

SKIP_KINDS = (*BAD_KINDS, NETWORK_RETRY)
"""What the data pipeline counts, by kind: the bad inputs it skipped and the network reads it retried."""

MODEL_INPUTS = ("pixel_values", "image_mask", "input_ids", "attention_mask", "media_index", "labels", "class_labels",
                *media_input_keys())
"""What the model's forward takes from a batch: the text's and the images' tensors, and whatever the registered media
put in it (mmscale.media: `{name}_values`, `{name}_mask`, `{name}_slot`), passed without naming any."""


class ResumeError(RuntimeError):
    """No checkpoint this run can continue from; raised on every rank alike, before any collective load."""


class CheckpointUnreadableError(ResumeError):
    """A checkpoint could not be judged: a file that cannot be read after retries (the storage: EIO, ESTALE,
    EACCES, out of memory), one that would run code when unpickled, or one that verifies yet does not load. Nothing
    is set aside (none of these proves the checkpoint damaged); every rank stops alike, before any collective load."""


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row, and the config says stop (or there is nothing to roll back to)."""


def signal_name(signum: int | None) -> str:
    import signal

    return signal.Signals(signum).name if signum else "a signal another rank received"


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values (numpy's array becomes a tensor): loads with weights_only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def load_trainer_state(path: Path) -> dict[str, Any]:
    """A trainer state file: tensors and plain values only (`weights_only`; a file naming anything else raises
    UnsafeCheckpointError), the read retried as verification retries it (checkpoint.read_retrying)."""
    from mmscale.training.zero_checkpoint import safe_load

    return checkpoint.read_retrying(path, lambda: safe_load(path))


def set_rng_state(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# What a resume may not change (the data loader checks its own position's terms): the model, its precision and
# sharding, the seed, and what turns a sample into the model's inputs: the preprocessing here, the tokenizer by its
# digest (`tokenizer_problems`; its path may change, a moved run's does). Everything else (lr, max_steps, logging,
# ...) may change and is logged.
_FIXED_ON_RESUME = ("model", "train.precision", "train.seed", "deepspeed.zero_stage", "data.image_size",
                    "data.image_mean", "data.image_std", "data.max_text_len", "media")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) and v else {key: v})
    return out


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Refusals for changes a checkpoint cannot survive; other changes are logged, one line each. A field the
    checkpoint's config does not have (added to mmscale since) is no change while it holds its default."""
    old, new = _flatten(saved), _flatten(now)
    defaults = _flatten(JobConfig().to_dict())
    refused = []
    for key in sorted(set(old) | set(new)):
        if key.startswith("output_dir") or old.get(key) == new.get(key):
            continue
        if key not in old and key in defaults and new.get(key) == defaults[key]:
            continue
        line = f"{key}: {old.get(key, '(unset)')!r} at the checkpoint, {new.get(key, '(unset)')!r} now"
        if key != "model.init_from" and any(key == f or key.startswith(f + ".") for f in _FIXED_ON_RESUME):
            refused.append(f"{line}; resume with {key}={old.get(key)!r}, or start a new run in another output_dir")
        else:
            log.info("resume: %s", line)
    return refused


_TOKENIZER_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab.*|merges.*|"
                              r".*\.model|.*\.tiktoken)$")


def tokenizer_digest(path: str | Path) -> str:
    """SHA-256 of what makes a tokenizer (the ids it gives): a sentencepiece `.model` file's bytes (a folder holding
    only `tokenizer.model` counts as that file), or a Hugging Face tokenizer folder's tokenizer files, names and
    bytes (not model weights that may share the folder). "" when there is no such file or folder."""
    import hashlib

    p = Path(path) if path else None
    if p is None or not p.exists():
        return ""
    if p.is_dir() and not any((p / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        p = p / "tokenizer.model"  # (as mmscale.data.load_tokenizer reads such a folder)
    if p.is_file():
        return checkpoint.sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.iterdir() if q.is_file() and _TOKENIZER_FILES.match(q.name)):
        h.update(f"{f.name}\0{checkpoint.sha256_file(f)}\n".encode())
    return h.hexdigest()


def tokenizer_problems(saved: dict[str, str] | None, now: dict[str, str], run_dir: Path) -> list[str]:
    """A checkpoint continues only with the tokenizer it was trained with, compared by digest: the same ids for the
    same text. Its path may differ (a moved run, a copy). Checkpoints from before the digest was recorded: no check."""
    if not saved or not saved.get("sha256") or not now.get("sha256") or saved["sha256"] == now["sha256"]:
        return []

    def where(record: dict[str, str]) -> str:  # a recorded (portable) path, where the run is now
        return run_paths.resolve_config({"output_dir": ".", "data": {"tokenizer": record.get("path", "")}},
                                        run_dir)["data"]["tokenizer"]

    was, old, new = where(saved), saved["sha256"][:16], now["sha256"][:16]
    return [f"data.tokenizer: the checkpoint was trained with the tokenizer {was!r} (sha256 {old}...), this run's "
            f"{where(now)!r} is another one (sha256 {new}...): the same text would give other token ids; resume "
            f"with data.tokenizer={was!r} (or an identical copy of it), or start a new run in another output_dir"]


def callback_key(index: int, cb: Callback) -> str:
    """Where a callback's state lives in the trainer state: its place in `callbacks:` and its name, so that two
    instances of one callback (two early stoppings on different metrics) keep separate states."""
    return f"{index}:{cb.name}"


def frozen_problems(saved: str, built: str, name: str, cfg: JobConfig) -> list[str]:
    """A checkpoint that left the frozen weights out (`saved` is their fingerprint) continues only with the same
    frozen weights, rebuilt from the same sources; one that holds them only into a run that expects them."""
    if saved == built:
        return []
    sources = f"model.init_from={cfg.model.init_from!r}, model.lm.path={cfg.model.lm.path!r}"
    if not saved:
        return [f"{name} holds the frozen weights, this run's fine-tuning method leaves them out of checkpoints; "
                f"resume with the callbacks the checkpoint was saved with"]
    if not built:
        return [f"{name} holds only the trainable weights, this run expects every weight in the checkpoint; "
                f"resume with the callbacks the checkpoint was saved with"]
    return [f"{name} holds only the trainable weights, and the frozen weights this run built ({sources}) are not "
            f"the ones it was trained on (fingerprint {built[:16]}... vs {saved[:16]}...); resume with the base "
            f"weights it started from"]


def format_metrics(metrics: dict[str, Any]) -> str:
    """`name value` pairs of a metrics record's numbers (lists and nested records left out)."""
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)) or "no figures"


class Trainer:
    def __init__(
        self,
        cfg: JobConfig,
        engine: Engine,
        train_data: Any,
        eval_data: Iterable[dict[str, Any]] | None = None,
        callbacks: list[Callback] | None = None,
        tokenizer: Any = None,
        tasks: Any = None,
    ):
        self.cfg = cfg
        self.tokenizer = tokenizer  # for callbacks that decode or generate
        self.engine = engine
        self.train_data = train_data
        self.eval_data = eval_data
        self.callbacks = callbacks or []
        self.tasks = tasks  # a continual-learning sequence (mmscale.continual.sequence.Tasks), or None
        self.task_rows: list[list[float]] = []  # R[i][j]: the metric on task j after task i
        self.rank, self.world_size = engine.rank, engine.world_size
        self.is_main = self.rank == 0
        self.output_dir = Path(cfg.output_dir)
        self.ckpt_root = self.output_dir / "checkpoints"
        self.step = 0
        self.samples_seen = 0
        self.tokens_seen = 0
        self.data_skipped = 0
        self.data_skipped_by_kind: dict[str, int] = {k: 0 for k in SKIP_KINDS}  # this rank's, over the run
        # stops the run when too much of the input is bad (mmscale.data.reading); its verdict is shared each step
        self._bad_input = BadInputMonitor(cfg.data.max_bad_fraction, cfg.data.bad_window)
        self._bad_problem: str | None = None
        self.nonfinite_steps = 0  # steps skipped for a non-finite loss or gradient norm, over the whole run
        self.rollbacks = 0
        self.lr_scale = 1.0  # product of the rollbacks' factors
        self._nonfinite_in_a_row = 0
        self.last_eval: dict[str, float] = {}
        self.should_stop = False
        self.preempted: str | None = None  # the signal's name when a preemption signal stopped the run
        self._signals = cluster.STOP_SIGNALS
        self._stop_agreed = False
        self.metrics = MetricsWriter(cfg.output_dir, enabled=self.is_main, tensorboard=cfg.logging.tensorboard)
        self.history: list[dict[str, float]] = []  # this process's logged records (tests and benchmarks read it)
        self._data_iter = None
        self._window = self._empty_window()
        self._dtype = param_dtype(cfg)  # inputs in the parameters' dtype
        self._tokenizer: dict[str, str] | None = None  # what the tokenizer is, for the manifest (_tokenizer_record)

    # ------------------------------------------------------------------------------------------- steps

    def _to_device(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {}
        for k in MODEL_INPUTS:
            if k not in batch:  # class_labels: only batches from the data pipeline; a medium's: when configured
                continue
            t = batch[k]
            out[k] = t.to(self.engine.device, dtype=self._dtype if t.is_floating_point() else None, non_blocking=True)
        return out

    def next_batch(self) -> dict[str, Any]:
        batch = next(self._data_iter)
        if "num_skipped" in batch:
            self.data_skipped += int(batch["num_skipped"])
        kinds = batch.get("skipped_by_kind")
        if kinds is not None:
            for k, n in kinds.items():
                self.data_skipped_by_kind[k] = self.data_skipped_by_kind.get(k, 0) + int(n)
            if self._bad_problem is None:
                try:
                    self._bad_input.update(len(batch["__key__"]), kinds)
                except BadDataError as e:
                    self._bad_problem = str(e)
        for cb in self.callbacks:
            batch = cb.on_batch(self, batch)
        return batch

    @property
    def objectives(self) -> dict[str, Any]:
        """The model's objectives (mmscale.objectives), in their order: what the steps sum, never named here."""
        return dict(self.engine.module.objectives.items())

    def _empty_window(self) -> dict[str, Any]:
        return {"tokens": 0.0, "time": 0.0, "steps": 0, "callbacks": {},
                "objectives": {name: {**{k: 0.0 for k in o.sums}, "count": 0.0} for name, o in self.objectives.items()}}

    def forward_backward_step(self, batch: dict[str, Any], scales: dict[str, float]) -> dict[str, dict[str, float]]:
        """One micro batch: the sum over the objectives of their loss_sum times `scales[name]` (see train_step).
        Returns each objective's detached local sums."""
        inputs = self._to_device(batch)
        out = self.engine.forward(**inputs)
        # every objective is in the graph, weight 0 included (scale 0): every rank's ZeRO-3 hooks see the same graph
        loss = sum(out.terms[name]["loss_sum"] * scale for name, scale in scales.items())
        for cb in self.callbacks:
            loss = cb.on_loss(self, batch, out, loss)
        self.engine.backward(loss)
        if self.engine.at_boundary:  # the step's gradients are complete and not yet applied
            for cb in self.callbacks:
                cb.on_gradients(self)
        self.engine.step()  # a no-op for weights until the accumulation boundary
        return {name: {k: float(out.terms[name][k].detach().float()) for k in o.sums}
                for name, o in self.objectives.items()}

    def train_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        micro = [self.next_batch() for _ in range(self.engine.grad_accum)]
        objectives = self.objectives
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)  # throughput, whatever is trained
        local_counts = [sum(o.count(b) for b in micro) for o in objectives.values()]
        # Each objective k: global_avg_loss_k = sum over ranks and micro batches of loss_sum_k / global_count_k (its
        # count: target tokens, labelled samples, image-text pairs; see mmscale.objectives.base). DeepSpeed divides
        # each backward by grad_accum and averages gradients over world_size, so each micro batch's loss_sum_k is
        # pre-scaled by weight_k * grad_accum * world_size / global_count_k (Objective.scale). One tiny all-reduce
        # per step for every count; it also carries whether any rank received a preemption signal, so that all
        # ranks stop after the same step, and whether any rank saw too much bad input.
        *global_counts, global_tokens, stop, bad = all_reduce_sum(
            [*local_counts, local_tokens, float(self._signals.received is not None),
             float(self._bad_problem is not None)]).tolist()
        self._stop_agreed = self._stop_agreed or stop > 0
        if bad > 0:  # too much bad input on some rank: every rank stops here, with that rank's message
            problems = [p for p in all_gather_object(self._bad_problem) if p]
            raise BadDataError(f"step {self.step + 1}: {problems[0]}")
        scales = {name: o.scale(n, self.engine.grad_accum, self.world_size)
                  for (name, o), n in zip(objectives.items(), global_counts)}
        sums = [self.forward_backward_step(b, scales) for b in micro]
        # A non-finite loss on any rank makes the all-reduced gradient norm non-finite, and DeepSpeed then skips
        # the step on every rank alike (mmscale's stage-0 optimizer does the same): the verdict is global.
        applied = self.engine.step_applied
        self.step += 1
        dt = time.perf_counter() - t0
        self.samples_seen += self.cfg.train.global_batch_size
        self.tokens_seen += int(global_tokens)
        w = self._window
        if applied:
            w["tokens"] += local_tokens
            for (name, o), n in zip(objectives.items(), local_counts):
                acc = w["objectives"][name]
                acc["count"] += n
                for k in o.sums:
                    acc[k] += sum(s[name][k] for s in sums)
            self._nonfinite_in_a_row = 0
        else:
            self.nonfinite_steps += 1
            self._nonfinite_in_a_row += 1
            log.warning("step %d skipped: non-finite loss or gradient norm (local loss sums %s); %d in a row",
                        self.step, {name: sum(s[name]["loss_sum"] for s in sums) for name in objectives},
                        self._nonfinite_in_a_row)
        w["time"] += dt
        w["steps"] += 1
        return {"step_time": dt, "step_applied": float(applied)}

    def _guard(self) -> None:
        """After a step: act on `max_nonfinite_steps` non-finite steps in a row (the count is the same on every
        rank, so every rank takes the same branch)."""
        t = self.cfg.train
        if self._nonfinite_in_a_row < t.max_nonfinite_steps:
            return
        if t.on_nonfinite == "stop":
            raise NonFiniteError(
                f"{self._nonfinite_in_a_row} non-finite steps in a row at step {self.step} ({self.nonfinite_steps} "
                f"in the run); stopping as train.on_nonfinite=stop says. Lower train.lr (now {t.lr}), check the "
                f"data, or set train.on_nonfinite=rollback"
            )
        self._rollback()

    def _add_callback_metrics(self, step_metrics: dict[str, float]) -> None:
        """What callbacks added to a step's metrics (EWC's penalty, ...): logged as their mean over the window."""
        sums = self._window["callbacks"]
        for key, value in step_metrics.items():
            if key not in ("step_time", "step_applied") and isinstance(value, (int, float)):
                total, n = sums.get(key, (0.0, 0))
                sums[key] = (total + float(value), n + 1)

    def _flush_window(self) -> dict[str, float]:
        """Global mean losses and throughput over the steps since the last log (one all-reduce)."""
        w = self._window
        names = [(name, k) for name, acc in w["objectives"].items() for k in acc]  # each objective's sums and count
        totals = all_reduce_sum([w["tokens"], self.data_skipped, *(w["objectives"][n][k] for n, k in names),
                                 *(self.data_skipped_by_kind.get(k, 0) for k in SKIP_KINDS)]).tolist()
        tokens, skipped = totals[:2]
        reduced: dict[str, dict[str, float]] = {}
        for (name, k), v in zip(names, totals[2:2 + len(names)]):
            reduced.setdefault(name, {})[k] = v
        by_kind = {f"data_skipped_{k}": int(n) for k, n in zip(SKIP_KINDS, totals[2 + len(names):]) if n}
        steps, secs = w["steps"], w["time"]
        self._window = self._empty_window()
        losses: dict[str, Any] = {}
        for name, o in self.objectives.items():
            count = reduced[name].pop("count")
            losses.update(o.step_metrics(reduced[name], count))
        return {
            **losses,
            "lr": self.engine.lr,
            "grad_norm": self.engine.grad_norm(),
            "samples_per_s": steps * self.cfg.train.global_batch_size / secs,
            "tokens_per_s": tokens / secs,
            "step_time_s": secs / steps,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "data_skipped": int(skipped),
            **by_kind,  # what was skipped (and retried), by kind, over the run: only the kinds seen
            "nonfinite_steps": self.nonfinite_steps,
            "rollbacks": self.rollbacks,
            **{key: total / n for key, (total, n) in w["callbacks"].items()},
        }

    def evaluate(self) -> dict[str, float]:
        """Validation on `eval_data`: the metrics, which callbacks see and the next checkpoint records."""
        if self.eval_data is None:
            return {}
        metrics = self.measure(self.eval_data)
        if self.is_main:  # each validation's figures in one line
            log.info("step %d validation: %s", self.step, format_metrics(metrics))
        for cb in self.callbacks:
            cb.on_eval_end(self, metrics)
        self.last_eval = {"step": self.step, **metrics}  # recorded in the manifest of a checkpoint at this step
        return metrics

    @torch.no_grad()
    def measure(self, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """Every objective's validation metrics over `batches`, over all ranks (each objective reduces its own).
        A measurement only: no callback sees it (a task sequence measures every task this way)."""
        self.engine.train(False)
        objectives = self.objectives
        states = {name: o.eval_start() for name, o in objectives.items()}
        for batch in batches:  # re-iterable: the same batches every evaluation
            out = self.engine.forward(**self._to_device(batch))
            for name, o in objectives.items():
                o.eval_update(states[name], out.terms[name], batch)
        self.engine.train(True)
        metrics: dict[str, Any] = {}
        for name, o in objectives.items():
            metrics.update(o.eval_finish(states[name], all_reduce_sum, all_gather_object))
        return metrics

    # ------------------------------------------------------------------------------------------- checkpoints

    def _state(self) -> dict[str, Any]:
        """This rank's trainer state: plain values and tensors only, so it loads with `weights_only=True`."""
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "data_skipped": self.data_skipped,
            "data_skipped_by_kind": dict(self.data_skipped_by_kind),
            "nonfinite_steps": self.nonfinite_steps,
            "lr_scale": self.lr_scale,
            "data": self.train_data.state_dict(),
            "callbacks": {callback_key(i, cb): cb.state_dict() for i, cb in enumerate(self.callbacks)},
            "rng": rng_state(),
            "task_rows": [list(row) for row in self.task_rows],
        }

    def save_checkpoint(self) -> None:
        """Every rank writes its shards into `step_N.partial`; the ranks hash a share of the files each; rank 0
        writes the manifest last and publishes the directory by a rename (see mmscale.training.checkpoint)."""
        tag = checkpoint.tag_for(self.step) + checkpoint.PARTIAL
        ckpt = self.ckpt_root / tag
        what = f"beginning checkpoint {checkpoint.tag_for(self.step)} under {self.ckpt_root}"
        if self.is_main:
            with rank0_work(what):
                checkpoint.begin(self.ckpt_root, self.step)
        rank0_done(what)
        with checkpoint.saves_keep_errno():  # a failed write raises OSError(errno), not torch's RuntimeError
            self.engine.save(str(self.ckpt_root), tag)
            # the frozen weights, when the files leave them out: as they are now ("" when they are in the files)
            frozen = "" if self.engine.save_frozen else self.engine.fingerprint_frozen()
            torch.save({**self._state(), "frozen_fingerprint": frozen}, ckpt / checkpoint.state_file(self.rank))
        barrier()  # every rank's files are on disk
        names = broadcast_object(checkpoint.files_of(ckpt) if self.is_main else None)
        shares = all_gather_object(checkpoint.hash_share(ckpt, names, self.rank, self.world_size))
        what = f"committing checkpoint {ckpt}"
        if self.is_main:
            with rank0_work(what):
                meta = {"world_size": self.world_size,
                        "config": run_paths.portable_config(self.cfg.to_dict(), self.output_dir),  # see run_paths
                        "metrics": self._eval_at_step(), "frozen_fingerprint": frozen,
                        "tokenizer": self._tokenizer_record()}
                checkpoint.write_manifest(ckpt, self.step, {k: v for share in shares for k, v in share.items()},
                                          meta)
                final = checkpoint.commit(self.ckpt_root, self.step, self.cfg.train.keep_checkpoints,
                                          self.cfg.train.keep_best, self.cfg.train.keep_best_mode)
            log.info("saved checkpoint %s", final)
        rank0_done(what)

    def _tokenizer_record(self) -> dict[str, str]:
        """The tokenizer this run reads, as a checkpoint's manifest records it: its path (portable: relative inside
        the run, see run_paths) and its digest (`tokenizer_digest`), computed once."""
        if self._tokenizer is None:
            path = run_paths.data_paths(self.cfg)[2]
            self._tokenizer = {"path": run_paths.portable_path(path, self.output_dir) if path else "",
                               "sha256": tokenizer_digest(path)}
        return self._tokenizer

    def _eval_at_step(self) -> dict[str, float]:
        last = self.last_eval
        return {k: v for k, v in last.items() if k != "step"} if last.get("step") == self.step else {}

    def _check_candidate(self, ckpt: Path) -> tuple[list[str], list[str], list[str], dict[str, Any] | None]:
        """This rank's verdict on one checkpoint, without any collective: (proof that it is damaged, why this run
        cannot continue from it, why it cannot be judged at all, its trainer state). Only proof (a checksum or size
        that differs, a listed file missing, a manifest missing or unparsable) sets a checkpoint aside; a file that
        cannot be read (after retries) or would run code stops the run instead. Never raises, so that every rank
        reaches the vote that follows."""
        from mmscale.training.zero_checkpoint import UnsafeCheckpointError

        who = f"rank {self.rank}: " if self.world_size > 1 else ""
        try:
            damaged = checkpoint.verify(ckpt, self.rank, self.world_size)
            if damaged:
                return damaged, [], [], None
            manifest = checkpoint.load_manifest(ckpt)
            saved_world = manifest.get("world_size")
            if saved_world != self.world_size:  # every saved rank's state, merged for this rank
                state, mismatched = self._state_from_other_world(ckpt, int(saved_world))
            else:
                state, mismatched = load_trainer_state(ckpt / checkpoint.state_file(self.rank)), []
            # both portable for this output_dir: a moved run's relative paths are not a change
            mismatched += config_changes(
                run_paths.comparable_config(manifest.get("config") or {}, self.output_dir, recorded=True),
                run_paths.comparable_config(self.cfg.to_dict(), self.output_dir, recorded=False))
            mismatched += frozen_problems(state.get("frozen_fingerprint", ""), self.engine.frozen_at_build,
                                          ckpt.name, self.cfg)
            mismatched += tokenizer_problems(manifest.get("tokenizer"), self._tokenizer_record(), self.output_dir)
            if hasattr(self.train_data, "resume_problems"):
                mismatched += self.train_data.resume_problems(state["data"])
            return [], mismatched, [], state
        except OSError as e:  # the storage failed (after retries: checkpoint.read_retrying): proof of nothing
            name = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
            return [], [], [f"{who}cannot read {e.filename or ckpt}: {e.strerror or e} (errno {e.errno}, {name})"], None
        except UnsafeCheckpointError as e:  # tampered with, or not ours: never loaded, never set aside
            return [], [], [f"{who}{e}"], None
        except Exception as e:  # noqa: BLE001  (matches its manifest, yet does not load: not proof of damage)
            return [], [], [f"{who}{ckpt.name} matches its manifest but does not load: {type(e).__name__}: {e}"], None

    def _state_from_other_world(self, ckpt: Path, saved_world: int) -> tuple[dict[str, Any], list[str]]:
        """A checkpoint of `saved_world` ranks resumed on this world size: every saved rank's trainer state merged
        for this rank (mmscale.training.reshard.merge_trainer_states), and why it cannot move."""
        import inspect

        from mmscale.training import reshard

        states = [load_trainer_state(ckpt / checkpoint.state_file(r)) for r in range(saved_world)]
        global_state = {callback_key(i, cb) for i, cb in enumerate(self.callbacks)
                        if getattr(cb, "state_is_global", False)}
        state, problems = reshard.merge_trainer_states(states, self.rank, self.world_size, self.cfg.train.seed,
                                                       global_state)
        if self.cfg.deepspeed.zero_stage != reshard.SUPPORTED_STAGE:
            problems.append(f"only ZeRO-3 checkpoints are converted for another world size (deepspeed.zero_stage="
                            f"{self.cfg.deepspeed.zero_stage}); resume with {saved_world} rank(s)")
        if "all_ranks" not in inspect.signature(self.train_data.load_state_dict).parameters:
            problems.append(f"the training data ({type(self.train_data).__name__}: a task sequence?) cannot spread "
                            f"its position over another number of ranks; resume with {saved_world} rank(s)")
        return state, [f"{ckpt.name} was saved by {saved_world} ranks, this run has {self.world_size}: {p}"
                       for p in problems]

    def load_checkpoint(self, required: bool, restore_data: bool = True) -> Path | None:
        """Load the newest checkpoint that passes its manifest, skipping (and setting aside) damaged ones.

        Rank 0 lists the candidates and every rank receives the same list; each rank checks its share of each
        candidate on its own, then all vote, so all load the same step or all stop with the same error before the
        collective load starts. Returns the checkpoint loaded, or None when there is none and none is `required`."""
        listing = None
        if self.is_main:  # a listing that fails reaches every rank as the same error, not as a wait in a broadcast
            try:
                listing = [c.name for c in checkpoint.candidates(self.ckpt_root)]
            except OSError as e:
                listing = f"cannot list the checkpoints under {self.ckpt_root}: {type(e).__name__}: {e}"
        names = broadcast_object(listing)
        if isinstance(names, str):
            raise CheckpointUnreadableError(f"{names}; nothing was set aside or loaded: check the storage, then "
                                            f"resume again")
        for name in names:
            ckpt = self.ckpt_root / name
            damaged, mismatched, unreadable, state = self._check_candidate(ckpt)
            votes = all_gather_object((damaged, mismatched, unreadable))
            damaged = [m for d, _, _ in votes for m in d]
            mismatched = sorted({m for _, mm, _ in votes for m in mm})
            unreadable = [m for _, _, u in votes for m in u]
            if unreadable:  # first, whatever another rank proved: a checkpoint is judged once it can be read
                raise CheckpointUnreadableError(
                    f"cannot judge checkpoint {ckpt}; nothing was set aside or loaded:\n  "
                    + "\n  ".join(unreadable[:10]) + f"\nEach read is tried {checkpoint.READ_TRIES} times before "
                    f"this stop. Check the storage (or the file named), then resume again: a checkpoint is set "
                    f"aside only when its files prove it damaged")
            if damaged:
                what = f"setting aside the damaged checkpoint {ckpt}"
                if self.is_main:
                    with rank0_work(what):
                        moved = checkpoint.set_aside(ckpt)
                    log.warning("checkpoint %s is damaged and was set aside as %s; trying the one before it:\n  %s",
                                name, moved.name, "\n  ".join(damaged[:10]))
                rank0_done(what)
                continue
            if mismatched:
                raise ResumeError(f"cannot continue from {ckpt}:\n  " + "\n  ".join(mismatched))
            self.engine.load(str(self.ckpt_root), name, saved_world_size=state.get("resharded_from"))
            self._apply_state(state, restore_data)
            return ckpt
        if required:
            raise ResumeError(
                f"--resume: no complete checkpoint under {self.ckpt_root}"
                + (f" ({len(names)} damaged, set aside)" if names else "")
                + "; start without --resume, or use `--resume auto` to start fresh when there is none"
            )
        return None

    def _apply_state(self, state: dict[str, Any], restore_data: bool) -> None:
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.tokens_seen, self.data_skipped = state["tokens_seen"], state["data_skipped"]
        self.data_skipped_by_kind.update(state.get("data_skipped_by_kind", {}))
        saved_scale = state.get("lr_scale", 1.0)  # the checkpoint's schedule already runs at this scale
        if restore_data:  # a resume: everything as it was at the checkpoint
            self.nonfinite_steps, self.lr_scale = state.get("nonfinite_steps", 0), saved_scale
            if "data_all_ranks" in state:  # another world size: the rest of the epoch spread over the new ranks
                self.train_data.load_state_dict(state["data"], all_ranks=state["data_all_ranks"])
            else:
                self.train_data.load_state_dict(state["data"])
            set_rng_state(state["rng"])  # (another world size: seeded anew, reshard.fresh_rng_state)
        elif self.lr_scale != saved_scale:  # a rollback: its lowered rate, and the counts go on
            self.engine.scale_lr(self.lr_scale / saved_scale)
        self.task_rows = [list(row) for row in state.get("task_rows", [])]  # on a rollback too: the step went back
        self._activate_classes()
        saved = state["callbacks"]
        for i, cb in enumerate(self.callbacks):
            key = callback_key(i, cb)
            if key in saved:
                cb.load_state_dict(saved[key])
            elif cb.name in saved:  # checkpoints from before the keys held the position
                cb.load_state_dict(saved[cb.name])

    def resume(self, required: bool = True) -> bool:
        """Continue from the newest good checkpoint in output_dir. With `required=False` (`--resume auto`), start
        fresh when there is none. Metrics logged after the checkpoint (by the run that died) are dropped."""
        try:
            ckpt = self.load_checkpoint(required)
        except Exception as e:
            if self.world_size > 1 and cluster.is_peer_failure(e):  # a rank died while the checkpoint loaded
                raise self._peer_failure(e) from e
            raise
        what = f"dropping the records after step {self.step} from {self.metrics.path}"
        if self.is_main:
            with rank0_work(what):
                self.metrics.truncate_after(self.step)
        rank0_done(what)
        if ckpt is None:
            log.info("--resume auto: no checkpoint under %s; starting from scratch", self.ckpt_root)
            return False
        log.info("resumed from %s at step %d", ckpt, self.step)
        return True

    def _rollback(self) -> None:
        """`max_nonfinite_steps` bad steps in a row: back to the last checkpoint's weights and optimizer at a lower
        learning rate; the data goes on after the bad batches (feeding them again would likely repeat the fault)."""
        t = self.cfg.train
        at = self.step
        self.lr_scale *= t.rollback_lr_factor
        ckpt = self.load_checkpoint(required=False, restore_data=False)
        if ckpt is None:
            raise NonFiniteError(
                f"{t.max_nonfinite_steps} non-finite steps in a row at step {at} and no checkpoint to roll back to; "
                f"lower train.lr (now {t.lr}) or check the data"
            )
        self.rollbacks += 1
        self._nonfinite_in_a_row = 0
        log.warning("%d non-finite steps in a row at step %d: rolled back to %s, learning rate x%g (now x%g of "
                    "the schedule)", t.max_nonfinite_steps, at, ckpt.name, t.rollback_lr_factor, self.lr_scale)

    # ------------------------------------------------------------------------------------------- loop

    def train(self) -> list[dict[str, float]]:
        """Train to `train.max_steps`. A preemption signal (SIGUSR1/SIGTERM) ends the run early, on every rank
        after the same step, with a checkpoint of that step (`preempted` names the signal); a rank that dies makes
        the others raise PeerFailureError naming it (see mmscale.training.cluster)."""
        t, lg = self.cfg.train, self.cfg.logging
        self._signals.install()
        self._data_iter = iter(self.train_data)
        self.engine.train(True)
        self._activate_classes()
        for cb in self.callbacks:
            cb.on_train_start(self)
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not (self.is_main and lg.progress_bar),
                   desc="train", unit="step", dynamic_ncols=True)
        last_saved = self.step
        try:
            if t.eval_at_start and self.step == 0 and self.eval_data is not None:
                self._log(self.evaluate())
            while self.step < t.max_steps and not self.should_stop:
                step_metrics = self.train_step()
                for cb in self.callbacks:
                    cb.on_step_end(self, step_metrics)
                self._add_callback_metrics(step_metrics)
                self._guard()  # may roll back: self.step goes back to the checkpoint's
                bar.n = self.step
                bar.refresh()
                if self.step % lg.log_every == 0 or self.step == t.max_steps or self._stop_agreed:
                    record = self._flush_window()
                    self._log(record)
                    shown = {o.headline: f"{record[o.headline]:.3f}" for o in self.objectives.values()
                             if record.get(o.headline) is not None}
                    bar.set_postfix(**shown, sps=f"{record['samples_per_s']:.1f}")
                if self._stop_agreed:  # a preemption: this step's checkpoint, then out (no evaluation: time is short)
                    self.preempted = signal_name(self._signals.received)
                    break
                if self.tasks is not None and self.step == self.tasks.end_of(len(self.task_rows)):
                    self._end_task()
                if t.eval_every and self.step % t.eval_every == 0:
                    self._log(self.evaluate())
                if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                    self.save_checkpoint()
                    last_saved = self.step
            bar.close()
            if self.preempted is None and self.eval_data is not None and self.last_eval.get("step") != self.step:
                self._log(self.evaluate())
            if last_saved != self.step:
                self.save_checkpoint()
            if self.preempted is None:
                for cb in self.callbacks:
                    cb.on_train_end(self)
            else:
                log.warning("stopped at step %d on %s (a signal reached %s); checkpoint saved: exit %d asks for a "
                            "requeue, and the next start resumes from step %d", self.step, self.preempted,
                            "this rank" if self._signals.received else "another rank", cluster.EXIT_REQUEUE,
                            self.step)
        except (NonFiniteError, ResumeError, BadDataError):  # raised on every rank alike, on purpose
            raise
        except Exception as e:
            if self.world_size > 1 and cluster.is_peer_failure(e):
                raise self._peer_failure(e) from e
            raise
        finally:  # whatever way training ends, no data-loader worker outlives it
            self._signals.restore()
            bar.close()
            for data in (self.train_data, self.eval_data):
                if hasattr(data, "close"):
                    data.close()
            self._data_iter = None
            self.metrics.close()
        if self.is_main and lg.plot and self.metrics.path.exists():
            plot_losses(self.metrics.path, self.output_dir / "loss.png",
                        tuple((o.headline, o.eval_headline) for o in self.objectives.values()))
        return self.history

    def _peer_failure(self, e: BaseException) -> PeerFailureError:
        """Name the rank that died: every live rank checks in at the rendezvous store; who does not, is gone."""
        posted = rank0_failure()  # rank 0 failed in its own work and said so while this rank was in a collective
        if posted is not None and self.rank != 0:
            return Rank0FailedError(f"rank {self.rank}: stopping: rank 0 failed while {posted}; every rank "
                                    f"stops (rank 0 with this error)")
        grace = min(10.0, self.cfg.deepspeed.collective_timeout_s / 3)
        dead, why = cluster.find_dead_ranks(rendezvous_store(), self.rank, self.world_size, grace)
        if dead is None:
            who = f"rank 0 (the rendezvous store in its process is unreachable: {why})"
        elif dead:
            who = f"rank(s) {', '.join(map(str, dead))} (did not answer within {grace:.0f} s after the failure)"
        else:
            who = "no rank is missing now (a transient network failure?)"
        return PeerFailureError(
            f"rank {self.rank}: a collective failed at step {self.step + 1} (after step {self.step}, the last "
            f"completed): {who} died or stopped answering. The job stops instead of waiting (collective timeout "
            f"{self.cfg.deepspeed.collective_timeout_s:g} s); resume with --resume from the last checkpoint. "
            f"Cause: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")

    # ------------------------------------------------------------------------------------------- task sequences

    def _activate_classes(self) -> None:
        """Class-incremental: the head predicts only the classes of the tasks so far (a buffer, on every rank)."""
        if self.tasks is None:
            return
        active = self.tasks.active_classes(min(len(self.task_rows), len(self.tasks.names) - 1))
        if active is None:
            return
        for o in self.objectives.values():
            o.set_active_classes(active)

    def _end_task(self) -> None:
        """After a task's last step: evaluate every task (a row of R), tell the callbacks, write the matrix."""
        from mmscale.continual import metrics as cl

        i, metric = len(self.task_rows), self.tasks.metric
        row = []
        for j, loader in enumerate(self.tasks.eval_loaders):
            for cb in self.callbacks:
                cb.on_task_eval(self, j)
            row.append(float(self.measure(loader)[metric]))
        for cb in self.callbacks:
            cb.on_task_eval(self, None)
        self.task_rows.append(row)
        self._log({"task_end": self.tasks.names[i], f"R_row_{metric}": row})
        for cb in self.callbacks:
            cb.on_task_end(self, i, row)
        what = f"writing {self.output_dir / 'continual.json'} and continual.png after task {i}"
        if self.is_main:
            log.info("after task %d (%s), %s per task: %s", i, self.tasks.names[i], metric,
                     ", ".join(f"{n} {v:.4f}" for n, v in zip(self.tasks.names, row)))
            if len(self.task_rows) == len(row):  # the whole matrix: its table, summary and heatmap
                log.info("task sequence done:\n%s", cl.format_table(self.task_rows, self.tasks.names))
                with rank0_work(what):
                    summary = cl.summarize(self.task_rows, lower_is_better=metric.endswith("loss"))
                    (self.output_dir / "continual.json").write_text(json.dumps(
                        {"tasks": self.tasks.names, "metric": metric, **summary}, indent=2))
                    cl.plot_heatmap(self.task_rows, self.output_dir / "continual.png", self.tasks.names,
                                    title=f"{metric}: task j (column) after training task i (row)")
        if len(self.task_rows) == len(row):
            rank0_done(what)
        self._activate_classes()

    def _log(self, record: dict[str, float]) -> None:
        if not record:
            return
        record = {k: v for k, v in record.items() if v is not None}
        self.history.append({"step": self.step, **record})
        self.metrics.write(self.step, record)
