"""Fine-tuning what was pretrained: `model.init_from` (another run's weights, any ZeRO stage and world size, weights
only), then parameter-efficient methods as callbacks (`lora`, `adapters`, `bitfit`, `qlora`) on 2 ranks under ZeRO-3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmscale.training import weights
from test_training import ROOT, RUN_TINY, launch, tiny_data  # noqa: F401  (tiny_data is a fixture)


@pytest.fixture(scope="module")
def source_run(tiny_data, tmp_path_factory):  # noqa: F811
    """A 2-rank ZeRO-3 run of 3 steps that validates at its end on 64 held-out samples."""
    from mmscale.data import make_shapes_dataset

    tmp = tmp_path_factory.mktemp("init_from")
    make_shapes_dataset(tmp / "val", 64, samples_per_shard=8, image_size=32, seed=7, prefix="val", first_index=10_000)
    data = [*tiny_data, f"data.val_shards={tmp / 'val'}", "train.eval_batches=16", "data.num_workers=0"]
    launch(ROOT / "launchers/train.py", ["--config", "configs/tiny.yaml", f"output_dir={tmp / 'src'}", *data,
                                         "train.max_steps=3", "deepspeed.stage3_param_persistence_threshold=0"],
           nprocs=2)
    return tmp, data


def _val_losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["val_loss"] for r in map(json.loads, lines) if "val_loss" in r}


@pytest.mark.slow
def test_init_from_a_two_rank_zero3_run_reproduces_its_evaluation(source_run):
    """One process (ZeRO-0) started from the 2-rank ZeRO-3 run evaluates, before its first step, to the loss the
    source had at its end; only weights came over (the step count starts at 0, the optimizer is fresh)."""
    tmp, data = source_run
    src = _val_losses(tmp / "src")[3]
    r = launch(ROOT / "launchers/train.py", ["--config", "configs/tiny.yaml", f"output_dir={tmp / 'dst'}", *data,
                                             f"model.init_from={tmp / 'src'}", "train.eval_at_start=true",
                                             "train.max_steps=1", "deepspeed.zero_stage=0"], nprocs=1)
    assert "model.init_from" in r.stderr and "tensors loaded" in r.stderr
    dst = _val_losses(tmp / "dst")
    assert dst[0] == pytest.approx(src, rel=1e-5), (dst, src)
    assert sorted(dst) == [0, 1]


@pytest.mark.slow
def test_init_from_refuses_a_shape_mismatch_with_the_names(source_run):
    tmp, data = source_run
    r = launch(ROOT / "launchers/train.py", ["--config", "configs/tiny.yaml", f"output_dir={tmp / 'bad'}", *data,
                                             f"model.init_from={tmp / 'src'}", "model.lm.config.intermediate_size=96",
                                             "train.max_steps=1"], nprocs=1, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "shapes differ" in r.stderr and "mlp.up_proj.weight: model (96, 64), source (128, 64)" in r.stderr


def test_sources_are_checked_and_compared(tmp_path):
    from safetensors.torch import save_file

    assert "does not exist" in weights.source_problems(str(tmp_path / "nope"))[0]
    assert "holds no checkpoint" in weights.source_problems(str(tmp_path))[0]
    save_file({"a.weight": torch.ones(2, 3), "b.bias": torch.zeros(4)}, tmp_path / "model.safetensors")
    assert weights.source_problems(str(tmp_path)) == []
    state, where = weights.read_weights(str(tmp_path))
    assert where == tmp_path and torch.equal(state["a.weight"], torch.ones(2, 3))
    report = weights.compare({"a.weight": (2, 3), "b.bias": (5,), "c.weight": (1,)}, state)
    assert report["missing"] == ["c.weight"] and report["unexpected"] == [] and report["loaded"] == 1
    assert report["mismatched"] == ["b.bias: model (5,), source (4,)"]
    assert "1 missing in the source" in weights.describe(report, tmp_path)


def _frozen_weights_equal(source: dict, tuned: dict, may_change) -> list[str]:
    """Names whose weights differ between source and fine-tuned run, other than those `may_change` allows.
    peft renames an adapted layer's own weight `x.weight` -> `x.base_layer.weight`."""
    tuned = {k.replace(".base_layer.", "."): v for k, v in tuned.items() if "lora_" not in k and ".adapter." not in k}
    assert set(tuned) == set(source), sorted(set(tuned) ^ set(source))[:5]
    return [k for k in source if not may_change(k) and not torch.equal(source[k], tuned[k])]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "adapters", "bitfit"])
