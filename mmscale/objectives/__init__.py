"""Objectives as registered parts: what the trainer sums, each with its head, loss, normalisation, metrics and config
section (`objectives.NAME`, its `weight` and its own keys).

    objectives:                     # none given = captioning alone, weight 1
      captioning: {weight: 1.0}
      contrastive: {weight: 0.5, embed_dim: 64}

Adding an objective is one file that subclasses `Objective` and registers it (`@register_objective`), imported
below; the trainer, the model and the config schema do not change.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mmscale.objectives.base import (DEFAULT_OBJECTIVES, IGNORE_INDEX, OBJECTIVES, ModelDims, Objective,
                                     ObjectiveSection, active_objectives, register_objective)

__all__ = ["DEFAULT_OBJECTIVES", "IGNORE_INDEX", "OBJECTIVES", "ModelDims", "Objective", "ObjectiveSection",
           "active_objectives", "attach_objectives", "build_objectives", "eval_metric_names", "metric_problems", "objective_problems",
           "objective_sections", "register_objective"]


def objective_sections(cfg: Any) -> tuple[dict[str, ObjectiveSection], list[str]]:
    """Each active objective's section, built from the config (unknown keys and wrong types reported)."""
    from mmscale.config import registered_sections

    return registered_sections(active_objectives(cfg), OBJECTIVES, "objectives", "objective", "{weight: 1.0}")


def objective_problems(cfg: Any) -> list[str]:
    """Every problem with the config's objectives: names, keys, weights, and what each needs of the rest."""
    sections, p = objective_sections(cfg)
    for name, s in sections.items():
        if not (isinstance(s.weight, (int, float)) and s.weight >= 0):
            p.append(f"objectives.{name}.weight: {s.weight!r} must be >= 0 (0 = measured, not trained)")
        p += [f"objectives.{name}: {q}" for q in OBJECTIVES[name].config_problems(s, cfg)]
    if sections and not any(isinstance(s.weight, (int, float)) and s.weight > 0 for s in sections.values()):
        p.append(f"objectives: every weight is 0 ({', '.join(sections)}): nothing to train; set one > 0, e.g. "
                 f"objectives.{next(iter(sections))}.weight=1")
    return p


def build_objectives(cfg: Any, dims: ModelDims) -> nn.ModuleDict:
    """The active objectives' modules (their heads initialised here: build under zero.Init to shard them)."""
    sections, problems = objective_sections(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    return nn.ModuleDict({name: OBJECTIVES[name](s, dims, cfg) for name, s in sections.items()})


def attach_objectives(model: nn.Module, cfg: Any = None) -> nn.Module:
    """`model.objectives` built for the JobConfig `cfg` (None: the defaults, captioning alone) on the model's
    widths; returns the model. The one way heads are attached (mmscale.job.build's recipe calls it, under zero.Init
    when the engine builds)."""
    if cfg is None:
        from mmscale.config import JobConfig

        cfg = JobConfig()
    dims = ModelDims(hidden_size=model.lm.config.hidden_size, media_size=model.media_size,
                     num_latents=model.resampler.num_latents)
    model.objectives = build_objectives(cfg, dims)
    return model


def eval_metric_names(cfg: Any) -> tuple[str, ...]:
    """The validation metrics a config's objectives report."""
    return tuple(m for name in active_objectives(cfg) if name in OBJECTIVES for m in OBJECTIVES[name].eval_metrics)


def metric_problems(where: str, metric: str, cfg: Any, fix: str) -> list[str]:
    """`metric` (train.keep_best, a callback's metric) is one that validation reports with this config; else one
    problem naming `where`, the value, the metrics there are and `fix` (e.g. `keep_best=val_loss`)."""
    have = eval_metric_names(cfg)
    if metric in have:
        return []
    owner = next((cls for cls in OBJECTIVES.values() if metric in cls.eval_metrics), None)
    if owner is not None:
        enable = owner.enable_hint or f"add objectives.{owner.name}"
        return [f"{where}: {metric!r} is reported by the {owner.name} objective, which this config does not have "
                f"(objectives: {', '.join(active_objectives(cfg))}); {enable}; or {fix}"]
    return [f"{where}: {metric!r} is not a validation metric; validation reports {', '.join(have)} here: e.g. {fix}"]


from mmscale.objectives import captioning  # noqa: E402,F401  (registers captioning)
from mmscale.objectives import classification  # noqa: E402,F401  (registers classification)
from mmscale.objectives import contrastive  # noqa: E402,F401  (registers contrastive)
