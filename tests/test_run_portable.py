"""Run directories are self-contained: paths inside a run are recorded relative to it, the others absolute, and
read back against where the run is now (mmscale.training.run_paths). A run moved elsewhere is evaluated, captioned,
exported and resumed from any working directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmscale.training import run_paths
from mmscale.job.runs import config_for_run
from mmscale.training.run_paths import comparable_config, portable_config, resolve_config
from procgroup import run_group
from test_training import ROOT, RUN_TINY, _port, launch, losses

# ----------------------------------------------------------------------------------------------- round trip (fast)


def _config(out: str) -> dict:
    """A config dict as training holds it: every path as given, relative to the working directory."""
    return {
        "output_dir": out,
        "data": {"train_shards": f"{out}/data/train-{{000000..000003}}.tar", "val_shards": "shared/val",
                 "tokenizer": f"{out}/data/tokenizer.model",
                 "sources": [{"name": "web", "shards": "https://host/web-{0000..0099}.tar", "weight": 0.5},
                             {"name": "s3", "shards": "pipe:aws s3 cp s3://b/x-{0..9}.tar -", "weight": 0.2},
                             {"name": "mine", "shards": f"{out}/mine.txt", "weight": 0.3}]},
        "model": {"init_from": f"{out}2", "lm": {"path": f"{out}/base_lm", "config": {}},
                  "vision": {"path": "/models/clip", "config": {}}},
        "continual": {"tasks": [{"name": "a", "train_shards": f"{out}/a/train", "val_shards": "../elsewhere/val"}]},
        "callbacks": [{"name": "replay", "args": {"capacity": 8, "balance": "class", "directory": f"{out}/buf"}},
                      {"name": "lora", "args": {"r": 4}}],
    }


def test_inside_relative_outside_absolute_urls_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = portable_config(_config("runs/x"), "runs/x")
    assert p["output_dir"] == "."
    d = p["data"]
    assert d["train_shards"] == "data/train-{000000..000003}.tar"  # a brace pattern moves with its folder
    assert d["tokenizer"] == "data/tokenizer.model"
    assert d["val_shards"] == str(tmp_path / "shared/val")
    assert [s["shards"] for s in d["sources"]] == ["https://host/web-{0000..0099}.tar",
                                                    "pipe:aws s3 cp s3://b/x-{0..9}.tar -", "mine.txt"]
    m = p["model"]
    assert m["init_from"] == str(tmp_path / "runs/x2")  # a sibling whose name starts the same is outside
    assert m["lm"]["path"] == "base_lm" and m["vision"]["path"] == "/models/clip"
    assert p["continual"]["tasks"][0] == {"name": "a", "train_shards": "a/train",
                                          "val_shards": str(tmp_path.parent / "elsewhere/val")}
    assert p["callbacks"][0]["args"] == {"capacity": 8, "balance": "class", "directory": "buf"}
    assert p["callbacks"][1]["args"] == {"r": 4}
    assert _config("runs/x")["data"]["tokenizer"] == "runs/x/data/tokenizer.model"  # the input is not changed


def test_a_moved_run_resolves_to_where_it_is_now(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = portable_config(_config("runs/x"), tmp_path / "runs/x")  # the same folder, given absolute
    new = tmp_path / "moved" / "y"
    monkeypatch.chdir("/")  # and read from anywhere
    r = resolve_config(p, new)
    assert r["output_dir"] == str(new)
    assert r["data"]["train_shards"] == f"{new}/data/train-{{000000..000003}}.tar"
    assert r["data"]["tokenizer"] == f"{new}/data/tokenizer.model"
    assert r["data"]["val_shards"] == str(tmp_path / "shared/val")
    assert r["data"]["sources"][0]["shards"].startswith("https://") and r["data"]["sources"][1]["shards"][:5] == "pipe:"
    assert r["data"]["sources"][2]["shards"] == f"{new}/mine.txt"
    assert r["model"]["lm"]["path"] == f"{new}/base_lm" and r["model"]["init_from"] == str(tmp_path / "runs/x2")
    assert r["callbacks"][0]["args"]["directory"] == f"{new}/buf"
    # written again from the new place, it is the same portable config
    assert portable_config(r, new) == p
    assert resolve_config({}, new) == {}


def test_a_config_written_before_is_rebased_under_its_output_dir(tmp_path, monkeypatch):
    """config.yaml of an older run (paths as given at launch): what lay under output_dir moved with the run; other
    relative paths stay relative to the working directory, as they always were."""
    monkeypatch.chdir(tmp_path)
    old = _config("runs/x")
    r = resolve_config(old, tmp_path / "B/x")
    assert r["output_dir"] == str(tmp_path / "B/x")
    assert r["data"]["tokenizer"] == str(tmp_path / "B/x/data/tokenizer.model")
    assert r["model"]["lm"]["path"] == str(tmp_path / "B/x/base_lm")
    assert r["data"]["val_shards"] == "shared/val" and r["model"]["init_from"] == "runs/x2"
    assert r["data"]["sources"][0]["shards"] == "https://host/web-{0000..0099}.tar"
    absolute = resolve_config({**old, "output_dir": str(tmp_path / "runs/x"),
                               "data": {"tokenizer": str(tmp_path / "runs/x/data/tok.model")}}, tmp_path / "B/x")
    assert absolute["data"]["tokenizer"] == str(tmp_path / "B/x/data/tok.model")


def test_resume_check_sees_no_change_in_a_moved_run(tmp_path, monkeypatch):
    from mmscale.training.trainer import config_changes

    monkeypatch.chdir(tmp_path)
    saved = portable_config(_config("runs/x"), "runs/x")  # the manifest's, written in runs/x
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # resumed from another folder with output_dir=/abs/moved
    now = _config(str(tmp_path / "moved"))
    now["data"]["val_shards"] = str(tmp_path / "shared/val")
    now["model"]["init_from"] = str(tmp_path / "runs/x2")
    now["continual"]["tasks"][0]["val_shards"] = str(tmp_path.parent / "elsewhere/val")
    run = tmp_path / "moved"
    assert config_changes(comparable_config(saved, run, recorded=True),
                          comparable_config(now, run, recorded=False)) == []
    now["model"]["lm"]["path"] = str(tmp_path / "other_lm")  # a real change is still one, with usable values
    refused = config_changes(comparable_config(saved, run, recorded=True), comparable_config(now, run, recorded=False))
    assert refused == [f"model.lm.path: {str(run / 'base_lm')!r} at the checkpoint, {str(tmp_path / 'other_lm')!r} "
                       f"now; resume with model.lm.path={str(run / 'base_lm')!r}, or start a new run in another "
                       f"output_dir"]


def test_config_for_run_reads_a_job_config(tmp_path, monkeypatch):
    from mmscale.job.preflight import load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs/tiny.yaml", ["output_dir=runs/t", "data.train_shards=runs/t/data/train",
                                                   "data.tokenizer=tok/sp.model"], check_paths=False)
    Path("runs/t").mkdir(parents=True)
    Path("runs/t/config.yaml").write_text(run_paths.portable_yaml(cfg, cfg.output_dir))
    written = yaml.safe_load(Path("runs/t/config.yaml").read_text())
    assert (written["output_dir"], written["data"]["train_shards"]) == (".", "data/train")
    shutil.move("runs/t", "moved")
    monkeypatch.chdir("/")
    back = config_for_run(tmp_path / "moved")
    assert back.output_dir == str(tmp_path / "moved")
    assert back.data.train_shards == str(tmp_path / "moved/data/train")
    assert back.data.tokenizer == str(tmp_path / "tok/sp.model")
    assert back.model == cfg.model and back.train == cfg.train


# ----------------------------------------------------------------------------------------------- a moved run (slow)

STEPS = ["train.max_steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=5"]


def run_in(cwd: Path, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """`python args` from the folder `cwd`, killed with its process group however it ends."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(_port())}
    r = run_group([sys.executable, *args], cwd=cwd, env=env, timeout=timeout)
    assert r.returncode == 0, f"{args} in {cwd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def moved_run(tmp_path_factory):
    """configs/tiny.yaml (its own generated data and tokenizer) trained 4 of 6 steps in A/run, one process, then
    moved to B/run (copied, and A removed: nothing may point into A). Returns (B/run, a third folder C, A/run)."""
    tmp = tmp_path_factory.mktemp("portable")
    a, b, c = tmp / "A" / "run", tmp / "B" / "run", tmp / "C"
    launch(RUN_TINY, [str(tmp / "a.json"), f"output_dir={a}", "--stop-at", "4", *STEPS], nprocs=1)
    assert sorted(losses(tmp / "a.json")) == [1, 2, 3, 4]
    shutil.copytree(a, b)
    shutil.rmtree(tmp / "A")
    c.mkdir()
    return b, c, a


