"""The one place in mmscale that knows about DeepSpeed.

`build_ds_config` turns our JobConfig into a DeepSpeed config; `build_engine` constructs the model (under
`deepspeed.zero.Init` for ZeRO-3, so no rank ever holds the whole model), the optimizer and the schedule, and
wraps them in `Engine`, which the trainer drives through five verbs: `forward`, `backward`, `step`, `save`, `load`.
Model code (mmscale/model) stays single-device and never imports deepspeed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from mmscale.config import JobConfig
from mmscale.training.cluster import CollectiveError, collective

log = logging.getLogger("mmscale.engine")


# ----------------------------------------------------------------------------------------------- process group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float | None = None) -> tuple[int, int]:
    """Start the process group (gloo on CPU, nccl on CUDA) and return (rank, world_size).

    Works under the `deepspeed` launcher, torchrun, SLURM's srun (mmscale.training.cluster derives the variables
    torch reads from SLURM's), or as a plain single process. `timeout_s`: how long a collective may wait for a
    peer before it raises (`deepspeed.collective_timeout_s`); None = DeepSpeed's default.
    """
    import datetime

    import deepspeed

    from mmscale.training.cluster import apply_launcher_env

    # DeepSpeed calls torch.distributed functions that torch marks deprecated, once per collective
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
    apply_launcher_env()
    if "RANK" not in os.environ:  # a plain `python launchers/train.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, **kwargs)
        _unlink_shm_allreduce_buffer()
    return dist.get_rank(), dist.get_world_size()


def rendezvous_store() -> Any:
    """The process group's key-value store (it lives in rank 0's process), or None without one."""
    try:
        return dist.distributed_c10d._get_default_store()  # private, stable since torch 1.x; used only to name
    except Exception:  # noqa: BLE001                          # a dead rank, so None is an acceptable answer
        return None


def shm_allreduce_buffer(rank: int) -> Path:
    """The shared-memory file DeepSpeed's CPU communication op creates for `rank` of this job."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
                               f"{os.environ.get('MASTER_PORT')}_{rank}")


def _unlink_shm_allreduce_buffer() -> None:
    """DeepSpeed's CPU communication op (0.19) maps a 66 MB file per rank in /dev/shm and never unlinks it: every
    job leaves 66 MB per rank of RAM behind, a killed one too, until /dev/shm fills the memory and the machine
    thrashes (a test suite of ~100 two-rank jobs stalled a 24 GiB machine). Once every rank has mapped its peers'
    files (DeepSpeed waits for that inside init_distributed; the barrier makes sure every rank is past it), the
    names can go: the mappings stay valid and the memory is freed when the last rank exits, however it exits."""
    barrier()
    try:
        shm_allreduce_buffer(dist.get_rank()).unlink()
    except FileNotFoundError:
        pass  # no shm op here (GPU, multi-node) or another DeepSpeed version


