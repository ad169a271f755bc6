"""The training loop: small, named steps over an `Engine`.

    train_step:  grad_accum micro batches -> forward_backward_step each -> one optimizer step
    evaluate:    held-out micro batches -> token-weighted mean loss over all ranks
    save/resume: DeepSpeed shards + trainer state (step, data position, callbacks, RNG) per rank

Data is any object with `__iter__`, `state_dict()` and `load_state_dict()` (mmscale.data's loaders are): the data
position is checkpointed state like the weights.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tqdm import tqdm

from mmscale.config import JobConfig
from mmscale.training import checkpoint
from mmscale.training.callbacks import Callback
from mmscale.training.engine import Engine, all_reduce_sum, barrier
from mmscale.training.metrics import MetricsWriter, plot_losses

log = logging.getLogger("mmscale.trainer")

MODEL_INPUTS = ("pixel_values", "image_mask", "input_ids", "attention_mask", "media_index", "labels")


class Trainer:
    def __init__(
        self,
        cfg: JobConfig,
        engine: Engine,
        train_data: Any,
        eval_data: Iterable[dict[str, Any]] | None = None,
        callbacks: list[Callback] | None = None,
        tokenizer: Any = None,
    ):
        self.cfg = cfg
        self.tokenizer = tokenizer  # for callbacks that decode or generate
        self.engine = engine
        self.train_data = train_data
        self.eval_data = eval_data
        self.callbacks = callbacks or []
        self.rank, self.world_size = engine.rank, engine.world_size
        self.is_main = self.rank == 0
        self.output_dir = Path(cfg.output_dir)
        self.ckpt_root = self.output_dir / "checkpoints"
        self.step = 0
        self.samples_seen = 0
        self.tokens_seen = 0
        self.data_skipped = 0
        self.should_stop = False
        self.metrics = MetricsWriter(cfg.output_dir, enabled=self.is_main, tensorboard=cfg.logging.tensorboard)
        self.history: list[dict[str, float]] = []  # this process's logged records (tests and benchmarks read it)
        self._data_iter = None
        self._window = {"loss_sum": 0.0, "tokens": 0.0, "time": 0.0, "steps": 0}
        self._dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32

    # ------------------------------------------------------------------------------------------- steps

    def _to_device(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {}
        for k in MODEL_INPUTS:
            t = batch[k]
            out[k] = t.to(self.engine.device, dtype=self._dtype if t.is_floating_point() else None, non_blocking=True)
        return out

    def next_batch(self) -> dict[str, Any]:
        batch = next(self._data_iter)
        if "num_skipped" in batch:
            self.data_skipped += int(batch["num_skipped"])
        for cb in self.callbacks:
            batch = cb.on_batch(self, batch)
        return batch

    def forward_backward_step(self, batch: dict[str, Any], loss_scale: float) -> torch.Tensor:
        """One micro batch. Returns the detached local loss sum (nats, summed over target tokens)."""
        inputs = self._to_device(batch)
        out = self.engine.forward(**inputs)
        loss = out.loss_sum * loss_scale
        for cb in self.callbacks:
            loss = cb.on_loss(self, batch, out, loss)
        self.engine.backward(loss)
        self.engine.step()  # a no-op for weights until the accumulation boundary
        return out.loss_sum.detach().float()

    def train_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        micro = [self.next_batch() for _ in range(self.engine.grad_accum)]
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        # global_avg_loss = sum over ranks and micro batches of loss_sum / global_tokens.
        # DeepSpeed divides each backward by grad_accum and averages gradients over world_size, so each micro
        # batch's loss_sum is pre-scaled by grad_accum * world_size / global_tokens. One tiny all-reduce per step.
        global_tokens = float(all_reduce_sum([local_tokens])[0])
        scale = self.engine.grad_accum * self.world_size / max(global_tokens, 1.0)
        loss_sum = sum(float(self.forward_backward_step(b, scale)) for b in micro)
        self.step += 1
        dt = time.perf_counter() - t0
        self.samples_seen += self.cfg.train.global_batch_size
        self.tokens_seen += int(global_tokens)
        w = self._window
        w["loss_sum"] += loss_sum
        w["tokens"] += local_tokens
        w["time"] += dt
        w["steps"] += 1
        return {"step_time": dt}

    def _flush_window(self) -> dict[str, float]:
        """Global mean loss and throughput over the steps since the last log (one all-reduce)."""
        w = self._window
        loss_sum, tokens, skipped = all_reduce_sum([w["loss_sum"], w["tokens"], self.data_skipped]).tolist()
        steps, secs = w["steps"], w["time"]
        self._window = {"loss_sum": 0.0, "tokens": 0.0, "time": 0.0, "steps": 0}
        return {
            "loss": loss_sum / max(tokens, 1.0),
            "lr": self.engine.lr,
            "grad_norm": self.engine.grad_norm(),
            "samples_per_s": steps * self.cfg.train.global_batch_size / secs,
            "tokens_per_s": tokens / secs,
            "step_time_s": secs / steps,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "data_skipped": int(skipped),
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.eval_data is None:
            return {}
        self.engine.train(False)
        loss_sum, tokens = 0.0, 0.0
        for batch in self.eval_data:  # re-iterable: the same batches every evaluation
            out = self.engine.forward(**self._to_device(batch))
            loss_sum += float(out.loss_sum)
            tokens += float(out.num_tokens)
        self.engine.train(True)
        loss_sum, tokens = all_reduce_sum([loss_sum, tokens]).tolist()
        metrics = {"val_loss": loss_sum / max(tokens, 1.0), "val_tokens": int(tokens)}
        for cb in self.callbacks:
            cb.on_eval_end(self, metrics)
        return metrics

    # ------------------------------------------------------------------------------------------- checkpoints

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "data_skipped": self.data_skipped,
            "world_size": self.world_size,
            "data": self.train_data.state_dict(),
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

    def save_checkpoint(self) -> None:
        tag = checkpoint.tag_for(self.step) + checkpoint.PARTIAL
        if self.is_main:
            checkpoint.begin(self.ckpt_root, self.step)
        barrier()
        self.engine.save(str(self.ckpt_root), tag)
        torch.save(self._state(), self.ckpt_root / tag / checkpoint.state_file(self.rank))
        barrier()  # every rank's shards are on disk before the checkpoint is published
        if self.is_main:
            final = checkpoint.commit(self.ckpt_root, self.step, self.cfg.train.keep_checkpoints)
            log.info("saved checkpoint %s", final)
        barrier()

    def resume(self) -> bool:
        """Continue from the latest complete checkpoint in output_dir. Returns False when there is none."""
        ckpt = checkpoint.latest_checkpoint(self.ckpt_root)
        if ckpt is None:
            log.warning("--resume: no complete checkpoint under %s; starting from scratch", self.ckpt_root)
            return False
        state_path = ckpt / checkpoint.state_file(self.rank)
        if not state_path.is_file():
            raise RuntimeError(
                f"{ckpt} has no {state_path.name}: it was written by a different world size; resume with the "
                f"same number of ranks it was saved with"
            )
        self.engine.load(str(self.ckpt_root), ckpt.name)
        state = torch.load(state_path, weights_only=False)
        if state["world_size"] != self.world_size:
            raise RuntimeError(
                f"{ckpt} was saved with world_size={state['world_size']}, this run has {self.world_size}; "
                "resume with the same number of ranks"
            )
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.tokens_seen, self.data_skipped = state["tokens_seen"], state["data_skipped"]
        self.train_data.load_state_dict(state["data"])
        for cb in self.callbacks:
            if cb.name in state["callbacks"]:
                cb.load_state_dict(state["callbacks"][cb.name])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        log.info("resumed from %s at step %d", ckpt, self.step)
        return True

    # ------------------------------------------------------------------------------------------- loop

    def train(self) -> list[dict[str, float]]:
        t, lg = self.cfg.train, self.cfg.logging
        self._data_iter = iter(self.train_data)
        self.engine.train(True)
        for cb in self.callbacks:
            cb.on_train_start(self)
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not (self.is_main and lg.progress_bar),
                   desc="train", unit="step", dynamic_ncols=True)
        last_saved = self.step
        while self.step < t.max_steps and not self.should_stop:
            step_metrics = self.train_step()
            for cb in self.callbacks:
                cb.on_step_end(self, step_metrics)
            bar.update(1)
            if self.step % lg.log_every == 0 or self.step == t.max_steps:
                record = self._flush_window()
                self._log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{record['samples_per_s']:.1f}")
            if t.eval_every and self.step % t.eval_every == 0:
                self._log(self.evaluate())
            if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                self.save_checkpoint()
                last_saved = self.step
        bar.close()
        if self.eval_data is not None and not (t.eval_every and self.step % t.eval_every == 0):
            self._log(self.evaluate())
        if last_saved != self.step:
            self.save_checkpoint()
        for cb in self.callbacks:
            cb.on_train_end(self)
        self.metrics.close()
        if self.is_main and lg.plot and self.metrics.path.exists():
            plot_losses(self.metrics.path, self.output_dir / "loss.png")
        return self.history

    def _log(self, record: dict[str, float]) -> None:
        if not record:
            return
        record = {k: v for k, v in record.items() if v is not None}
        self.history.append({"step": self.step, **record})
        self.metrics.write(self.step, record)
