"""Bad config values give the config report (ConfigError: every problem, each with field, value and fix; exit 2
from the launcher), never a traceback: wrong types anywhere in the typed tree, malformed YAML, metric names that
no validation produces, impossible --dry-run world sizes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mmscale.config import ConfigError
from mmscale.job.preflight import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny.yaml"


def _problems(overrides: list[str], path: Path | None = TINY) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides, check_paths=False)
    return "\n".join(e.value.problems)


def _launcher(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launchers/train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


TASKS = ("continual.tasks=[{name: a, train_shards: a.tar, val_shards: a.tar, max_steps: x}, "
         "{name: b, train_shards: b.tar, val_shards: b.tar, max_steps: 5}]")

# (override, the field the report must name, the value it must show)
WRONG_TYPES = [
    ("objectives.captioning.weight=abc", "objectives.captioning.weight", "'abc'"),
    ("model.num_classes=x", "model.num_classes", "'x'"),
    ("deepspeed.collective_timeout_s=abc", "deepspeed.collective_timeout_s", "'abc'"),
    ("data.image_std=[a,1,1]", "data.image_std[0]", "'a'"),  # a list's elements
    (TASKS, "continual.tasks[0].max_steps", "'x'"),  # a dataclass inside a list
    ("model.lm.config=[1, 2]", "model.lm.config", "[1, 2]"),  # a dict field given a list
    ("train.micro_batch_size=2.5", "train.micro_batch_size", "2.5"),
    ("train.eval_at_start=maybe", "train.eval_at_start", "'maybe'"),
    ("train=3", "train", "3"),  # a whole section given a scalar
]


@pytest.mark.parametrize("override,field,value", WRONG_TYPES, ids=[w[1] for w in WRONG_TYPES])
def test_a_value_of_the_wrong_type_is_named_in_the_report(override, field, value):
    text = _problems([override])
    assert f"{field}: expected" in text and value in text, text


def test_every_problem_is_listed_at_once_and_none_is_a_consequence_of_another():
    text = _problems(["objectives.captioning.weight=abc", "model.num_classes=x", "data.image_std=[a,1,1]", "train.lr=0",
                      "train.keep_best_mode=up", TASKS])
    for field in ("objectives.captioning.weight", "model.num_classes", "data.image_std[0]", "train.lr: 0.0 must be > 0",
                  "train.keep_best_mode", "continual.tasks[0].max_steps: expected"):
        assert field in text, (field, text)
    # the bad task's max_steps is not reported again as "0 must be >= 1" or as a wrong sum for train.max_steps
    assert "must be >= 1" not in text and "add up to" not in text, text


def test_optional_and_union_fields_accept_either_arm():
    from mmscale.config import _coerce

    problems: list[str] = []
    assert _coerce(None, int | None, "x", problems) is None
    assert _coerce(3, int | None, "x", problems) == 3
    assert _coerce("a", int | str, "x", problems) == "a"
    assert _coerce({"k": [1, 2]}, dict[str, list[int]], "x", problems) == {"k": [1, 2]}
    assert not problems
    _coerce("a", int | None, "x", problems)
    _coerce({"k": [1, "b"]}, dict[str, list[int]], "y", problems)
    assert len(problems) == 2 and "x: expected" in problems[0] and "y.k[1]: expected an integer" in problems[1]


@pytest.mark.parametrize("override", ["train.lr=[", "train.lr={a: 1", "model.lm.config='oops"])
def test_malformed_yaml_in_an_override_is_named(override):
    text = _problems([override, "objectives.captioning.weight=abc"])  # and the other problems still listed
    assert f"override {override!r}" in text and "not valid YAML" in text and "objectives.captioning.weight" in text, text


@pytest.mark.parametrize("override", ["=3", "train..lr=3", "train.lr"])
def test_an_override_without_a_key_path_is_named(override):
    assert f"override {override!r}" in _problems([override])


def test_malformed_yaml_in_the_file_names_the_file_and_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: runs/x\ntrain:\n  lr: [1e-3\n  max_steps: 10\n")
    text = _problems([], bad)
    assert str(bad) in text and "not valid YAML" in text and "line" in text, text
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00train: 1\n")
    assert str(binary) in _problems([], binary)


def test_keep_best_names_a_metric_that_validation_produces():
    text = _problems(["train.keep_best=val_acc"])  # tiny has no classification head
    assert "train.keep_best: 'val_acc'" in text and "model.num_classes" in text and "keep_best=val_loss" in text, text
    text = _problems(["train.keep_best=val_los"])
    assert "train.keep_best: 'val_los'" in text and "val_loss" in text, text
    cfg = load_config(TINY, ["train.keep_best=val_acc", "train.keep_best_mode=max", "model.num_classes=4"],
                      check_paths=False)
    assert cfg.train.keep_best == "val_acc"
    load_config(TINY, ["train.keep_best=val_loss"], check_paths=False)


def test_early_stopping_metric_is_checked_with_the_config():
    text = _problems(["callbacks=[{name: early_stopping, args: {metric: val_los}}]"])
    assert "callbacks[0]" in text and "'val_los'" in text and "val_loss" in text, text
    text = _problems(["callbacks=[{name: early_stopping, args: {metric: val_acc, mode: max}}]"])
    assert "callbacks[0]" in text and "'val_acc'" in text and "model.num_classes" in text, text
    load_config(TINY, ["model.num_classes=4", "callbacks=[{name: early_stopping, args: {metric: val_acc, mode: max}}]"],
                check_paths=False)


CLI_CASES = [
    ("objectives.captioning.weight=abc", "objectives.captioning.weight", "abc"),
    ("data.image_std=[a,1,1]", "data.image_std[0]", "'a'"),
    ("train.lr=[", "train.lr=[", "not valid YAML"),
    ("train.keep_best=val_acc", "train.keep_best", "val_acc"),
]


@pytest.mark.parametrize("override,field,value", CLI_CASES, ids=[c[1] for c in CLI_CASES])
def test_launcher_reports_bad_values_with_exit_2(override, field, value):
    r = _launcher("--config", "configs/tiny.yaml", override, "--print-config")
    out = r.stdout + r.stderr
    assert r.returncode == 2 and field in out and value in out and "Traceback" not in out, (r.returncode, out)


def test_launcher_reports_a_malformed_config_file_with_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1e-3\n")
    r = _launcher("--config", str(bad), "--print-config")
    assert r.returncode == 2 and str(bad) in r.stderr and "Traceback" not in r.stderr, (r.returncode, r.stderr)


@pytest.mark.parametrize("world", ["-2", "0"])
def test_dry_run_refuses_a_world_size_below_1(world):
    r = _launcher("--config", "configs/tiny.yaml", "--dry-run", "--world-size", world)
    assert r.returncode == 2 and "--world-size" in r.stderr and world in r.stderr, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "parameters" not in r.stdout


def test_dry_run_function_refuses_a_world_size_below_1():
    from mmscale.job.dry_run import dry_run

    with pytest.raises(ValueError, match="world_size"):
        dry_run(load_config(TINY, check_paths=False), -2, vocab_size=64)


def test_early_stopping_without_its_metric_at_run_time_warns_and_goes_on(caplog):
    """With a head but no labelled validation sample there is no val_acc: nothing to judge by, not a crash."""
    from types import SimpleNamespace

    from mmscale.callbacks.early_stopping import EarlyStopping

    cb, trainer = EarlyStopping(metric="val_acc", patience=1, mode="max"), SimpleNamespace(step=5, should_stop=False)
    for _ in range(3):
        cb.on_eval_end(trainer, {"val_loss": 1.0, "val_tokens": 10})
    assert not trainer.should_stop and cb.bad_evals == 0
    assert sum("val_acc" in r.getMessage() for r in caplog.records) == 1  # warned once
