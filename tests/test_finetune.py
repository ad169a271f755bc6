"""Fine-tuning what was pretrained: `model.init_from` (another run's weights, any ZeRO stage and world size, weights
only), then parameter-efficient methods as callbacks (`lora`, `adapters`, `prompt_tuning`, `bitfit`, `qlora`) on 2 ranks under ZeRO-3."""

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


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "adapters", "prompt_tuning", "bitfit", "dora", "ia3"])
def test_peft_method_under_zero3_trains_only_what_it_says(source_run, method):
    """2 ranks, ZeRO-3, persistence threshold 0 (no small weight stays resident to hide a partitioning bug), from
    the source run's weights: the loss falls; the checkpoint holds exactly what trains; rebuilt in one process
    without DeepSpeed from the source, its frozen weights match the fingerprint taken at the save (bit-identical to
    the source's after training) and it evaluates to the engine's loss; what the method trains did move."""
    from mmscale.job.preflight import load_config
    from mmscale.data import load_tokenizer
    from mmscale.job.runs import build_from_checkpoint
    from mmscale.training.checkpoint import consolidated_state_dict, latest_checkpoint

    tmp, data = source_run
    out = tmp / f"ft-{method}"
    method_args = [f"model.init_from={tmp / 'src'}", f"callbacks=[{{name: {method}}}]"]
    r = launch(ROOT / "launchers/train.py", ["--config", "configs/tiny.yaml", f"output_dir={out}", *data,
                                             *method_args, "train.max_steps=6", "train.lr=1e-2",
                                             "train.warmup_steps=1", "deepspeed.stage3_param_persistence_threshold=0"],
               nprocs=2)
    assert f"{method}: " in r.stderr and "parameters train" in r.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x["loss"] for x in lines if "loss" in x]
    assert train[-1] < train[0], train

    ckpt = latest_checkpoint(out / "checkpoints")
    cfg = load_config(ROOT / "configs/tiny.yaml", [*data, *method_args])
    vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
    model = build_from_checkpoint(cfg, ckpt, vocab)  # raises unless the frozen weights match the saved fingerprint
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    saved = consolidated_state_dict(ckpt)
    assert set(saved) - buffers == trainable, sorted(set(saved) ^ trainable)[:5]  # only what trains
    own = {"lora": "lora_", "adapters": ".adapter.", "prompt_tuning": "prompt.", "bitfit": "norm", "dora": "lora_",
           "ia3": "ia3_l"}[method]
    assert any(own in n and n.startswith(("lm.", "prompt.")) for n in trainable)
    assert all(n.startswith(("resampler.", "prompt.")) or ".xattn." in n or own in n for n in trainable), trainable
    source = consolidated_state_dict(latest_checkpoint(tmp / "src/checkpoints"))
    initial = build_from_checkpoint(cfg, None, vocab).state_dict()  # as built: init_from + the method's new weights
    moved = [n for n in trainable if own in n and not torch.equal(saved[n], initial[n].float())]
    assert moved, "the method's own parameters did not train"
    if method == "bitfit":
        assert all(torch.equal(initial[n], source[n]) for n in trainable if n in source)
    assert _evaluate(model, cfg) == pytest.approx(_val_losses(out)[6], rel=1e-3)
    if method == "lora":
        _check_peft_export(out, tmp / f"export-{method}")
    # another base under the same trained weights is refused: the fingerprint tells
    with pytest.raises(RuntimeError, match="not the ones it was trained on"):
        build_from_checkpoint(load_config(ROOT / "configs/tiny.yaml", [*data, f"callbacks=[{{name: {method}}}]"]),
                              ckpt, vocab)