def test_peft_method_under_zero3_trains_only_what_it_says(source_run, method):
    """2 ranks, ZeRO-3, persistence threshold 0 (no small weight stays resident to hide a partitioning bug), from
    the source run's weights: the loss falls, every frozen weight is bit-identical to the source's afterwards, and
    what the method trains did move."""
    from mmscale.training.checkpoint import consolidated_state_dict, latest_checkpoint

    tmp, data = source_run
    out = tmp / f"ft-{method}"
    r = launch(ROOT / "launchers/train.py", ["--config", "configs/tiny.yaml", f"output_dir={out}", *data,
                                             f"model.init_from={tmp / 'src'}", f"callbacks=[{{name: {method}}}]",
                                             "train.max_steps=6", "train.lr=1e-2", "train.warmup_steps=1",
                                             "deepspeed.stage3_param_persistence_threshold=0"], nprocs=2)
    assert f"{method}: " in r.stderr and "parameters train" in r.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x["loss"] for x in lines if "loss" in x]
    assert train[-1] < train[0], train
    source = consolidated_state_dict(latest_checkpoint(tmp / "src/checkpoints"))
    tuned = consolidated_state_dict(latest_checkpoint(out / "checkpoints"))
    new_blocks = ("resampler.", ".xattn.")  # trained in full precision whatever the method

    def trains(name: str) -> bool:
        if name.startswith(new_blocks[0]) or new_blocks[1] in name:
            return True
        return method == "bitfit" and name.startswith("lm.") and "norm" in name

    assert _frozen_weights_equal(source, tuned, trains) == []
    zero_init = {"lora": "lora_B", "adapters": ".adapter.up."}  # new parameters that start at zero
    moved = [k for k in tuned if (zero_init[method] in k if method in zero_init else trains(k) and k.startswith("lm."))
             and not torch.equal(tuned[k], source.get(k, torch.zeros_like(tuned[k])))]
    assert moved, "the method's own parameters did not train"
    # what was saved reloads in one process without DeepSpeed and evaluates to the engine's loss
    engine_val = _val_losses(out)[6]
    assert _evaluate_without_deepspeed(tuned, data, [f"callbacks=[{{name: {method}}}]"]) == \
        pytest.approx(engine_val, rel=1e-3)


@torch.no_grad()
def _evaluate_without_deepspeed(state: dict, data: list[str], overrides: list[str]) -> float:
    """Token-weighted validation loss of `state` in this process: the model built from the config, the callbacks'
    changes applied, the weights loaded strictly, every validation sample once."""
    from mmscale.callbacks import build_callbacks
    from mmscale.config import load_config
    from mmscale.data import EvalLoader, load_tokenizer
    from mmscale.model import build_model

    cfg = load_config(ROOT / "configs/tiny.yaml", [*data, *overrides])
    tok = load_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg.model, vocab_size=tok.vocab_size)
    for cb in build_callbacks(cfg.callbacks):
        cb.on_model_built(model)
    model.load_state_dict(state, strict=True)
    model.eval()
    loss, tokens = 0.0, 0
    for batch in EvalLoader(cfg.data, tok, 4, 0, 1, shards=cfg.data.val_shards, max_batches=16):
        out = model(**{k: batch[k] for k in ("pixel_values", "image_mask", "input_ids", "attention_mask",
                                              "media_index", "labels")})
        loss, tokens = loss + float(out.loss_sum), tokens + int(out.num_tokens)
    return loss / tokens


@pytest.fixture(scope="module")
def base_lm(tmp_path_factory):
    """The tiny preset's LM saved with save_pretrained: the base a QLoRA run loads (and quantizes) by model.lm.path."""
    from mmscale.config import load_config
    from mmscale.model.multimodal import build_lm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base_lm")
    build_lm(load_config(ROOT / "configs/tiny.yaml", check_paths=False).model, vocab_size=64).save_pretrained(path)
    return path


