"""Config: shipped YAMLs validate; every kind of bad config is rejected with field, value and fix, all at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmscale.config import ConfigError, JobConfig
from mmscale.job.preflight import config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    # the real-scale configs name shards that exist on a cluster, not here: their paths are checked at training time
    cfg = load_config(path, check_paths=path.stem in ("demo", "tiny"))
    assert isinstance(cfg, JobConfig)
    assert cfg.output_dir
    assert cfg.model.preset  # every shipped config names its model preset
    # round trip: the printed config loads back to the same thing
    assert config_from_dict(yaml.safe_load(cfg.to_yaml()), check_paths=False) == cfg


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
        "model": {"xattn": {"media_mode": "sideways", "gate_init": 50.0}, "vision": {"type": "vgg"}},
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
    from mmscale.job.dry_run import estimate_memory

    cfg = load_config(ROOT / "configs/flamingo-9b.yaml", check_paths=False)
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


# ------------------------------------------------------------------------------------------- found in review (issue 7)


def test_override_of_one_key_merges_into_the_preset_dict():
    """`model.lm.config.num_hidden_layers=8` changes one key of flamingo-3b's LM, not the whole LM config."""
    from mmscale.model.presets import PRESETS

    preset = PRESETS["flamingo-3b"]()
    cfg = load_config(ROOT / "configs/flamingo-3b.yaml", ["model.lm.config.num_hidden_layers=8",
                                                          "model.vision.config.num_hidden_layers=2",
                                                          "deepspeed.extra.zero_optimization.round_robin_gradients=true",
                                                          "deepspeed.extra.wall_clock_breakdown=true"],
                      check_paths=False)
    assert cfg.model.lm.config == {**preset.lm.config, "num_hidden_layers": 8}
    assert cfg.model.lm.config["hidden_size"] == preset.lm.config["hidden_size"] != 4096
    assert cfg.model.vision.config == {**preset.vision.config, "num_hidden_layers": 2}
    # the same key by key merge for a YAML over the preset, and inside deepspeed.extra
    cfg2 = config_from_dict({"data": {"synthetic_train_samples": 8},
                             "model": {"preset": "demo", "lm": {"config": {"num_hidden_layers": 2}}},
                             "deepspeed": {"extra": {"zero_optimization": {"a": 1}}}})
    assert cfg2.model.lm.config["hidden_size"] == PRESETS["demo"]().lm.config["hidden_size"]
    merged = load_config(None, ["data.synthetic_train_samples=8", "deepspeed.extra.zero_optimization.a=1",
                                "deepspeed.extra.zero_optimization.b=2"])
    assert merged.deepspeed.extra == {"zero_optimization": {"a": 1, "b": 2}} and cfg2.deepspeed.extra["zero_optimization"] == {"a": 1}


def test_deepspeed_extra_refuses_what_the_trainer_derives():
    problems = _problems({"data": {"synthetic_train_samples": 8},
                          "deepspeed": {"extra": {"train_batch_size": 64, "gradient_clipping": 0.5,
                                                  "zero_optimization": {"stage": 2, "overlap_comm": True},
                                                  "bf16": {"enabled": True}}}})
    text = "\n".join(problems)
    assert len(problems) == 4, text
    for key, instead in (("train_batch_size", "train.global_batch_size"), ("gradient_clipping", "train.grad_clip"),
                         ("zero_optimization.stage", "deepspeed.zero_stage"), ("bf16", "train.precision")):
        assert f"deepspeed.extra.{key}" in text and instead in text, (key, text)