def device() -> torch.device:
    if torch.cuda.is_available():  # (under srun with one GPU per task, cluster.slurm_env made LOCAL_RANK 0)
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def all_reduce_sum(values: list[float] | torch.Tensor) -> torch.Tensor:
    """Sum a small vector over all ranks (one collective; a CPU-device sync point)."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.to(device())
        with collective("all_reduce"):  # an error inside it is a peer's failure (cluster.raised_by_collective)
            dist.all_reduce(t)
    return t.cpu()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        with collective("barrier"):
            dist.barrier()


# Work rank 0 does alone while the others wait (the data, clearing a run, config.yaml, a checkpoint's begin and
# commit, continual.json): a failure in it must reach the others at once, not as a collective timeout (600 s by
# default; with gloo, as "rank 0 died" once its process is gone, without its message). Rank 0 posts the error to
# the rendezvous store (`rank0_work`) before it propagates; the others wait at `rank0_done`, a barrier that polls
# the store for that post while it waits, and stop with rank 0's message.

RANK0_FAILED_KEY = "mmscale/rank0_failed"
_RANK0_ACK_KEY = "mmscale/rank0_failed_ack"
RANK0_ACK_WAIT_S = 5.0
"""How long rank 0 waits, after posting its failure, for the others to read it before its own error goes on."""


class PeerFailureError(RuntimeError):
    """A collective failed because another rank died or stopped answering, or another rank failed and said so; the
    message names it and the step. Each rank leaves at once (no teardown can complete)."""


class Rank0FailedError(PeerFailureError):
    """Rank 0 failed in work it does alone (`rank0_work`): raised on the other ranks, with its message."""


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


@contextlib.contextmanager
def rank0_work(what: str) -> Any:
    """Around work rank 0 does alone (`what`: "writing config.yaml", ...), followed on every rank by
    `rank0_done(what)`: an error in it is posted to the rendezvous store for the others before it propagates."""
    try:
        yield
    except BaseException as e:
        if _world() > 1:
            _post_rank0_failure(f"{what}: {type(e).__name__}: {e}")
        raise


def _post_rank0_failure(message: str) -> None:
    """Rank 0: tell the others what failed, and give them a moment to read it (the store lives in this process)."""
    import time

    store = rendezvous_store()
    if store is None:
        return
    try:
        store.set(RANK0_FAILED_KEY, message)
        deadline = time.monotonic() + RANK0_ACK_WAIT_S
        while store.add(_RANK0_ACK_KEY, 0) < _world() - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception as e:  # noqa: BLE001  (the store is gone: the others learn of it as a dead peer)
        log.warning("could not tell the other ranks that rank 0 failed (%s: %s)", type(e).__name__, e)


def rank0_failure() -> str | None:
    """What rank 0 posted when it failed in `rank0_work`, or None (also when the store cannot be reached)."""
    store = rendezvous_store()
    try:
        if store is not None and store.check([RANK0_FAILED_KEY]):
            return store.get(RANK0_FAILED_KEY).decode(errors="replace")
    except Exception:  # noqa: BLE001
        pass
    return None


def rank0_done(what: str) -> None:
    """Every rank, after rank 0's `rank0_work(what)`: a barrier that stops with Rank0FailedError (rank 0's message)
    as soon as rank 0 posts a failure. The barrier itself runs as a collective (a dead peer or the collective
    timeout end it as `barrier` would); the store is polled while it is pending."""
    import time

    if _world() <= 1:
        return
    rank = dist.get_rank()
    op = f"barrier after {what}"
    with collective(op):
        work = dist.barrier(async_op=True)
    pause = 0.005
    while not work.is_completed():
        posted = rank0_failure()
        if posted is not None:
            with contextlib.suppress(Exception):
                rendezvous_store().add(_RANK0_ACK_KEY, 1)
            raise Rank0FailedError(f"rank {rank}: stopping: rank 0 failed while {posted}; every rank stops (rank 0 "
                                   f"with this error)")
        time.sleep(pause)
        pause = min(2 * pause, 0.1)
    try:
        work.wait()
    except RuntimeError as e:  # what ended the barrier: a dead peer, the collective timeout (raised by native code,
        raise CollectiveError(op, e) from e  # so marked here: cluster.raised_by_collective judges by the raiser)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (a decision one rank makes for all: the checkpoint to resume, say)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    with collective("broadcast"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (checks each rank makes locally, then all agree)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    with collective("all_gather"):
        dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------- config


def grad_accum_steps(cfg: JobConfig, world_size: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * world_size)


def build_ds_config(cfg: JobConfig, world_size: int) -> dict[str, Any]:
    """Our config -> DeepSpeed's. The batch arithmetic was validated before any process group started."""
    t, z = cfg.train, cfg.deepspeed
    zero: dict[str, Any] = {
        "stage": z.zero_stage,
        "overlap_comm": z.overlap_comm,
        "contiguous_gradients": z.contiguous_gradients,
        "reduce_bucket_size": z.reduce_bucket_size,
    }
    if z.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=z.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=z.stage3_param_persistence_threshold,
        )
    if z.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": z.offload_optimizer, "pin_memory": torch.cuda.is_available()}
    if z.offload_params != "none":
        zero["offload_param"] = {"device": z.offload_params, "pin_memory": torch.cuda.is_available()}
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg, world_size),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # our optimizer is torch's AdamW; DeepSpeed must not insist on its own CPU Adam for offload
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
    }
    return _deep_merge(ds, z.extra)


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


# ----------------------------------------------------------------------------------------------- optimizer


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    # biases, norms, gates and learned latents are not decayed (1-D params, by their full shape under ZeRO-3)
    shape = getattr(p, "ds_shape", p.shape)
    return len(shape) <= 1 or "latents" in name or name.endswith("gate")


