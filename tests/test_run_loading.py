"""Opening a trained run (issue 18, findings 2, 5 and 6): what a tool that loads weights reads, and what a refused
or contradictory start leaves alone.

- Finding 2: a refused `--resume` must not rewrite `config.yaml`; every tool that loads weights builds the model from
  the config recorded with those weights (the checkpoint's manifest), not from the run's newest config.yaml.
- Finding 5: generate, evaluate, export and init_from use the newest checkpoint that verifies against its manifest,
  skip damaged ones with a warning naming them (and leave them where they are: the tools are read-only), and stop
  with a clear error (no traceback) when none verifies or a checkpoint given by path fails.
- Finding 6: `--resume --overwrite` is refused before anything is touched.

One tiny single-process run (configs/tiny.yaml, 4 steps, checkpoints at steps 2 and 4) serves every test; a test
that changes a run changes its own copy.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from procgroup import run_group
from test_training import ROOT, _port

STEPS = ["train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=5"]
STEP_2, STEP_4 = "step_00000002", "step_00000004"


def train(out: Path, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`launchers/train.py --config configs/tiny.yaml output_dir=out ...` in one process, killed with its process
    group however it ends."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(_port()), **(env or {})}
    cmd = [sys.executable, str(ROOT / "launchers/train.py"), "--config", str(ROOT / "configs/tiny.yaml"),
           f"output_dir={out}", *STEPS, *args]
    return run_group(cmd, cwd=ROOT, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The shared run: treat as read-only (copy it with `copy_run` to change it)."""
    out = tmp_path_factory.mktemp("run_loading") / "run"
    r = train(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [STEP_2, STEP_4]
    return out


def copy_run(run: Path, where: Path) -> Path:
    shutil.copytree(run, where / "run")
    return where / "run"


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def optim_file(ckpt: Path) -> Path:
    (found,) = sorted(ckpt.glob("*optim_states.pt"))
    return found


def set_config_yaml(run: Path, **model_xattn) -> None:
    """What the code before the fix left behind after a refused resume: config.yaml saying something else than the
    weights were trained with."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"].setdefault("xattn", {}).update(model_xattn)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def same_weights(model: torch.nn.Module, state: dict) -> bool:
    mine = model.state_dict()
    return all(torch.equal(mine[k].float(), v.float()) for k, v in state.items() if k in mine)


# ----------------------------------------------------------------------------------------------- finding 2


def test_a_refused_resume_leaves_config_yaml_as_it_was(trained, tmp_path):
    """Finding 2: `--resume model.xattn.media_mode=all` is refused (exit 2), and config.yaml still describes the
    weights (before: it said `all`, and an export then built the `previous`-trained weights as `all`)."""
    run = copy_run(trained, tmp_path)
    before = (run / "config.yaml").read_bytes()
    r = train(run, "model.xattn.media_mode=all", "--resume")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "model.xattn.media_mode" in r.stderr
    assert (run / "config.yaml").read_bytes() == before


def test_tools_build_the_model_from_the_checkpoints_config(trained, tmp_path):
    """Finding 2: with a config.yaml that disagrees with the weights (media_mode `all`, as the refused resume left
    it), generate/evaluate's loader, `--model RUN/checkpoints/step_N` and export all build the model from the config
    in the checkpoint's manifest (`previous`)."""
    from mmscale.job.runs import load_run
    from mmscale.export import export_model
    from mmscale.inference import load_model

    run = copy_run(trained, tmp_path)
    set_config_yaml(run, media_mode="all")
    cfg, _, _ = load_run(run)
    assert cfg.model.xattn.media_mode == "previous"
    _, _, cfg = load_model(run / "checkpoints" / STEP_2)
    assert cfg.model.xattn.media_mode == "previous"
    export_model(run, tmp_path / "exported")
    exported = yaml.safe_load((tmp_path / "exported/config.yaml").read_text())
    assert exported["model"]["xattn"]["media_mode"] == "previous"
    assert exported["data"]["tokenizer"] == "tokenizer.model"


def test_open_run_resolves_the_generated_data_like_training(trained):
    """Finding 2: the manifest records the config as given (no tokenizer or shards for generated data); opening a
    run fills them in as training resolved them (config.yaml), so a tool reads the same tokenizer and shards."""
    from mmscale.job.runs import config_for_run
    from mmscale.job.runs import open_run

    cfg, ckpt = open_run(trained)
    assert ckpt == trained / "checkpoints" / STEP_4
    written = config_for_run(trained)
    assert (cfg.data.train_shards, cfg.data.val_shards, cfg.data.tokenizer) == \
        (written.data.train_shards, written.data.val_shards, written.data.tokenizer)
    assert cfg.model == written.model and cfg.output_dir == str(trained)
    cfg, ckpt = open_run(trained / "checkpoints" / STEP_2)
    assert ckpt == trained / "checkpoints" / STEP_2 and cfg.data.tokenizer == written.data.tokenizer


# ----------------------------------------------------------------------------------------------- finding 5


def test_a_flipped_byte_makes_the_tools_use_the_checkpoint_before(trained, tmp_path, caplog):
    """Finding 5: one flipped byte in step_4's optimizer states (where ZeRO keeps the fp32 weights): the loader of
    generate/evaluate takes step_2, warns naming step_4, and leaves step_4 where it is (before: it loaded step_4's
    changed weight silently)."""
    from mmscale.inference import load_model
    from mmscale.training.checkpoint import consolidated_state_dict

    run = copy_run(trained, tmp_path)
    flip_byte(optim_file(run / "checkpoints" / STEP_4))
    with caplog.at_level(logging.WARNING):
        model, _, _ = load_model(run)
    assert same_weights(model, consolidated_state_dict(run / "checkpoints" / STEP_2))
    assert any(STEP_4 in rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING)
    assert (run / "checkpoints" / STEP_4).is_dir()  # a read-only tool sets nothing aside
    assert not list((run / "checkpoints").glob("*.corrupt*"))


def test_a_damaged_checkpoint_given_by_path_is_a_clear_error(trained, tmp_path, capsys):
    """Finding 5: `generate.py --model RUN/checkpoints/step_4` with step_4 damaged exits 2 with an error naming it and
    no traceback (before: it captioned with the changed weight, exit 0); `model.init_from` refuses it too."""
    from mmscale.inference import main
    from mmscale.training.weights import resolve_source

    run = copy_run(trained, tmp_path)
    bad = run / "checkpoints" / STEP_4
    flip_byte(optim_file(bad))
    rc = main(["--model", str(bad), "--shards", str(run / "data/val"), "--limit", "1"])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert "error:" in err and STEP_4 in err and "Traceback" not in err
    with pytest.raises(ValueError, match=STEP_4):
        resolve_source(str(bad))


def test_no_manifest_skipped_none_verifying_a_clear_error(trained, tmp_path, capsys, caplog):
    """Finding 5: a checkpoint without a manifest is skipped with a warning (before: AttributeError in
    build_from_checkpoint); when no checkpoint verifies, evaluate and generate exit 2 with an error, no traceback."""
    from mmscale.evaluation.evaluate import main as evaluate_main
    from mmscale.job.runs import load_run
    from mmscale.inference import main as generate_main
    from mmscale.training.checkpoint import MANIFEST

    run = copy_run(trained, tmp_path)
    (run / "checkpoints" / STEP_4 / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING):
        _, model, _ = load_run(run)
    assert any(STEP_4 in rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING)
    (run / "checkpoints" / STEP_2 / MANIFEST).unlink()
    rc = evaluate_main(["--checkpoint", str(run), "--batches", "1", "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and STEP_2 in err and STEP_4 in err and "Traceback" not in err, err[-2000:]
    rc = generate_main(["--model", str(run), "--shards", str(run / "data/val"), "--limit", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "Traceback" not in err, err[-2000:]


# ----------------------------------------------------------------------------------------------- finding 6


def test_resume_with_overwrite_is_refused_before_anything_is_touched(trained, tmp_path):
    """Finding 6: `--resume --overwrite` exits 2 naming both flags, with the checkpoints, metrics.jsonl and
    config.yaml untouched (before: --overwrite deleted them, then --resume found no checkpoint)."""
    run = copy_run(trained, tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = train(run, "--resume", "--overwrite")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "--resume" in r.stderr and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_a_slurm_requeue_still_ignores_overwrite(trained, tmp_path):
    """Finding 6, what stays: a requeued SLURM job (SLURM_RESTART_COUNT > 0) ignores --overwrite and resumes, with
    --resume given too."""
    run = copy_run(trained, tmp_path)
    r = train(run, "--resume", "--overwrite", env={"SLURM_RESTART_COUNT": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--overwrite ignored" in r.stderr and "resumed from" in r.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [STEP_2, STEP_4]


def test_an_unreadable_checkpoint_is_an_error_not_a_fallback(trained, monkeypatch):
    """Finding 5: a file that cannot be read while verifying (EIO) stops the tool with an error naming the file and
    the errno; it does not quietly load an older checkpoint (nor call the unreadable one damaged)."""
    import errno

    from mmscale.training import checkpoint
    from mmscale.job.runs import open_run
    from mmscale.training.verified import RunOpenError

    def unreadable(path, *a, **k):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(checkpoint, "sha256_file", unreadable)
    with pytest.raises(RunOpenError, match=r"errno 5") as e:
        open_run(trained)
    assert STEP_4 in str(e.value)