def test_callback_arguments_are_validated_with_the_config(tmp_path):
    problems = _problems({"data": {"synthetic_train_samples": 8},
                          "callbacks": [{"name": "early_stopping", "args": {"patience": 0}},
                                        {"name": "early_stopping", "args": {"patients": 3}},
                                        {"name": "early_stopping", "args": {"mode": "up"}}]})
    text = "\n".join(problems)
    assert len(problems) == 3, text
    assert "callbacks[0].args" in text and "patience must be an integer >= 1, got 0" in text
    assert "callbacks[1].args" in text and "patients" in text
    assert "callbacks[2].args" in text and "'up'" in text
    # through the launcher: refused before any process group
    bad = tmp_path / "cb.yaml"
    bad.write_text("data:\n  synthetic_train_samples: 8\ncallbacks:\n  - name: early_stopping\n    args: {patience: 0}\n")
    r = _launcher("--config", str(bad), f"output_dir={tmp_path / 'run'}")
    assert r.returncode == 2 and "callbacks[0].args" in r.stderr and "gloo" not in r.stderr.lower()


def test_shards_that_match_nothing_and_shards_without_tokenizer_are_refused_up_front(tmp_path, shapes_shards):
    problems = _problems({"data": {"train_shards": str(tmp_path / "none-{000000..000003}.tar"),
                                   "val_shards": str(shapes_shards)}})
    text = "\n".join(problems)
    assert "data.train_shards" in text and "none-000000.tar" in text
    assert "data.tokenizer" in text and "python -m mmscale.data.tokenizer" in text  # the fix, spelled out
    assert "data.val_shards" not in text  # that one resolves
    r = _launcher("--config", "configs/tiny.yaml", f"data.train_shards={shapes_shards}",
                  f"output_dir={tmp_path / 'run'}")
    assert r.returncode == 2 and "data.tokenizer" in r.stderr and "Traceback" not in r.stderr
    assert "gloo" not in r.stderr.lower() and not (tmp_path / "run").exists()


def test_dry_run_sizes_the_model_training_builds(tmp_path, sp_tokenizer):
    """The demo is sized with the vocabulary its tokenizer will have (64 pieces), not a 32,000-token default."""
    from mmscale.model import build_model
    from mmscale.job.dry_run import dry_run_report

    cfg = load_config(ROOT / "configs/demo.yaml", [f"output_dir={tmp_path}"])
    _, report = dry_run_report(cfg, world_size=2)
    built = build_model(cfg.model, vocab_size=cfg.data.tokenizer_vocab_size).param_counts()["total"]
    assert report["params"]["total"] == built < 3_000_000
    # with a tokenizer given, its vocabulary
    cfg = load_config(ROOT / "configs/demo.yaml", [f"output_dir={tmp_path}", f"data.tokenizer={sp_tokenizer.source}"])
    _, report = dry_run_report(cfg, world_size=2)
    assert report["params"]["total"] == build_model(cfg.model, vocab_size=sp_tokenizer.vocab_size).param_counts()["total"]


