"""What an export is given, checked before any work: the run (opened as every tool opens one, mmscale.job.runs and
mmscale.training.verified: its newest checkpoint that verifies, or `--checkpoint` by name or path, which must; the
config recorded with those weights) and the folder to write. Problems are collected, not raised, so that an export
reports every one at once, each with its fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmscale.export.layout import CONFIG_JSON, CONFIG_YAML, FORMAT, is_export
from mmscale.job import runs
from mmscale.training import verified


def open_run(run: Path, given: str | Path | None, problems: list[str]) -> tuple[Any, Path | None]:
    """(the config recorded with the weights, the verified checkpoint) of the run to export: `given` (`--checkpoint`,
    a name under the run's checkpoints/ or a path), else the run's newest that verifies (damaged ones skipped with a
    warning). What is wrong goes into `problems`: then the checkpoint is None, and the config is that of the run's
    config.yaml (so the other problems are found too), or None."""
    if not run.is_dir():
        problems.append(f"--run {str(run)!r} is not a directory; give the output_dir of a training run")
        return None, None
    if not (run / CONFIG_YAML).is_file():
        problems.append(f"--run {str(run)!r} holds no {CONFIG_YAML}: not the output_dir of a training run "
                        f"(launchers/train.py writes it there when the job starts)")
        return None, None
    try:
        ckpt = verified.find_checkpoint(run, given, "--run", "--checkpoint")
    except verified.RunOpenError as e:
        if given is None:
            problems.append(f"{e}; or name a checkpoint that verifies with --checkpoint")
        else:  # `e` names the value given; export's own fix after the generic one
            problems.append(f"{e} (a name under {run / verified.CHECKPOINTS} or a path; or leave --checkpoint out "
                            f"for the run's newest that verifies)")
        try:  # no export; the run's config.yaml still shows what else is wrong (every problem at once)
            return runs.config_for_run(run), None
        except ValueError as e:  # ConfigError
            problems.append(f"{run / CONFIG_YAML}: {e}")
            return None, None
    try:
        return runs.checkpoint_config(ckpt), ckpt
    except ValueError as e:  # RunOpenError: the recorded config does not load
        problems.append(str(e))
        return None, None


def out_problems(out: Path, run: Path, overwrite: bool) -> list[str]:
    """What is wrong with `--out` as the folder to write the export of `run` into (empty: nothing)."""
    if out.exists() and not out.is_dir():
        return [f"--out {str(out)!r} is a file; choose a folder"]
    resolved, run_resolved = out.resolve(), run.resolve()
    if resolved == run_resolved or resolved in run_resolved.parents or \
            (run_resolved / verified.CHECKPOINTS) in (resolved, *resolved.parents):
        return [f"--out {str(out)!r} would hold the run {str(run)!r} or sit among its checkpoints; choose a folder "
                f"outside them (e.g. {str(run / 'export')!r})"]
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            return [f"--out {str(out)!r} exists and is not empty; choose another --out, or pass --overwrite to "
                    f"replace it"]
        if not is_export(out):
            return [f"--out {str(out)!r} holds files that are not an mmscale export (no {CONFIG_JSON} of format "
                    f"{FORMAT!r}); --overwrite replaces only an earlier export: remove the folder yourself, or "
                    f"choose another --out"]
    return []