def _check_peft_export(run: Path, out: Path) -> None:
    """`python -m mmscale.export adapter`: peft itself loads the adapters onto the exported base LM, every tensor
    lands (equal to the file's), and they are the trained ones (lora_B moved from its zero start)."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from mmscale.export import main as export_main

    assert export_main(["adapter", "--run", str(run), "--out", str(out / "adapter"),
                        "--base-out", str(out / "base")]) == 0
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out / "adapter")
    loaded = get_peft_model_state_dict(peft_model)
    assert set(loaded) == set(saved) and len(saved) == 2 * 4 * 2, sorted(set(loaded) ^ set(saved))[:4]  # A, B x 4 x 2 layers
    assert all(torch.equal(loaded[k].float(), saved[k]) for k in saved)
    assert any("lora_B" in k and saved[k].abs().sum() > 0 for k in saved)


@torch.no_grad()
def _evaluate(model: torch.nn.Module, cfg) -> float:
    """Token-weighted validation loss of `model` in this process, every validation sample once."""
    from mmscale.data import EvalLoader, load_tokenizer

    model.eval()
    loss, tokens = 0.0, 0
    tok = load_tokenizer(cfg.data.tokenizer)
    for batch in EvalLoader(cfg.data, tok, 4, 0, 1, shards=cfg.data.val_shards, max_batches=16):
        out = model(**{k: batch[k] for k in ("pixel_values", "image_mask", "input_ids", "attention_mask",
                                              "media_index", "labels")})
        loss, tokens = loss + float(out.terms["captioning"]["loss_sum"]), tokens + int(out.terms["captioning"]["count"])
    return loss / tokens


@pytest.fixture(scope="module")
def base_lm(tmp_path_factory):
    """The tiny preset's LM saved with save_pretrained: the base a QLoRA run loads (and quantizes) by model.lm.path."""
    from mmscale.job.preflight import load_config
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

    from mmscale.job.preflight import load_config
    from mmscale.data import EvalLoader, load_tokenizer
    from mmscale.job.runs import build_from_checkpoint
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

    ckpt = latest_checkpoint(out / "checkpoints")
    saved = consolidated_state_dict(ckpt)
    assert any("lora_B" in k and saved[k].abs().sum() > 0 for k in saved), "the adapters did not train"
    cfg = load_config(ROOT / "configs/tiny.yaml", overrides)
    tok = load_tokenizer(cfg.data.tokenizer)
    # the base quantized again from model.lm.path, then the trained weights; the 4-bit base is checked against the
    # fingerprint taken at the save (the frozen weights did not move)
    model = build_from_checkpoint(cfg, ckpt, tok.vocab_size)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved) - {n for n, _ in model.named_buffers()} == trained  # the checkpoint holds only what trains
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
            terms = out_.terms["captioning"]
            loss, tokens = loss + float(terms["loss_sum"]), tokens + int(terms["count"])
    assert loss / tokens == pytest.approx(engine_val, rel=1e-3), (loss / tokens, engine_val)


@pytest.mark.slow
def test_lora_zero2_matches_zero3(source_run, tmp_path):
    """The same LoRA job from the same weights under ZeRO-2 and ZeRO-3 (fp32): the same losses. The adapters draw
    their initial weights from a generator of their own, so ZeRO-3's partitioned build cannot change them."""
    tmp, data = source_run
    losses = {}
    for stage in (2, 3):
        launch(RUN_TINY, [str(tmp_path / f"z{stage}.json"), f"output_dir={tmp_path / f'z{stage}'}", *data,
                          f"model.init_from={tmp / 'src'}", "callbacks=[{name: lora}]", f"deepspeed.zero_stage={stage}",
                          "deepspeed.stage3_param_persistence_threshold=0", "train.max_steps=4", "train.lr=1e-2",
                          "train.warmup_steps=1", "train.checkpoint_every=0"], nprocs=2)
        history = json.loads((tmp_path / f"z{stage}.json").read_text())["history"]
        losses[stage] = [h["loss"] for h in history if "loss" in h]
    assert len(losses[3]) == 4 and losses[3][-1] < losses[3][0], losses
    assert losses[2] == pytest.approx(losses[3], rel=1e-5), losses