@pytest.mark.slow
def test_qlora_under_zero3(source_run, base_lm, tmp_path):
    """2 ranks, ZeRO-3, persistence threshold 0, the LM in 4-bit NF4 (bf16 storage, partitioned when DeepSpeed wraps
    the model): the same evaluation three times in a row gives the same loss (the repacking trap), the loss falls,
    ZeRO-2 gives the same losses, the adapters train, and the base from model.lm.path plus what the run saved, loaded in one process without
    DeepSpeed, evaluates to the engine's loss."""
    import bitsandbytes as bnb

    from mmscale.callbacks import build_callbacks
    from mmscale.config import load_config
    from mmscale.data import EvalLoader, load_tokenizer
    from mmscale.model import BuildOptions, build_model
    from mmscale.training.checkpoint import consolidated_state_dict, latest_checkpoint

    _, data = source_run
    overrides = [*data, f"model.lm.path={base_lm}", "train.precision=bf16", "callbacks=[{name: qlora}]",
                 "deepspeed.stage3_param_persistence_threshold=0"]
    out = tmp_path / "run"
    launch(RUN_TINY, [str(tmp_path / "q.json"), f"output_dir={out}", "--eval-thrice", *overrides,
                      "train.max_steps=6", "train.lr=1e-2", "train.warmup_steps=1", "train.checkpoint_every=0"],
           nprocs=2)
    result = json.loads((tmp_path / "q.json").read_text())
    assert len(set(result["evals"])) == 1, result["evals"]
    train = [h["loss"] for h in result["history"] if "loss" in h]
    assert train[-1] < train[0], train
    # the same job under ZeRO-2 (a quantized model is built whole on every rank at both stages: the same start)
    launch(RUN_TINY, [str(tmp_path / "q2.json"), f"output_dir={tmp_path / 'run2'}", *overrides, "deepspeed.zero_stage=2",
                      "train.max_steps=6", "train.lr=1e-2", "train.warmup_steps=1", "train.checkpoint_every=0"],
           nprocs=2)
    zero2 = [h["loss"] for h in json.loads((tmp_path / "q2.json").read_text())["history"] if "loss" in h]
    assert zero2 == pytest.approx(train, rel=1e-2), (zero2, train)  # bf16 compute, other reduction order
    engine_val = [h["val_loss"] for h in result["history"] if "val_loss" in h][-1]

    saved = consolidated_state_dict(latest_checkpoint(out / "checkpoints"))
    assert any("lora_B" in k and saved[k].abs().sum() > 0 for k in saved), "the adapters did not train"
    cfg = load_config(ROOT / "configs/tiny.yaml", overrides)
    tok = load_tokenizer(cfg.data.tokenizer)
    options = BuildOptions()
    callbacks = build_callbacks(cfg.callbacks)
    for cb in callbacks:
        cb.on_build(options)
    model = build_model(cfg.model, vocab_size=tok.vocab_size, options=options)
    for cb in callbacks:
        cb.on_model_built(model)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = model.load_state_dict({k: v for k, v in saved.items() if k in trained}, strict=False)
    assert not unexpected and trained.isdisjoint(missing)
    for p in model.parameters():  # bf16 like the engine's (the checkpoint holds fp32 masters), 4-bit storage as is
        if p.is_floating_point() and not isinstance(p, bnb.nn.Params4bit):
            p.data = p.data.to(torch.bfloat16)
    model.eval()
    loss, tokens = 0.0, 0
    with torch.no_grad():
        for batch in EvalLoader(cfg.data, tok, 4, 0, 1, shards=cfg.data.val_shards, max_batches=16):
            inputs = {k: batch[k] for k in ("pixel_values", "image_mask", "input_ids", "attention_mask",
                                            "media_index", "labels")}
            inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
            out_ = model(**inputs)
            loss, tokens = loss + float(out_.loss_sum), tokens + int(out_.num_tokens)
    assert loss / tokens == pytest.approx(engine_val, rel=1e-3), (loss / tokens, engine_val)