class _AdamWSkipNonFinite(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not all finite, the way DeepSpeed's ZeRO and bf16 optimizers do
    (`overflow` and `_global_grad_norm` are what DeepSpeed's engine reads). Used only where DeepSpeed hands the
    step to the client optimizer as it is: ZeRO stage 0 in fp32."""

    overflow = False
    _global_grad_norm = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) \
            if grads else torch.zeros(())
        self._global_grad_norm = float(norm)
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            return None
        return super().step(closure)


LR_STEPS = "mmscale_lr_steps"
"""A parameter attribute (start, end): the optimizer steps (0-based, as the schedule counts them) in which it trains;
its learning rate is 0 before and after, so Adam leaves it exactly as it is (weight decay included, which AdamW
scales by the learning rate). task_adapters sets it: each task's module trains in its task only."""


def build_optimizer(model: torch.nn.Module, cfg: JobConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: one group with weight decay and one without, each split further by the
    steps its parameters train in (LR_STEPS; most have none: every step). The groups' `lr_steps` give the schedule
    (lr_lambdas)."""
    t = cfg.train
    split: dict[tuple[bool, tuple[int, int] | None], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            split.setdefault((_no_decay(name, p), getattr(p, LR_STEPS, None)), []).append(p)
    groups = [{"params": params, "weight_decay": 0.0 if no_decay else t.weight_decay,
               **({"lr_steps": steps} if steps is not None else {})}
              for (no_decay, steps), params in sorted(split.items(), key=lambda kv: (kv[0][1] is not None,
                                                                                      kv[0][1] or (0, 0), kv[0][0]))]
    # ZeRO stages 1-3 and DeepSpeed's bf16 optimizer skip a step with a non-finite gradient norm themselves
    cls = _AdamWSkipNonFinite if cfg.deepspeed.zero_stage == 0 and cfg.train.precision == "fp32" else \
        torch.optim.AdamW
    return cls([g for g in groups if g["params"]], lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)


def lr_lambdas(cfg: JobConfig, optimizer: torch.optim.Optimizer) -> list[Callable[[int], float]]:
    """The schedule of each parameter group: lr_lambda's, times 0 outside the group's `lr_steps`."""
    f = lr_lambda(cfg)

    def within(start: int, end: int) -> Callable[[int], float]:
        return lambda step: f(step) if start <= step < end else 0.0

    return [within(*g["lr_steps"]) if "lr_steps" in g else f for g in optimizer.param_groups]


def lr_lambda(cfg: JobConfig) -> Callable[[int], float]:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    t = cfg.train
    # a task sequence with continual.schedule=restart: the schedule starts again with every task
    spans = [task.max_steps for task in cfg.continual.tasks] if cfg.continual.schedule == "restart" else []

    def one(step: int, length: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, length - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def f(step: int) -> float:
        for length in spans:
            if step < length:
                return one(step, length)
            step -= length
        return one(step, spans[-1] if spans else t.max_steps)

    return f


# ----------------------------------------------------------------------------------------------- engine


@dataclass
class Engine:
    """A DeepSpeed engine behind the handful of verbs the trainer uses."""

    ds: Any  # deepspeed.DeepSpeedEngine
    world_size: int
    rank: int
    grad_accum: int

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def device(self) -> torch.device:
        return self.ds.device

    @property
    def lr(self) -> float:
        """The learning rate of this step (the largest of the groups': those with LR_STEPS are 0 outside theirs)."""
        return max(self.ds.get_lr())

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    # forward, backward, step and save run DeepSpeed's collectives (ZeRO-3 gathers parameters in forward and
    # backward, reduces gradients in backward and step): only an error raised inside one of those becomes a
    # cluster.CollectiveError; the model's, the data's or a write's own errors pass through as they are.

    def forward(self, **batch: torch.Tensor) -> Any:
        with collective("forward", deepspeed=True):
            return self.ds(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides by grad_accum here and averages gradients over ranks at the boundary; the trainer
        # pre-scales the loss so that the net effect is sum(loss) / global_tokens (see Trainer.train_step).
        with collective("backward", deepspeed=True):
            self.ds.backward(loss)

    def step(self) -> None:
        """Called after every micro batch; DeepSpeed updates weights only at the accumulation boundary."""
        with collective("step", deepspeed=True):
            self.ds.step()

    @property
    def at_boundary(self) -> bool:
        """After a micro batch's backward: whether it was the step's last one (the gradients are complete; the
        next `step()` applies them)."""
        return bool(self.ds.is_gradient_accumulation_boundary())

    @property
    def step_applied(self) -> bool:
        """After the last micro batch of a step: whether the optimizer applied it. DeepSpeed skips a step whose
        global gradient norm is not finite, on every rank alike (the norm is all-reduced)."""
        return bool(self.ds.was_step_applied())

    def scale_lr(self, factor: float) -> None:
        """Multiply the learning rate, now and for the rest of the schedule (a rollback after non-finite steps)."""
        sched = self.ds.lr_scheduler
        sched.base_lrs = [lr * factor for lr in sched.base_lrs]
        for group in sched.optimizer.param_groups:
            group["lr"] *= factor
        sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]

    def grad_norm(self) -> float | None:
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else None

    save_frozen: bool = True
    """False: checkpoints hold the trainable parameters only (see BuildOptions.checkpoint_frozen)."""
    frozen_at_build: str = ""
    """Of the frozen parameters as built: a checkpoint that left them out continues only with the same ones."""
    dtype: torch.dtype = torch.float32

    def fingerprint_frozen(self) -> str:
        """Of the frozen parameters now (a collective): saved with a checkpoint that leaves them out, it proves they
        did not move in training when the run is resumed or reloaded from their sources."""
        return frozen_fingerprint(self.ds.module, self.dtype)

    def save(self, directory: str, tag: str) -> None:
        """Every rank writes its shard of weights, optimizer and schedule into `directory/tag`."""
        with collective("save_checkpoint", deepspeed=True):
            self.ds.save_checkpoint(directory, tag=tag, save_latest=False,
                                    exclude_frozen_parameters=not self.save_frozen)

    def load(self, directory: str, tag: str, saved_world_size: int | None = None) -> None:
        """Every rank reads its shard of `directory/tag` (a resume, a rollback). Only tensors and plain data are
        unpickled: DeepSpeed's checkpoint engine was made safe at build (`make_loads_safe`), and the few readers
        that call `torch.load` directly (universal checkpoints) are redirected while this runs. A file that names
        anything else raises UnsafeCheckpointError, and nothing of it runs. `saved_world_size`: the world size
        that wrote it, when not this one (ZeRO-3: see `load_other_world_size`)."""
        from mmscale.training.zero_checkpoint import loads_are_safe

        if saved_world_size not in (None, self.world_size):
            return self.load_other_world_size(directory, tag, saved_world_size)
        with loads_are_safe(), collective("load_checkpoint", deepspeed=True):
            path, _ = self.ds.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True, load_module_strict=self.save_frozen)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {directory}/{tag}")

    def load_other_world_size(self, directory: str, tag: str, saved_world_size: int) -> None:
        """A ZeRO-3 checkpoint saved by `saved_world_size` ranks, into this engine's partitioning: rank 0 converts it
        to DeepSpeed's universal checkpoint in `directory/.universal/tag` (every rank must see it: the checkpoint
        root is on the shared filesystem), every rank loads its slices from there, then the folder goes
        (mmscale.training.reshard). A conversion that fails stops every rank with rank 0's message."""
        import shutil

        from mmscale.training import reshard

        if not self.partitioned:
            raise RuntimeError(f"{directory}/{tag} was saved by {saved_world_size} ranks, this run has "
                               f"{self.world_size}: only ZeRO-3 checkpoints are converted for another world size")
        out = reshard.universal_dir(Path(directory), tag)
        error = None
        if self.rank == 0:
            log.info("%s was saved by %d ranks, this run has %d: converting it to a universal checkpoint in %s",
                     tag, saved_world_size, self.world_size, out)
            try:
                reshard.convert(Path(directory) / tag, out)
            except Exception as e:  # noqa: BLE001  (any converter error: every rank stops with it)
                error = f"{type(e).__name__}: {e}"
        error = broadcast_object(error)
        if error:
            raise RuntimeError(f"cannot convert {directory}/{tag} (saved by {saved_world_size} ranks) for "
                               f"{self.world_size} ranks: {error}")
        with collective("load_checkpoint", deepspeed=True):
            reshard.load(self.ds, out, tag)
        barrier()  # every rank has read it
        if self.rank == 0:
            shutil.rmtree(out.parent, ignore_errors=True)

    # ------------------------------------------------------------------- slots: this rank's share of the weights
    # For callbacks that work on the weights and their gradients (EWC): a "slot" per trainable parameter, in
    # `module.named_parameters()` order; see mmscale.continual.ewc. Under ZeRO-3 a slot is this rank's flat
    # partition (ceil(numel / world) elements, the first `valid` of them the parameter's, the rest padding), and
    # nothing here gathers a parameter; under ZeRO 0-2 (every rank holds every weight) it is the parameter itself.

    @property
    def partitioned(self) -> bool:
        """ZeRO-3: each rank holds only its partition of every parameter (and of its gradient)."""
        return bool(self.ds.zero_optimization_partition_weights())

    def trainable_params(self) -> list[torch.nn.Parameter]:
        """The parameters that train, in `module.named_parameters()` order."""
        return [p for _, p in self.ds.module.named_parameters() if p.requires_grad]

    def trainable_slots(self) -> tuple[list[torch.Tensor], list[int] | None]:
        """(slots, valid): this rank's slot of each trainable parameter and how many leading elements of each are
        the parameter's. ZeRO-3: the fp32 master partitions (views into the optimizer's flat buffer: read them,
        never write them) and the valid counts; ZeRO 0-2: the parameters themselves (in the training dtype) and
        None (all valid)."""
        params = self.trainable_params()
        if not self.partitioned:
            return params, None
        from deepspeed.utils import safe_get_local_fp32_param

        slots, valid = [], []
        for p in params:
            part = p.ds_tensor.numel()
            rank = dist.get_rank(group=getattr(p, "ds_process_group", None)) if dist.is_initialized() else 0
            slots.append(safe_get_local_fp32_param(p))
            valid.append(max(0, min(part, p.ds_numel - rank * part)))
        return slots, valid

    def _loss_scale(self) -> float:
        return float(getattr(self.ds.optimizer, "loss_scale", 1.0) or 1.0)

    def _require_partitioned(self, verb: str) -> None:
        if not self.partitioned:
            raise RuntimeError(f"Engine.{verb} reads ZeRO-3 gradient partitions; under ZeRO stage "
                               f"{self.ds.zero_optimization_stage()} the gradients are DeepSpeed's own (add a term "
                               f"to the loss instead)")

    def local_grads(self) -> list[torch.Tensor]:
        """ZeRO-3, after the step's last backward and before `step()`: this rank's partition of each trainable
        parameter's gradient (averaged over ranks, in loss units: a loss scale is undone), as fp32 copies."""
        self._require_partitioned("local_grads")
        from deepspeed.utils import safe_get_local_grad

        scale = self._loss_scale()
        return [safe_get_local_grad(p).detach().float().clone().div_(scale) for p in self.trainable_params()]

    def add_to_local_grads(self, values: list[torch.Tensor]) -> None:
        """ZeRO-3, after the step's last backward and before `step()`: add `values` (one per trainable parameter,
        this rank's partition, in loss units) to the gradients the optimizer is about to apply. Local: each rank
        adds its own partitions' term, nothing is reduced (the term is already the full gradient's partition).
        The step's gradient norm and clipping then include it."""
        self._require_partitioned("add_to_local_grads")
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        params = self.trainable_params()
        if len(values) != len(params):
            raise ValueError(f"{len(values)} values for {len(params)} trainable parameters: one per parameter")
        scale = self._loss_scale()
        for p, v in zip(params, values):
            g = safe_get_local_grad(p)
            v = v.reshape(-1).to(device=g.device, dtype=torch.float32)
            safe_set_local_grad(p, g.float() + (v * scale if scale != 1.0 else v))

    def grads_of(self, inputs: dict[str, torch.Tensor], loss_fn: Callable[[Any], torch.Tensor]) -> list[Any]:
        """A gradient pass outside training: forward `inputs` (this rank's batch), backward `loss_fn(output)`,
        and return, per trainable parameter, this rank's slot (see `trainable_slots`) of the gradient of the mean
        over ranks of the ranks' losses (None: the parameter got no gradient). Nothing is applied, and the
        engine's state (micro and global steps, the step's gradient buffers, optimizer, schedule) is as before:
        training goes on as if the pass had not run. A collective: every rank calls it at the same point,
        between optimizer steps.

        ZeRO-3: `engine.backward` at a forced accumulation boundary (`scale_wrt_gas=False`: the loss is not
        divided by the accumulation steps), the partitions read, then cleared with `optimizer.zero_grad()` (the
        next backward then writes its partitions instead of adding to them); the gradient buffers' contents from
        before the pass are put back. ZeRO 0-2: the module's own forward and `torch.autograd.grad`, which DeepSpeed
        never sees (its gradient hooks fire on accumulation into `.grad` only), then one all-reduce."""
        if self.ds.micro_steps % self.grad_accum:
            raise RuntimeError(f"Engine.grads_of in the middle of an optimizer step (micro step "
                               f"{self.ds.micro_steps}, {self.grad_accum} per step): it would mix into the step's "
                               f"gradients; call it between steps")
        with torch.enable_grad(), collective("grads_of", deepspeed=True):
            return self._grads_partitioned(inputs, loss_fn) if self.partitioned else \
                self._grads_whole(inputs, loss_fn)

    def _grads_partitioned(self, inputs: dict[str, torch.Tensor], loss_fn: Callable[[Any], torch.Tensor]) -> list[Any]:
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        ds, params = self.ds, self.trainable_params()
        # what the optimizer's gradient buffers hold now (a parameter the pass does not reach keeps its old
        # contents: DeepSpeed writes only the partitions a backward produces)
        before = [safe_get_local_grad(p).detach().clone() for p in params]
        opt_boundary = ds.optimizer.is_gradient_accumulation_boundary() \
            if hasattr(ds.optimizer, "is_gradient_accumulation_boundary") else None
        try:
            for p, g in zip(params, before):  # a parameter the loss does not reach reads 0, not the old contents
                safe_set_local_grad(p, torch.zeros_like(g))
            ds.set_gradient_accumulation_boundary(True)
            loss = loss_fn(ds(**inputs))
            ds.backward(loss, scale_wrt_gas=False)
            grads = self.local_grads()
        finally:
            ds.optimizer.zero_grad()  # micro_step_id back to 0: no accumulation into what comes next
            ds.set_gradient_accumulation_boundary(None)  # the engine counts micro steps again
            if opt_boundary is not None:  # the optimizer's copy of the flag, as the last training backward left it
                ds.optimizer.set_gradient_accumulation_boundary(opt_boundary)
            for p, g in zip(params, before):
                safe_set_local_grad(p, g)
        return grads

    def _grads_whole(self, inputs: dict[str, torch.Tensor], loss_fn: Callable[[Any], torch.Tensor]) -> list[Any]:
        params = self.trainable_params()
        loss = loss_fn(self.ds.module(**inputs))  # the module, not the engine: no backward hooks of DeepSpeed's
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return [None if g is None else g.detach().float() for g in grads]
        flat = torch.cat([(torch.zeros(p.numel(), device=p.device) if g is None else g.detach().float().reshape(-1))
                          for p, g in zip(params, grads)])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        return [t.view(p.shape) for t, p in zip(flat.split([p.numel() for p in params]), params)]


def param_dtype(cfg: JobConfig) -> torch.dtype:
    """The dtype every parameter must have in the engine: bf16 weights (fp32 master copy in the optimizer) or fp32."""
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


def check_param_dtypes(model: torch.nn.Module, expected: torch.dtype) -> None:
    """Refuse to train when any parameter (its ZeRO-3 partition included) is not `expected`."""
    wrong: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        dtype = getattr(p, "ds_tensor", p).dtype  # under ZeRO-3 p.data is an empty placeholder
        if dtype != expected:
            wrong.setdefault(str(dtype), []).append(name)
    if wrong:
        found = "; ".join(f"{len(v)} in {k} (e.g. {v[0]})" for k, v in wrong.items())
        raise RuntimeError(
            f"train.precision asks for {expected} parameters, but the engine holds {found}. DeepSpeed changed "
            f"the dtype while building; refusing to train in a precision nobody asked for"
        )


def frozen_fingerprint(model: torch.nn.Module, dtype: torch.dtype) -> str:
    """SHA-256 over (name, element count, byte sum, byte sum of squares) of every frozen parameter, as held in
    `dtype` (4-bit storage as it is). The same whatever the ZeRO stage and world size: under ZeRO-3 every rank counts
    the valid part of its partitions and the sums are all-reduced; in one process it is the full tensors. A
    collective under ZeRO-3: every rank calls it at the same point."""
    import hashlib

    rank = dist.get_rank() if dist.is_initialized() else 0
    names, rows = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition (equal sizes, the last one padded)
            part = p.ds_tensor.detach().flatten()
            valid = max(0, min(part.numel(), p.ds_numel - rank * part.numel()))
            t = part[:valid]
        else:  # every rank holds it whole: rank 0 counts it
            t = p.detach().flatten() if rank == 0 else p.detach().flatten()[:0]
        if t.is_floating_point() and type(p).__name__ != "Params4bit":
            t = t.to(dtype)
        row = torch.zeros(3, dtype=torch.int64)
        raw = t.contiguous().view(torch.uint8)
        for chunk in raw.split(1 << 24):
            b = chunk.to(torch.int64)
            row += torch.stack([torch.tensor(b.numel()), b.sum(), (b * b).sum()])
        names.append(name)
        rows.append(row)
    table = torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.int64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        with collective("all_reduce"):
            dist.all_reduce(table)
    digest = hashlib.sha256()
    for name, row in zip(names, table.tolist()):
        digest.update(f"{name}:{row}\n".encode())
    return f"{len(names)}:{digest.hexdigest()}"


def make_loads_safe(ds_engine: Any) -> None:
    """DeepSpeed 0.19's checkpoint engine (made in DeepSpeedEngine._configure_checkpointing) reads every model and
    optimizer file with `torch.load(weights_only=False)`, which runs any code a pickle names. Its `load` becomes
    `weights_only=True` with DeepSpeed's few data classes allowed (mmscale.training.zero_checkpoint holds the list);
    saving is untouched."""
    from mmscale.training.zero_checkpoint import safe_load

    def load(path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location=map_location)

    ds_engine.checkpoint_engine.load = load


def build_engine(cfg: JobConfig, build_model: Callable[[], torch.nn.Module], world_size: int, rank: int,
                 on_model_built: Callable[[torch.nn.Module], None] | None = None, sharded_build: bool = True,
                 save_frozen: bool = True) -> Engine:
    """Construct the model (sharded at birth under ZeRO-3), optimizer, schedule and DeepSpeed engine.
    `save_frozen=False`: checkpoints leave the frozen parameters out (their fingerprint goes in instead)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    ds_config = build_ds_config(cfg, world_size)
    # Keeps transformers' from_pretrained ZeRO-3 aware (it loads weights shard by shard) while it is alive. Not for
    # a whole build: transformers would still partition the towers it builds, and a callback that quantizes them in
    # on_model_built would find them empty.
    hf_ds = HfDeepSpeedConfig(ds_config) if cfg.deepspeed.zero_stage == 3 and sharded_build else None
    # No `dtype=` here: DeepSpeed 0.19.8's Init._set_dtype parses `dtype or fp16 if fp16_ok else bf16 if ...` as a
    # conditional around `dtype or fp16`, so on its CPU accelerator an explicit float32 comes out bf16. Without the
    # argument it follows the config's bf16 section. The dtype is checked after the build either way.
    # `sharded_build=False` (a quantized LM, which transformers quantizes from full tensors): built whole on each
    # rank, partitioned by deepspeed.initialize below.
    init = deepspeed.zero.Init(config_dict_or_path=ds_config) if cfg.deepspeed.zero_stage == 3 and sharded_build \
        else contextlib.nullcontext()
    with init:
        model = build_model()
    if cfg.model.init_from:  # the base weights first; callbacks then adapt the model (adapters, freezing)
        from mmscale.training.weights import load_initial_weights

        load_initial_weights(model, cfg.model.init_from, rank)
    if on_model_built is not None:
        on_model_built(model)
    if not sharded_build:  # zero.Init gave no dtype: every ordinary float parameter (not 4-bit storage) gets the
        # precision's, as ZeRO-3 flattens a parameter group into one buffer of one dtype
        dtype = param_dtype(cfg)
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype and type(p).__name__ != "Params4bit":
                p.data = p.data.to(dtype)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas(cfg, optimizer))
    ds_engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    ds_engine._mmscale_hf_ds = hf_ds  # keep alive for the engine's lifetime
    make_loads_safe(ds_engine)
    check_param_dtypes(ds_engine.module, param_dtype(cfg))
    engine = Engine(ds=ds_engine, world_size=world_size, rank=rank, grad_accum=grad_accum_steps(cfg, world_size),
                    save_frozen=save_frozen, dtype=param_dtype(cfg))
    if not save_frozen:
        engine.frozen_at_build = engine.fingerprint_frozen()
    return engine
