"""Elastic Weight Consolidation on flat parameter slots, whole or ZeRO-3 partitions: Fisher, anchors, penalty.

EWC (Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017, arXiv:1612.00796)
keeps what earlier tasks learned by pulling each parameter towards its value at the end of those tasks, in
proportion to how much that task's log-likelihood depends on it, measured by the diagonal of the Fisher information:

    penalty(theta) = lambda/2 * sum_{tasks t} sum_i F_{t,i} * (theta_i - theta*_{t,i})^2
    d penalty / d theta_i = lambda * sum_t F_{t,i} * (theta_i - theta*_{t,i})

Two ways to keep the tasks (`EWCState(mode=...)`):

- "separate" (the paper): one (anchor theta*_t, Fisher F_t) pair per finished task; memory grows with the tasks.
- "online" (Schwarz et al., "Progress & Compress", ICML 2018, arXiv:1805.06370, "online EWC"): one pair.
  Consolidating task t sets F <- gamma * F + F_t and theta* <- theta*_t (the latest anchor); gamma in [0, 1]
  forgets old tasks' importance geometrically (gamma = 1: plain sum).

Slots
-----
Everything works on a list of tensors, "slots", one per parameter, in a fixed order (the same order at every call
and on every rank). A slot is either a whole parameter (one process, or ZeRO stage 0-2 where every rank holds the
full weights; any shape, read as flattened) or this rank's ZeRO-3 partition of it: a flat tensor of
ceil(numel / world_size) elements, of which the first `valid` hold the parameter's elements
[rank * partition_numel, rank * partition_numel + valid) and the rest is padding (DeepSpeed allocates partitions
with `torch.empty`, so padding may hold anything, NaN included). `partition_valid_numel` gives `valid`.
Nothing here gathers, reduces or talks to other ranks: the penalty is a sum over elements, so the full penalty is
the sum over ranks of each rank's penalty on its partitions, and its gradient with respect to a partition is that
rank's partition of the full gradient. Padding never contributes: Fisher and anchors are kept for the valid
elements only, the penalty reads only those, and `penalty_grad` is exactly 0 in the padding.

Memory: per kept task, one anchor and one Fisher value per valid slot element, in `dtype` (fp32 by default:
8 bytes per parameter on this rank); "online" keeps one task whatever the number of tasks, "separate" one per task.
A `FisherAccumulator` adds one more value per element while the Fisher pass runs.

The Fisher: what `FisherAccumulator.add` wants
----------------------------------------------
The diagonal empirical Fisher of a task is F_i = E_x[(d log p(y|x; theta) / d theta_i)^2] over the task's samples
(x, y) (empirical: y is the data's label; for the "true" Fisher sample y from the model instead and differentiate
that: the accumulator does not care, it squares what it is given). The sign does not matter, so the gradient of
the negative log-likelihood (the training loss) does as well.

- Per sample (exact): pass the gradient of one sample's loss, `batch_size=1`. The result is the mean of g^2.
- Per batch (what a data-parallel engine gives, where per-sample gradients are not available): pass the gradient
  of the *mean* loss over B samples, g_bar, with `batch_size=B`. The accumulator adds B * g_bar^2: for independent
  samples E[B * g_bar^2] = E[g^2] + (B - 1) * E[g]^2, so the estimate is unbiased where the mean gradient is 0
  (at the end of training on the task, roughly) and too high by (B - 1) * E[g]^2 otherwise; smaller batches are
  closer to the per-sample Fisher. Without the factor B (plain g_bar^2, as some implementations do) the Fisher would
  shrink like 1/B and lambda would silently depend on the batch size.
- The gradient must be of the plain loss: undo any loss scaling (fp16 dynamic loss scale; DeepSpeed's division by
  gradient_accumulation_steps when the pass calls `engine.backward` once per batch) before passing it.
- A loss averaged over tokens gives a Fisher per token (lambda absorbs the scale). Pass `weight` to weigh calls
  (e.g. by their token count); the result is sum(weight * batch_size * g^2) / sum(weight).
- A `None` gradient (a parameter the forward did not use) counts as 0.
- Non-finite gradients (a batch whose fp16 loss scale overflowed) must be skipped by the caller: a local check here
  would be a sync point and could disagree between ranks.

How a ZeRO-3 trainer callback uses it (every rank, same calls in the same order)
--------------------------------------------------------------------------------
`params` = the trainable parameters in `module.named_parameters()` order; `rank` = the data-parallel rank;
`deepspeed.utils.safe_get_local_fp32_param(p)`, `safe_get_local_grad(p)`, `safe_set_local_grad(p, g)` read and write
this rank's fp32 partitions (each `p.ds_tensor.numel()` long, padding included).

1. At the end of task t: `slots = [safe_get_local_fp32_param(p) for p in params]` (the fp32 master partition: the
   most precise anchor; `p.ds_tensor` also works), `valid = [partition_valid_numel(p.ds_numel, p.ds_tensor.numel(),
   rank) ...]`, `acc = FisherAccumulator(slots, valid)`. For some batches of task t: forward, `engine.backward(loss)`
   at a gradient-accumulation boundary, `acc.add([safe_get_local_grad(p) ...], batch_size=micro_batch *
   world_size)` (ZeRO-3 averages the gradient over the data-parallel ranks' micro batches), then clear the
   gradients without an optimizer step (`engine.optimizer.zero_grad()`: ZeRO-3 then writes the next backward's
   partitions instead of adding to them). Then `state.consolidate(slots, acc.result())` (it copies what it keeps).
2. While training later tasks, once per optimizer step, after the last micro batch's backward and before
   `engine.step()`: `g = state.penalty_grad([safe_get_local_fp32_param(p) ...])`, then for each p
   `safe_set_local_grad(p, safe_get_local_grad(p) + g_i)` (times the loss scale under fp16). The gradients are local:
   each rank adds its own partitions' term once; nothing is all-reduced. (Under ZeRO-3, autograd cannot reach the
   partitions: parameters are gathered inside the forward and freed after it.)
3. For logging only: `state.penalty(slots)` on every rank, all-reduced (SUM) across ranks, is the full penalty.
4. `state.state_dict()` in the callback's state (per rank: each rank saves its own partitions; the trainer
   already saves callback state per rank), with the rank and world size next to it so that a resume with another
   world size is refused (slot lengths are checked too).

Without ZeRO-3 (one process, ZeRO 0-2) the slots are the parameters themselves, `valid` is None, and the penalty can
simply be added to the loss (`on_loss`): `loss + state.penalty([p for p in params])`, differentiated by autograd.
Added per micro batch, it counts once per optimizer step: the engine scales each micro batch's loss by
1/gradient_accumulation_steps, and averaging the ranks' identical penalty gradients leaves them as they are.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["EWCState", "FisherAccumulator", "partition_valid_numel", "MODES"]

MODES = ("separate", "online")
FORMAT_VERSION = 1


def partition_valid_numel(full_numel: int, partition_numel: int, rank: int) -> int:
    """Elements of a ZeRO-3 partition that belong to the parameter (the rest is padding): partitions are
    `partition_numel` = ceil(full_numel / world_size) long and rank r holds elements from r * partition_numel on.
    Under ZeRO-3: `partition_valid_numel(p.ds_numel, p.ds_tensor.numel(), rank)`; can be 0 on the last ranks."""
    if full_numel < 0 or partition_numel < 0 or rank < 0:
        raise ValueError(f"partition_valid_numel({full_numel}, {partition_numel}, {rank}): all must be >= 0")
    return max(0, min(partition_numel, full_numel - rank * partition_numel))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def _check_valid(numels: list[int], valid: Sequence[int] | None) -> list[int]:
    if valid is None:
        return list(numels)
    valid = list(valid)
    if len(valid) != len(numels):
        raise ValueError(f"valid has {len(valid)} entries for {len(numels)} slots: give one count per slot")
    for i, (v, n) in enumerate(zip(valid, numels)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= n:
            raise ValueError(f"valid[{i}] = {v!r}: must be an int in [0, {n}] (slot {i} has {n} elements)")
    return valid


class FisherAccumulator:
    """Mean of (batch_size * squared gradient) per element of each slot's valid part: the diagonal empirical Fisher.

    `slots_like`: the slots (their sizes and devices are used; values are not read). `valid[i]`: how many leading
    elements of slot i are the parameter's (None: all; see `partition_valid_numel`); padding is never read.
    `dtype`: accumulation and result dtype (fp32 by default; gradients in bf16/fp16 are upcast before squaring).
    See the module docstring for what `add` must be given.
    """

    def __init__(self, slots_like: Sequence[torch.Tensor], valid: Sequence[int] | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if not dtype.is_floating_point:
            raise TypeError(f"dtype {dtype}: the Fisher needs a floating-point dtype (torch.float32 or float64)")
        self.numels = [s.numel() for s in slots_like]
        self.valid = _check_valid(self.numels, valid)
        self.dtype = dtype
        self._sums = [torch.zeros(v, dtype=dtype, device=s.device) for s, v in zip(slots_like, self.valid)]
        self.total_weight = 0.0
        self.num_added = 0

    def add(self, grads: Sequence[torch.Tensor | None], weight: float = 1.0, batch_size: int = 1) -> None:
        """Add one gradient per slot (same sizes as the slots; None = 0): `grads` is the gradient of one sample's
        loss (`batch_size=1`) or of the mean loss over `batch_size` samples; adds weight * batch_size * grad^2."""
        if len(grads) != len(self._sums):
            raise ValueError(f"{len(grads)} gradients for {len(self._sums)} slots: pass one per slot, in slot order")
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight={weight!r}: must be a finite number > 0")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be an int >= 1 (samples the gradient averages over)")
        for i, g in enumerate(grads):
            if g is not None and g.numel() != self.numels[i]:
                raise ValueError(f"gradient {i} has {g.numel()} elements, its slot {self.numels[i]}: pass the "
                                 f"gradient of the same slot (the whole partition, padding included)")
        scale = float(weight) * batch_size
        with torch.no_grad():
            for acc, g, n in zip(self._sums, grads, self.valid):
                if g is None or n == 0:
                    continue
                gv = _flat(g.detach())[:n].to(device=acc.device, dtype=acc.dtype)
                acc.addcmul_(gv, gv, value=scale)
        self.total_weight += float(weight)
        self.num_added += 1

    def result(self) -> list[torch.Tensor]:
        """The Fisher per slot, `valid[i]` elements each (padding left out), in `dtype`: new tensors."""
        if self.num_added == 0:
            raise RuntimeError("FisherAccumulator.result() before any add(): the Fisher of no data is undefined")
        return [s / self.total_weight for s in self._sums]


class EWCState:
    """The anchors and Fisher of the tasks learned so far, and the EWC penalty and its gradient on slots.

    `lam`: the penalty's lambda (>= 0). `mode`: "separate" (a pair per task) or "online" (one pair, F <- gamma * F +
    F_new, the latest anchor). `gamma`: online mode's decay in [0, 1]. `dtype`: what anchors and Fisher are kept in
    (fp32 by default). Stored tensors live on the device of the slots given to `consolidate`, and follow the slots
    given to `penalty`/`penalty_grad` (moved once, the first time the device differs, e.g. after a CPU-mapped load).
    """

    def __init__(self, lam: float, mode: str = "separate", gamma: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: must be one of {', '.join(MODES)}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam={lam!r}: the EWC strength must be a finite number >= 0")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma={gamma!r}: must be a number in [0, 1]")
        if mode == "separate" and gamma != 1.0:
            raise ValueError(f"gamma={gamma!r} with mode='separate': gamma is online EWC's decay; use mode='online' "
                             f"or leave gamma at 1.0")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype {dtype}: must be a floating-point dtype (torch.float32 or float64)")
        self.lam = float(lam)
        self.mode = mode
        self.gamma = float(gamma)
        self.dtype = dtype
        self.slot_numels: list[int] | None = None  # set by the first consolidate: every later call must match
        self.num_consolidated = 0  # tasks consolidated (online mode keeps one pair for all of them)
        self._anchors: list[list[torch.Tensor]] = []  # [task][slot], valid elements only
        self._fishers: list[list[torch.Tensor]] = []

    @property
    def num_kept(self) -> int:
        """(anchor, Fisher) pairs held: the tasks in "separate" mode, at most 1 in "online" mode."""
        return len(self._anchors)

    @property
    def anchors(self) -> list[list[torch.Tensor]]:
        """[pair][slot] anchors (valid elements only). The stored tensors, not copies: read, do not modify."""
        return self._anchors

    @property
    def fishers(self) -> list[list[torch.Tensor]]:
        """[pair][slot] Fisher (valid elements only). The stored tensors, not copies: read, do not modify."""
        return self._fishers

    # ----------------------------------------------------------------------------------------------- checks

    def _check_slots(self, slots: Sequence[torch.Tensor], what: str) -> None:
        if self.slot_numels is None:
            return
        if len(slots) != len(self.slot_numels):
            raise ValueError(f"{what}: {len(slots)} slots, but the EWC state was consolidated with "
                             f"{len(self.slot_numels)}: pass the same parameters in the same order")
        for i, (s, n) in enumerate(zip(slots, self.slot_numels)):
            if s.numel() != n:
                raise ValueError(f"{what}: slot {i} has {s.numel()} elements, but it had {n} when consolidated "
                                 f"(another parameter order, or another world size under ZeRO-3?)")

    def _follow(self, device: torch.device) -> None:
        """Move every stored tensor to `device` if it is not there (after loading a checkpoint mapped to CPU)."""
        for pairs in (self._anchors, self._fishers):
            for task in pairs:
                for i, t in enumerate(task):
                    if t.device != device:
                        task[i] = t.to(device)

    # ----------------------------------------------------------------------------------------------- consolidate

    def consolidate(self, anchor_slots: Sequence[torch.Tensor], fisher: Sequence[torch.Tensor]) -> None:
        """End of a task: keep `anchor_slots` (the parameters now) and `fisher` (`FisherAccumulator.result()`: per
        slot, its valid elements, or the whole slot). Copies both. Online mode: F <- gamma * F + fisher, anchor <-
        anchor_slots. Local checks only (a non-finite or negative Fisher raises ValueError on this rank)."""
        if len(anchor_slots) != len(fisher):
            raise ValueError(f"{len(anchor_slots)} anchor slots but {len(fisher)} Fisher tensors: one each per slot")
        self._check_slots(anchor_slots, "consolidate")
        anchors, fishers = [], []
        with torch.no_grad():
            for i, (a, f) in enumerate(zip(anchor_slots, fisher)):
                n = f.numel()
                if n > a.numel():
                    raise ValueError(f"Fisher {i} has {n} elements, its slot only {a.numel()}")
                if self._fishers and n != self._fishers[0][i].numel():
                    raise ValueError(f"Fisher {i} has {n} elements, the kept one {self._fishers[0][i].numel()}: "
                                     f"the valid part of a slot cannot change between tasks")
                fv = _flat(f.detach()).to(device=a.device, dtype=self.dtype, copy=True)
                if not bool(torch.isfinite(fv).all()) or bool((fv < 0).any()):  # a sync point: once per task
                    raise ValueError(f"Fisher {i} has non-finite or negative values: skip non-finite gradients "
                                     f"when accumulating (see FisherAccumulator.add)")
                anchors.append(_flat(a.detach())[:n].to(dtype=self.dtype, copy=True))
                fishers.append(fv)
        if self.slot_numels is None:
            self.slot_numels = [a.numel() for a in anchor_slots]
        if self.mode == "online" and self._fishers:
            # new tensors, not in place: what an earlier state_dict() returned stays as it was
            self._fishers[0] = [self.gamma * old.to(f.device) + f for old, f in zip(self._fishers[0], fishers)]
            self._anchors[0] = anchors
        else:
            self._anchors.append(anchors)
            self._fishers.append(fishers)
        self.num_consolidated += 1

    # ----------------------------------------------------------------------------------------------- penalty

    def penalty(self, current_slots: Sequence[torch.Tensor]) -> torch.Tensor:
        """lambda/2 * sum over kept pairs and valid elements of F * (theta - anchor)^2, differentiable with respect
        to `current_slots`: a 0-dim tensor in the widest of the slots' dtypes and `dtype`. Under ZeRO-3 it is this
        rank's share: the sum over ranks is the full penalty."""
        self._check_slots(current_slots, "penalty")
        if not current_slots:
            return torch.zeros((), dtype=self.dtype)
        device = current_slots[0].device
        ct = functools.reduce(torch.promote_types, (s.dtype for s in current_slots), self.dtype)
        if not self._anchors:
            return torch.zeros((), dtype=ct, device=device)
        self._follow(device)
        terms = []
        for i, cur in enumerate(current_slots):
            n = self._fishers[0][i].numel()
            c = _flat(cur)[:n].to(ct)
            for anchors, fishers in zip(self._anchors, self._fishers):
                d = c - anchors[i].to(ct)
                terms.append(torch.sum(fishers[i].to(ct) * d * d))
        return (0.5 * self.lam) * torch.stack(terms).sum()

    def penalty_grad(self, current_slots: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """lambda * sum over kept pairs of F * (theta - anchor), per slot: new tensors shaped like the slots (the
        whole slot, exactly 0 in the padding), in the wider of the slot's dtype and `dtype`. No autograd; add it to
        the slots' gradients (under ZeRO-3: to this rank's gradient partitions; nothing to reduce)."""
        self._check_slots(current_slots, "penalty_grad")
        if current_slots:
            self._follow(current_slots[0].device)
        out = []
        with torch.no_grad():
            for i, cur in enumerate(current_slots):
                ct = torch.promote_types(cur.dtype, self.dtype)
                g = torch.zeros(cur.numel(), dtype=ct, device=cur.device)
                if self._anchors:
                    n = self._fishers[0][i].numel()
                    c, gv = _flat(cur.detach())[:n].to(ct), g[:n]
                    for anchors, fishers in zip(self._anchors, self._fishers):
                        gv.addcmul_(fishers[i].to(ct), c - anchors[i].to(ct))
                    gv.mul_(self.lam)
                out.append(g.view(cur.shape))
        return out

    # ----------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Plain values and tensors only (loads with `torch.load(weights_only=True)`). The tensors are the stored
        ones, not copies (no method modifies a stored tensor in place, so it stays a snapshot). Per rank under
        ZeRO-3."""
        return {
            "format": FORMAT_VERSION,
            "mode": self.mode,
            "lam": self.lam,
            "gamma": self.gamma,
            "dtype": str(self.dtype).removeprefix("torch."),
            "num_consolidated": self.num_consolidated,
            "slot_numels": None if self.slot_numels is None else list(self.slot_numels),
            "anchors": [list(task) for task in self._anchors],
            "fishers": [list(task) for task in self._fishers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the kept pairs. The mode must match; lam and gamma stay this object's (the config's), so a resumed
        run can change them; stored tensors are converted to this object's dtype."""
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(f"EWC state format {state.get('format')!r}: this version reads format {FORMAT_VERSION}")
        if state["mode"] != self.mode:
            raise ValueError(f"the EWC state was saved in mode {state['mode']!r}, this one is {self.mode!r}: "
                             f"resume with mode={state['mode']!r}")
        anchors, fishers, numels = state["anchors"], state["fishers"], state["slot_numels"]
        if len(anchors) != len(fishers) or (self.mode == "online" and len(anchors) > 1):
            raise ValueError(f"EWC state holds {len(anchors)} anchor sets and {len(fishers)} Fisher sets "
                             f"(mode {self.mode!r}): corrupt state")
        if anchors and numels is None:
            raise ValueError("EWC state holds tasks but no slot_numels: corrupt state")
        for a_task, f_task in zip(anchors, fishers):
            if len(a_task) != len(numels) or len(f_task) != len(numels):
                raise ValueError(f"EWC state: a task has {len(a_task)} anchors and {len(f_task)} Fisher tensors "
                                 f"for {len(numels)} slots: corrupt state")
            for i, (a, f) in enumerate(zip(a_task, f_task)):
                if a.dim() != 1 or a.shape != f.shape or a.numel() > numels[i] or \
                        f.numel() != fishers[0][i].numel():
                    raise ValueError(f"EWC state: slot {i} anchor {tuple(a.shape)}, Fisher {tuple(f.shape)}, slot "
                                     f"{numels[i]} elements: corrupt state")
        self.slot_numels = None if numels is None else [int(n) for n in numels]
        self.num_consolidated = int(state["num_consolidated"])
        self._anchors = [[a.to(self.dtype) for a in task] for task in anchors]
        self._fishers = [[f.to(self.dtype) for f in task] for task in fishers]