@pytest.mark.slow
def test_qlora_fine_tunes_a_pretrained_run(source_run, tmp_path):
    """QLoRA with `model.init_from` a 2-rank ZeRO-3 run and no model.lm.path: the run's LM is written out as a
    Hugging Face model (its weights exactly the source's), quantized as it loads, the vision tower's linear layers
    quantized too (`quantize_vision`), fine-tuned on 2 ranks under ZeRO-3, and what was saved reloads in one
    process (the 4-bit LM and tower rebuilt from the sources, checked by the frozen weights' fingerprint)."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    from mmscale.data import load_tokenizer
    from mmscale.job.build import BASE_LM_DIR
    from mmscale.job.runs import build_from_checkpoint
    from mmscale.training.checkpoint import consolidated_state_dict, latest_checkpoint
    from mmscale.job.runs import config_for_run

    tmp, data = source_run
    out = tmp_path / "run"
    args = [*data, f"model.init_from={tmp / 'src'}", "train.precision=bf16",
            "callbacks=[{name: qlora, args: {quantize_vision: true}}]",
            "deepspeed.stage3_param_persistence_threshold=0", "train.max_steps=4", "train.lr=1e-2",
            "train.warmup_steps=1"]
    r = launch(ROOT / "launchers/train.py", ["--config", "configs/tiny.yaml", f"output_dir={out}", *args], nprocs=2)
    assert "qlora: " in r.stderr
    exported = load_file(out / BASE_LM_DIR / "model.safetensors")
    source = consolidated_state_dict(latest_checkpoint(tmp / "src/checkpoints"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(exported[q], source["lm.model.layers.0.decoder_layer.self_attn.q_proj.weight"])
    train = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    # it trains: each step sees other batches, so the last two steps' mean against the first
    assert len(train) == 4 and (train[2] + train[3]) / 2 < train[0], train
    cfg = config_for_run(out)  # the resolved config names the exported base (recorded relative to the run)
    assert cfg.model.lm.path == str(out / BASE_LM_DIR)
    model = build_from_checkpoint(cfg, latest_checkpoint(out / "checkpoints"),
                                  load_tokenizer(cfg.data.tokenizer).vocab_size)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.lm.modules())
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.vision.modules())  # quantize_vision


@pytest.mark.slow
def test_demo_finetune_config_learns_the_new_task(tmp_path):
    """configs/demo-finetune.yaml's path on the tiny model: pretrain on generated shapes captions, QLoRA-fine-tune
    that run on the counts task (its tokenizer, init_from, 2 ranks, ZeRO-3), then the report: the loss on the count
    words falls, and the table covers the new and the old task before and after."""
    from mmscale.evaluation.finetune_report import report

    pre, ft = tmp_path / "pre", tmp_path / "ft"
    small = ["data.synthetic_train_samples=128", "data.synthetic_val_samples=32", "train.eval_batches=2",
             "deepspeed.stage3_param_persistence_threshold=0"]
    launch(ROOT / "launchers/train.py", ["--config", "configs/tiny.yaml", f"output_dir={pre}", *small,
                                         "train.max_steps=4"], nprocs=2)
    launch(ROOT / "launchers/train.py", ["--config", "configs/tiny.yaml", f"output_dir={ft}", *small,
                                         "data.synthetic_task=counts", f"data.tokenizer={pre / 'data/tokenizer.model'}",
                                         f"model.init_from={pre}", "model.train_vision=false", "train.precision=bf16",
                                         "callbacks=[{name: qlora}]", "train.max_steps=8", "train.lr=1e-2",
                                         "train.warmup_steps=1"], nprocs=2)
    rows = {(r["task"], r["words"]): r for r in report(pre, ft, batches=4)["rows"]}
    assert set(rows) == {("counts (new)", "all caption tokens"), ("counts (new)", "count words"),
                         ("counts (new)", "colour and shape words"), ("shapes (old)", "all caption tokens"),
                         ("shapes (old)", "colour and shape words")}
    counts = rows[("counts (new)", "count words")]
    assert counts["after"] < counts["before"] - 0.2, counts  # 3.31 -> 2.91 nats in 8 steps (deterministic)
    assert all(torch.isfinite(torch.tensor([r["before"], r["after"]])).all() for r in rows.values())


def test_dry_run_sizes_qlora_weights_in_four_bits():
    """--dry-run with qlora: the LM's linear weights (its head kept) at 4 bits plus their scales, the rest in bf16;
    with quantize_vision the tower's too. On the meta device, so any preset can be sized."""
    from mmscale.job.preflight import load_config
    from mmscale.job.dry_run import dry_run, quantized_bytes_per_weight

    assert quantized_bytes_per_weight(False) == 0.5 + 4 / 64
    assert quantized_bytes_per_weight(True) == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256))

    def weights(callbacks: str, *extra: str) -> float:
        cfg = load_config(ROOT / "configs/tiny.yaml", ["train.precision=bf16", "model.init_from=anywhere",
                                                       f"callbacks={callbacks}", *extra], check_paths=False)
        report = dry_run(cfg, 2, vocab_size=64)
        assert not report["problems"], report["problems"]
        return report["memory_per_rank"]["device_weights_gib"] * 1024**3

    lora, qlora = weights("[{name: lora}]"), weights("[{name: qlora}]")
    vision_too = weights("[{name: qlora, args: {quantize_vision: true}}]")
    # the tiny LM's linear layers: 2 layers x (q 64x64, k 32x64, v 32x64, o 64x64, gate/up/down 3 x 128x64)
    linear = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 128 * 64)
    assert lora - qlora == pytest.approx(linear * (2 - quantized_bytes_per_weight(False)) / 2)  # ZeRO-3 over 2
    assert vision_too < qlora


