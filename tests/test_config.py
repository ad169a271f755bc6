"""Config: shipped YAMLs validate; every kind of bad config is rejected with field, value and fix, all at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmscale.config import ConfigError, JobConfig, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)
    assert cfg.output_dir
    assert cfg.model.preset  # every shipped config names its model preset
    # round trip: the printed config loads back to the same thing
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_overrides_beat_yaml_and_preset():
    cfg = load_config(ROOT / "configs/demo.yaml", ["train.lr=3e-4", "model.xattn.media_mode=all", "deepspeed.zero_stage=2"])
    assert cfg.train.lr == 3e-4
    assert cfg.model.xattn.media_mode == "all"
    assert cfg.deepspeed.zero_stage == 2
    base = load_config(ROOT / "configs/demo.yaml")
    assert base.model.xattn.media_mode == "previous"  # the preset's value, untouched by the override above
    assert base.model.resampler == cfg.model.resampler  # preset values survive a partial override


def _problems(raw, world_size=None):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, world_size)
    return e.value.problems


def test_unknown_key_names_field_and_valid_keys():
    (p,) = _problems({"data": {"synthetic_train_samples": 8}, "train": {"lrr": 0.1}})
    assert "train.lrr" in p and "unknown key" in p and "lr" in p


def test_wrong_type_names_field_and_value():
    (p,) = _problems({"data": {"synthetic_train_samples": 8}, "train": {"max_steps": "ten"}})
    assert "train.max_steps" in p and "'ten'" in p and "integer" in p


def test_batch_not_divisible_by_micro_times_world():
    raw = {"data": {"synthetic_train_samples": 8}, "train": {"global_batch_size": 24, "micro_batch_size": 8}}
    config_from_dict(raw)  # fine on its own and with 1 or 3 ranks
    config_from_dict(raw, world_size=3)
    (p,) = _problems(raw, world_size=2)
    assert "train.global_batch_size" in p and "24" in p and "world_size (2)" in p and "multiple of 16" in p


def test_all_problems_reported_together():
    raw = {
        "data": {"image_size": 0},  # no training data either
        "model": {"xattn": {"media_mode": "sideways", "gate_init": 50.0}, "vision": {"type": "resnet"}},
        "train": {"global_batch_size": 10, "micro_batch_size": 4, "precision": "fp8", "bogus": 1},
        "deepspeed": {"zero_stage": 2, "offload_params": "cpu"},
        "callbacks": [{"name": "nope"}],
    }
    problems = _problems(raw)
    text = "\n".join(problems)
    for field in ("data.train_shards", "data.image_size", "model.xattn.media_mode", "model.xattn.gate_init",
                  "model.vision.type",
                  "train.global_batch_size", "train.precision", "train.bogus", "deepspeed.offload_params",
                  "callbacks[0].name"):
        assert field in text, f"{field} missing from:\n{text}"
    assert len(problems) >= 10


def test_unknown_preset():
    (p,) = _problems({"data": {"synthetic_train_samples": 8}, "model": {"preset": "gpt-17"}})
    assert "model.preset" in p and "gpt-17" in p and "demo" in p


def test_missing_local_paths_rejected():
    problems = _problems({"data": {"synthetic_train_samples": 8, "tokenizer": "/no/such.model"},
                          "model": {"lm": {"path": "/no/such/dir"}}})
    assert any("data.tokenizer" in p for p in problems) and any("model.lm.path" in p for p in problems)


def _launcher(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "launchers/train.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


def test_launcher_rejects_bad_config_before_any_process_group(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  global_batch_size: 10\n  micro_batch_size: 4\n  lrr: 1\n")
    r = _launcher("--config", str(bad))
    assert r.returncode == 2
    assert "train.lrr" in r.stderr and "train.global_batch_size" in r.stderr and "data.train_shards" in r.stderr
    assert "init_distributed" not in r.stderr and "gloo" not in r.stderr.lower()


def test_launcher_print_config():
    r = _launcher("--config", "configs/demo.yaml", "--print-config", "train.max_steps=7")
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed["train"]["max_steps"] == 7 and printed["model"]["preset"] == "demo"


@pytest.mark.parametrize("name,world,low,high", [("demo", 2, 1e6, 5e7), ("flamingo-3b", 8, 2e9, 4.5e9),
                                                  ("flamingo-9b", 64, 7.5e9, 1.1e10)])
def test_launcher_dry_run_sizes_presets(name, world, low, high):
    r = _launcher("--config", f"configs/{name}.yaml", "--dry-run", "--world-size", str(world))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert low < summary["total_params"] < high
    assert 0 < summary["trainable_params"] <= summary["total_params"]
    assert summary["device_total_gib"] > 0
    assert "memory per rank" in r.stdout


def test_dry_run_memory_estimate_follows_zero_stage():
    """Weights split over ranks only at stage 3, optimizer state from stage 1: the ZeRO paper's accounting."""
    from mmscale.training.dry_run import estimate_memory

    cfg = load_config(ROOT / "configs/flamingo-9b.yaml")
    counts = {"total": 8_000_000_000, "trainable": 1_000_000_000}
    gib = 1024**3
    by_stage = {}
    for stage in (0, 1, 2, 3):
        cfg.deepspeed.zero_stage = stage
        by_stage[stage] = estimate_memory(cfg, counts, world_size=64, hidden=4096, layers=32, seq_len=129,
                                          vocab_size=32000)
    assert by_stage[0]["device_weights_gib"] == pytest.approx(8e9 * 2 / gib)  # bf16
    assert by_stage[3]["device_weights_gib"] == pytest.approx(8e9 * 2 / gib / 64)
    assert by_stage[0]["device_optimizer_gib"] == pytest.approx(1e9 * 12 / gib)  # Adam moments + fp32 master
    assert by_stage[1]["device_optimizer_gib"] == pytest.approx(1e9 * 12 / gib / 64)
    assert by_stage[1]["device_gradients_gib"] == pytest.approx(1e9 * 2 / gib)
    assert by_stage[2]["device_gradients_gib"] == pytest.approx(1e9 * 2 / gib / 64)
    totals = [by_stage[s]["device_total_gib"] for s in (0, 1, 2)]
    assert totals == sorted(totals, reverse=True)
    cfg.deepspeed.offload_optimizer = "cpu"
    offloaded = estimate_memory(cfg, counts, 64, 4096, 32, 129, 32000)
    assert "device_optimizer_gib" not in offloaded and offloaded["host_optimizer_gib"] > 0
