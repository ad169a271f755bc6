"""What an objective is: a registered part that owns its head, its loss, its normalisation, its metrics and its config
section. The trainer sums the weighted objectives and names none (mmscale.training.trainer).

An objective is an `nn.Module` held by the model (`model.objectives[name]`) and called at the end of the model's
forward, so that its head's parameters are gathered by ZeRO-3 like any other submodule's. It returns scalar SUMS
over its local samples (`loss_sum` first); the trainer turns them into the global mean the same way for every
objective:

    # global_avg_loss_k = sum over ranks and micro batches of loss_sum_k / global_count_k
    # DeepSpeed divides each backward by grad_accum and averages gradients over world_size, so each micro batch's
    # loss_sum_k is scaled by weight_k * grad_accum * world_size / global_count_k   (`Objective.scale`)

`count(batch)` is the objective's normaliser for one micro batch, read from the batch before the forward (target
tokens for captioning, labelled samples for classification, image-text pairs for contrastive): the trainer sums
every objective's count over the step's micro batches and all-reduces them once, in one small vector.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from mmscale.data.collate import IGNORE_INDEX  # noqa: F401  (re-exported: the label of what is not scored)



@dataclasses.dataclass
class ObjectiveSection:
    """The config section every objective has (`objectives.NAME`); an objective's own section subclasses it."""

    weight: float = 1.0
    """The objective's weight in the summed loss. 0 = measured (logged and validated), not trained."""


@dataclasses.dataclass
class ModelDims:
    """The widths an objective's head is built for."""

    hidden_size: int
    """The LM's hidden size (the text positions' features)."""
    media_size: int
    """The visual tokens' width (the resampler's output)."""
    num_latents: int
    """Visual tokens per image."""


class Objective(nn.Module):
    name: ClassVar[str] = ""
    Section: ClassVar[type[ObjectiveSection]] = ObjectiveSection
    needs_hidden: ClassVar[bool] = False
    """True: the model's forward also returns the LM's last hidden states (output_hidden_states)."""
    needs_logits: ClassVar[bool] = True
    """False: the objective reads no output of the LM's pass over the image-conditioned text (its logits or hidden
    states); when no objective does, the model skips that pass (e.g. contrastive alone encodes the text itself)."""
    sums: ClassVar[tuple[str, ...]] = ("loss_sum",)
    """The scalar sums `forward` returns that the trainer accumulates over a logging window (loss_sum first)."""
    eval_metrics: ClassVar[tuple[str, ...]] = ()
    """The validation metrics it reports (what train.keep_best or early stopping may rank by)."""
    headline: ClassVar[str] = ""
    """Its main training metric (of `step_metrics`): shown on the progress bar and plotted in loss.png."""
    eval_headline: ClassVar[str] = ""
    """Its main validation metric, plotted beside `headline`."""

    enable_hint: ClassVar[str] = ""
    """How a config turns it on, when that takes more than `objectives.NAME.weight=1` (error messages quote it)."""

    @classmethod
    def implied(cls, cfg: Any) -> bool:
        """True: the rest of the config asks for this objective although `objectives` does not list it (e.g. a head
        size); it is then measured, with weight 0."""
        return False

    def __init__(self, section: ObjectiveSection, dims: ModelDims, cfg: Any):
        super().__init__()
        self.section = section
        self.weight = float(section.weight)

    # ------------------------------------------------------------------------------------------- the config
    @classmethod
    def config_problems(cls, section: ObjectiveSection, cfg: Any) -> list[str]:
        """What this objective needs of the rest of the config (e.g. a head size); `objectives.NAME` prefixes each."""
        return []

    # ------------------------------------------------------------------------------------------- training
    def count(self, batch: dict[str, Any]) -> int:
        """This micro batch's share of the global normaliser (see the module doc)."""
        raise NotImplementedError

    def scale(self, global_count: float, grad_accum: int, world_size: int) -> float:
        """The factor on each micro batch's loss_sum that makes the step's gradient that of weight * global mean."""
        return self.weight * grad_accum * world_size / max(global_count, 1.0)

    def forward(self, model: nn.Module, out: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """This micro batch's scalar sums (`loss_sum` in fp32 first, then the others of `sums`), and whatever else
        its users read (logits, embeddings). `out`: the model's output so far (logits, hidden, media); `batch`: the
        forward's inputs. Return {} when the batch has no labels for it (generation)."""
        raise NotImplementedError

    def step_metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        """The logged training metrics from a window's sums and count, summed over ranks."""
        raise NotImplementedError

    def set_active_classes(self, classes: list[int]) -> None:
        """Class-incremental learning: only `classes` may be predicted from now on (a task sequence's tasks so
        far). Objectives without classes ignore it."""

    # ------------------------------------------------------------------------------------------- evaluation
    def eval_start(self) -> dict[str, Any]:
        return {}

    def eval_update(self, state: dict[str, Any], terms: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        """Add one validation micro batch (this objective's `terms` from the forward) to `state`."""

    def eval_finish(self, state: dict[str, Any], all_reduce_sum: Callable[[Any], torch.Tensor],
                    all_gather_object: Callable[[Any], list[Any]]) -> dict[str, Any]:
        """The validation metrics, over every rank's batches (both reductions are collectives: every rank calls)."""
        return {}


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Register an objective class under its `name` (refused twice)."""
    if not cls.name:
        raise ValueError(f"{cls}: an objective needs a name")
    if cls.name in OBJECTIVES:
        raise ValueError(f"objective {cls.name!r} is registered twice ({OBJECTIVES[cls.name]} and {cls})")
    OBJECTIVES[cls.name] = cls
    return cls


DEFAULT_OBJECTIVES: dict[str, dict[str, Any]] = {"captioning": {}}
"""What a config without an `objectives:` section trains: the captioning (next-token) loss, weight 1."""


def active_objectives(cfg: Any) -> dict[str, dict[str, Any]]:
    """The objectives a config trains or measures, name -> its section's raw values: those listed (none: the
    default), in config order, then those the rest of the config implies (`Objective.implied`), measured only."""
    active = dict(cfg.objectives) if cfg.objectives else dict(DEFAULT_OBJECTIVES)
    for name, cls in OBJECTIVES.items():
        if name not in active and cls.implied(cfg):
            active[name] = {"weight": 0.0}
    return active