@pytest.mark.slow
def test_a_copied_run_is_evaluated_from_another_folder(moved_run):
    """What failed before: the run's config.yaml named its tokenizer and shards relative to where training was
    launched."""
    run, cwd, _ = moved_run
    r = run_in(cwd, [str(ROOT / "launchers/evaluate.py"), "--checkpoint", str(run), "--batches", "2"])
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["models"]["model"]["checkpoint"] == str(run) and result["shards"] == str(run / "data/val")
    assert (run / "eval/report.json").is_file()


@pytest.mark.slow
def test_a_copied_run_records_no_path_into_where_it_was(moved_run):
    run, _, old = moved_run
    from mmscale.training.checkpoint import latest_checkpoint, read_manifest

    text = (run / "config.yaml").read_text()
    manifest = read_manifest(latest_checkpoint(run / "checkpoints"))
    for where in (text, json.dumps(manifest["config"])):
        assert str(old) not in where and str(old.parent) not in where
    cfg = yaml.safe_load(text)
    assert cfg["output_dir"] == "." and cfg["data"]["tokenizer"] == "data/tokenizer.model"
    assert (cfg["data"]["train_shards"], cfg["data"]["val_shards"]) == ("data/train", "data/val")
    assert manifest["config"]["output_dir"] == "."
    assert run_paths.manifest_config(latest_checkpoint(run / "checkpoints"))["output_dir"] == str(run)