def test_fresh_run_into_a_used_output_dir_is_refused(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints/step_00000400").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 400, "loss": 1.0}\n')
    r = _launcher("--config", "configs/tiny.yaml", f"output_dir={out}")
    assert r.returncode == 2, r.stderr
    assert "already holds a run" in r.stderr and "step_00000400" in r.stderr and "--resume" in r.stderr
    assert "--overwrite" in r.stderr and "gloo" not in r.stderr.lower()
    from mmscale.training.checkpoint import clear_run, run_dir_problems

    assert run_dir_problems(out, resume=True, overwrite=False) == []
    (out / "data").mkdir()
    assert sorted(clear_run(out)) == ["checkpoints", "metrics.jsonl"]
    assert run_dir_problems(out, resume=False, overwrite=False) == [] and (out / "data").is_dir()


def test_dry_run_applies_the_fine_tuning_method(tmp_path):
    """--dry-run sizes what would train with the configured method: LoRA on a trained LM cuts the trainable
    parameters, and with them the gradient and optimizer memory."""
    from mmscale.job.dry_run import dry_run_report

    base = [f"output_dir={tmp_path}", "model.train_lm=true"]
    _, full = dry_run_report(load_config(ROOT / "configs/demo.yaml", base), world_size=2)
    _, lora = dry_run_report(load_config(ROOT / "configs/demo.yaml", [*base, "callbacks=[{name: lora, args: {r: 4}}]"]),
                             world_size=2)
    lm = full["params"]["by_component"]["lm"]
    assert lora["params"]["total"] > full["params"]["total"]  # the adapters are new parameters
    assert full["params"]["trainable"] - lora["params"]["trainable"] > 0.9 * lm  # the LM's own weights froze
    assert lora["memory_per_rank"]["device_optimizer_gib"] < full["memory_per_rank"]["device_optimizer_gib"]


def test_qlora_needs_bf16_and_a_base_lm_on_disk():
    (p,) = _problems({"data": {"synthetic_train_samples": 8}, "train": {"precision": "bf16"}, "model": {"lm": {"path": "."}},
                      "callbacks": [{"name": "qlora", "args": {"quant_type": "nf3"}}]})
    assert "callbacks[0].args (qlora)" in p and "quant_type must be 'nf4' or 'fp4'" in p
    problems = _problems({"data": {"synthetic_train_samples": 8}, "callbacks": [{"name": "qlora"}]})
    assert len(problems) == 2 and all(p.startswith("callbacks[0] (qlora): ") for p in problems), problems
    assert "train.precision=bf16" in problems[0] and "model.lm.path" in problems[1]


def test_dry_run_step_estimate_follows_zero3_accounting():
    """ZeRO-3 moves 3 x Psi per micro batch (all-gather forward, all-gather backward, reduce-scatter gradients;
    Rajbhandari et al. 2020), here counted from the built model's own components; the machine flags scale it."""
    r = _launcher("--config", "configs/flamingo-9b.yaml", "--dry-run", "--world-size", "64", "--gpu-tflops", "200",
                  "--link-gbytes-per-s", "100")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert "200 TFLOP/s achieved per GPU, 100 GB/s" in r.stdout and "activations_with_checkpointing_gib" in r.stdout

    from mmscale.job.preflight import load_config
    from mmscale.model import build_model
    from mmscale.job.dry_run import estimate_step

    cfg = load_config("configs/flamingo-9b.yaml", check_paths=False)
    model = build_model(cfg.model, vocab_size=None, meta=True)
    c = model.param_counts()
    total, trainable, vision = c["total"], c["trainable"], c["by_component"]["vision"]
    accum = cfg.train.global_batch_size // (cfg.train.micro_batch_size * 64)
    # the frozen vision tower runs without autograd: its weights are gathered for the forward only
    expected = accum * 63 / 64 * 2 * (total + (total - vision) + trainable)
    est = estimate_step(cfg, model, 64, gpu_tflops=200, link_gbytes_per_s=100)
    assert est["comm_gbytes_per_step"] * 1e9 == pytest.approx(expected, rel=1e-6)
    assert summary["comm_gbytes_per_step"] == pytest.approx(expected / 1e9, abs=0.01)
    assert est["comm_s"] == pytest.approx(expected / 100e9)
    assert est["step_s_no_overlap"] == pytest.approx(est["compute_s"] + est["comm_s"])
    # 6 N D at least for what trains (the cross-attention and resampler), at most 6 N D + recompute for everything
    text = 1 + cfg.data.max_text_len
    samples = cfg.train.micro_batch_size * accum
    assert est["tflop_per_step"] * 1e12 > 6 * c["by_component"]["xattn"] * text * samples
    assert est["tflop_per_step"] * 1e12 < 8 * total * max(text, est["patches_per_image"] + 64) * samples
    halved = estimate_step(cfg, model, 64, gpu_tflops=400, link_gbytes_per_s=200)
    assert halved["compute_s"] == pytest.approx(est["compute_s"] / 2) and halved["comm_s"] == pytest.approx(
        est["comm_s"] / 2)
