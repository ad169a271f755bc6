"""model.train_xattn / model.train_resampler = full | lora | frozen: LoRA on the gated cross-attention and the
resampler as well as on the LM (issue 20, part 2). The gates stay trainable scalars; merged export folds these
adapters in too, and `--adapters separate` sets aside the LM's alone (the others have no place in a peft adapter of
the plain LM) with the rest merged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmscale.config import ConfigError
from mmscale.job.build import model_recipe
from mmscale.job.preflight import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
LORA_MODES = ["callbacks=[{name: lora, args: {r: 4}}]", "model.train_xattn=lora", "model.train_resampler=lora"]


def _model(*overrides: str):
    cfg = load_config(TINY, ["model.xattn.backend=sdpa", "model.xattn.gate_init=1.0", *overrides], check_paths=False)
    recipe = model_recipe(cfg)
    torch.manual_seed(0)
    model = recipe.build(64)
    recipe.finish(model)
    return model


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (2, 8), generator=g)
    return {"pixel_values": torch.randn(2, 1, 3, 32, 32, generator=g), "image_mask": torch.ones(2, 1, dtype=torch.bool),
            "input_ids": ids, "attention_mask": torch.ones_like(ids), "media_index": torch.zeros_like(ids)}


def test_modes_are_read_and_checked():
    cfg = load_config(TINY, ["model.train_xattn=false", "model.train_resampler=true"], check_paths=False)
    assert (cfg.model.train_xattn, cfg.model.train_resampler) == ("frozen", "full")  # the booleans of before
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["model.train_xattn=lora", "model.train_resampler=half"], check_paths=False)
    text = str(e.value)
    assert "model.train_resampler: 'half' is not one of 'full', 'lora', 'frozen'" in text
    assert "model.train_xattn: 'lora' puts the adapters of a lora or qlora callback there" in text
    assert "add callbacks=[{name: lora}]" in text
    load_config(TINY, LORA_MODES, check_paths=False)  # with one: valid


def test_lora_on_cross_attention_and_resampler_trains_adapters_and_gates_only():
    plain, model = _model(), _model(*LORA_MODES)
    groups = model.component_params()
    xattn = {n for n, p in groups["xattn"] if p.requires_grad}
    assert xattn and all("lora_" in n or n.endswith(("attn_gate", "ff_gate")) for n in xattn), xattn
    assert sum(n.endswith("attn_gate") for n in xattn) == len(model.xattn_blocks())  # the gates still train
    for block in model.xattn_blocks():  # every linear layer of a block is adapted: q, kv, out, both feed-forward
        assert {n.split(".lora_A")[0] for n, _ in block.named_parameters() if "lora_A" in n} == {
            "to_q", "to_kv", "to_out", "ff.1", "ff.3"}
    resampler = {n for n, p in groups["resampler"] if p.requires_grad}
    assert resampler and all("lora_" in n for n in resampler)  # latents and norms frozen
    assert not any(p.requires_grad for n, p in groups["lm"] if "lora_" not in n)
    counts, full = model.param_counts(), plain.param_counts()
    assert counts["trainable"] < 0.2 * full["trainable"], (counts, full)
    # lora_B starts at zero: the adapted model starts as the one it adapts
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, plain.eval()(**batch).logits, rtol=0, atol=0)


def test_frozen_cross_attention_trains_nothing_there():
    model = _model("callbacks=[{name: lora}]", "model.train_xattn=frozen")
    assert not any(p.requires_grad for _, p in model.component_params()["xattn"])
    assert all(p.requires_grad for _, p in model.component_params()["resampler"])  # full, the default


def _trained(model):
    """The adapters as training leaves them: lora_B no longer zero (the same values for the same model)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("mode", ["merged", "separate"])
def test_export_folds_the_cross_attention_and_resampler_adapters_in(mode):
    from mmscale.export.adapter import not_lm_adapter
    from mmscale.export.merge import plain_linears

    model, batch = _trained(_model(*LORA_MODES).eval()), _batch()
    lm_lora = [n for n, m in model.lm.named_modules(prefix="lm") if hasattr(m, "lora_A") and ".xattn." not in n]
    other = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and n not in lm_lora]
    assert lm_lora and other
    with torch.no_grad():
        if mode == "merged":
            want = model(**batch).logits
        else:  # the LM's adapters set aside, the others merged: as the model with the LM's adapters switched off
            reference = _model(*LORA_MODES).eval()
            _trained(reference)
            for n, p in reference.named_parameters():
                if "lora_B" in n and ".xattn." not in n and n.startswith("lm."):
                    p.zero_()
            want = reference(**batch).logits
        counts = plain_linears(model, merge=mode == "merged", merge_also=not_lm_adapter(model))
        assert not any("lora_" in n for n, _ in model.named_parameters())
        got = model(**batch).logits
    if mode == "merged":
        assert counts["lora_merged"] == len(lm_lora) + len(other)
    else:
        assert counts == {"lora_merged": len(other), "lora_removed": len(lm_lora), "dequantized": 0}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