@pytest.mark.slow
def test_a_copied_run_is_used_from_another_folder(moved_run):
    """Captions (generate, demo_objects), the image-use probe and an export, every path absolute, from folder C."""
    run, cwd, _ = moved_run
    r = run_in(cwd, [str(ROOT / "launchers/generate.py"), "--model", str(run), "--shards", str(run / "data/val"),
                     "--limit", "2"])
    assert len([line for line in r.stdout.splitlines() if line.startswith("{")]) == 2
    r = run_in(cwd, ["-m", "mmscale.evaluation.demo_objects", "--run", str(run), "--samples", "4", "--batch-size",
                     "4"])
    assert json.loads(r.stdout.strip().splitlines()[-1])["samples"] == 4
    r = run_in(cwd, ["-m", "mmscale.evaluation.image_use", "--run", str(run), "--batches", "2"])
    assert "colours" in json.loads(r.stdout.strip().splitlines()[-1])
    out = cwd / "exported"
    run_in(cwd, [str(ROOT / "launchers/export.py"), "--run", str(run), "--out", str(out)])
    exported = yaml.safe_load((out / "config.yaml").read_text())
    assert exported["output_dir"] == "." and exported["data"]["tokenizer"] == "tokenizer.model"
    assert exported["data"]["val_shards"] == str(run / "data/val")  # outside the export: absolute
    moved = cwd / "elsewhere" / "exported"  # an export moves too
    moved.parent.mkdir()
    shutil.move(out, moved)
    r = run_in(ROOT, [str(ROOT / "launchers/generate.py"), "--model", str(moved), "--shards", str(run / "data/val"),
                      "--limit", "1"])
    assert len([line for line in r.stdout.splitlines() if line.startswith("{")]) == 1


@pytest.mark.slow
def test_a_copied_run_resumes_from_another_folder(moved_run, tmp_path):
    """--resume with output_dir=B/run from folder C (the launcher, one process) continues at step 5 and its losses
    are an uninterrupted run's."""
    run, cwd, _ = moved_run
    launch(RUN_TINY, [str(tmp_path / "full.json"), f"output_dir={tmp_path / 'full'}", *STEPS], nprocs=1)
    full = losses(tmp_path / "full.json")
    run_in(cwd, [str(ROOT / "launchers/train.py"), "--config", str(ROOT / "configs/tiny.yaml"), f"output_dir={run}",
                 *STEPS, "--resume"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    resumed = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6), (step, resumed, full)
    assert (run / "checkpoints/latest").read_text() == "step_00000006"