@pytest.mark.slow
def test_lora_run_resumes_from_a_checkpoint_without_its_frozen_weights(source_run, tmp_path):
    """A 2-rank ZeRO-3 LoRA run whose checkpoints leave the frozen weights out: `--resume` rebuilds them from
    model.init_from (the fingerprint matches) and continues; resumed with another base it is refused, naming it."""
    tmp, data = source_run
    out = tmp_path / "run"
    args = ["--config", "configs/tiny.yaml", f"output_dir={out}", *data, "callbacks=[{name: lora}]",
            "train.checkpoint_every=2", "train.lr=1e-2", "train.warmup_steps=1",
            "deepspeed.stage3_param_persistence_threshold=0"]
    launch(ROOT / "launchers/train.py", [*args, f"model.init_from={tmp / 'src'}", "train.max_steps=2"], nprocs=2)
    r = launch(ROOT / "launchers/train.py", [*args, f"model.init_from={tmp / 'src'}", "train.max_steps=4",
                                             "--resume"], nprocs=2)
    assert "resumed from" in r.stderr
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == [1, 2, 3, 4], steps
    # another base: the source's weights with one frozen LM weight changed (without init_from the frozen weights
    # would be the very same: the source's LM and tower were frozen at their seeded initialisation too)
    from safetensors.torch import save_file

    from mmscale.training.checkpoint import consolidated_state_dict, latest_checkpoint

    other = consolidated_state_dict(latest_checkpoint(tmp / "src/checkpoints"))
    other["lm.model.layers.1.decoder_layer.mlp.down_proj.weight"][0, 0] += 1.0
    (tmp_path / "other").mkdir()
    save_file({k: v.contiguous() for k, v in other.items()}, tmp_path / "other/model.safetensors")
    r = launch(ROOT / "launchers/train.py", [*args, f"model.init_from={tmp_path / 'other'}", "train.max_steps=6",
                                             "--resume"], nprocs=2, check=False)
    assert r.returncode == 2 and "are not the ones it was trained on" in r.stderr, r.stderr[-2000:]
