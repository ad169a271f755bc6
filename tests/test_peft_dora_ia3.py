"""DoRA (`dora`: peft's LoRA with use_dora) and IA3 (`ia3`) as fine-tuning callbacks (issue 20, part 4): exactly
their own parameters train besides what the freeze policy trains, the adapted model starts as the one it adapts,
merged export (`plain_linears`) gives the logits of the unmerged model, the exported config leaves them out, and
their LM adapters write in peft's format. Their 2-rank ZeRO-3 runs (the checkpoint holds only what trains, the reload
passes the fingerprint) are in tests/test_finetune.py::test_peft_method_under_zero3_trains_only_what_it_says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmscale.config import ConfigError
from mmscale.job.build import model_recipe
from mmscale.job.preflight import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
BASE = ["model.xattn.backend=sdpa", "model.xattn.gate_init=1.0"]
CASES = {  # name: (overrides, the marker of the method's own parameter names)
    "dora": (["callbacks=[{name: dora}]"], "lora_"),
    "dora_on_xattn": (["callbacks=[{name: dora, args: {r: 4}}]", "model.train_xattn=lora",
                       "model.train_resampler=lora"], "lora_"),
    "ia3": (["callbacks=[{name: ia3}]"], "ia3_l"),
    "ia3_with_vision": (["callbacks=[{name: ia3, args: {components: [lm, vision]}}]"], "ia3_l"),
}


def _model(*overrides: str):
    cfg = load_config(TINY, [*BASE, *overrides], check_paths=False)
    recipe = model_recipe(cfg)
    torch.manual_seed(0)
    model = recipe.build(64)
    recipe.finish(model)
    return model.eval()


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (2, 8), generator=g)
    return {"pixel_values": torch.randn(2, 1, 3, 32, 32, generator=g), "image_mask": torch.ones(2, 1, dtype=torch.bool),
            "input_ids": ids, "attention_mask": torch.ones_like(ids), "media_index": torch.zeros_like(ids)}


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(**_batch()).logits


@torch.no_grad()
def _trained(model):
    """The adapters as training leaves them (seeded): LoRA's B off zero, DoRA's magnitudes and IA3's vectors off
    where they start."""
    g = torch.Generator().manual_seed(1)
    for n, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "lora_B" in n:
            p.copy_(0.1 * noise)
        elif "lora_magnitude_vector" in n or "ia3_l" in n:
            p.mul_(1 + 0.1 * noise)
    return model


def _peft_layers(model) -> list[str]:
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.lora import LoraLayer

    return [n for n, m in model.named_modules() if isinstance(m, (LoraLayer, IA3Layer))]


@pytest.mark.parametrize("case", ["dora", "ia3", "ia3_with_vision"])
def test_exactly_the_method_and_the_freeze_policy_train(case):
    overrides, own = CASES[case]
    plain, model = _model(), _model(*overrides)
    policy = {n for n, p in plain.named_parameters() if p.requires_grad}  # tiny: cross-attention and resampler
    assert policy and all(n.startswith("resampler.") or ".xattn." in n for n in policy)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == policy | {n for n, _ in model.named_parameters() if own in n}, sorted(trainable ^ policy)[:5]
    layers = {n: model.get_submodule(n) for n in _peft_layers(model)}
    if case == "dora":  # A, B and the magnitude (one per output row) on q, k, v, o of 2 layers
        assert len(layers) == 2 * 4 and {n.rsplit(".", 1)[-1] for n in layers} == {"q_proj", "k_proj", "v_proj",
                                                                                       "o_proj"}
        for m in layers.values():
            assert m.use_dora["default"] and m.lora_magnitude_vector["default"].weight.shape == (m.out_features,)
        assert sum(own in n for n in trainable) == 2 * 4 * 3
    else:  # a vector per output of k and v, per input of down_proj (feed-forward)
        lm = {n: m for n, m in layers.items() if n.startswith("lm.")}
        assert {n.rsplit(".", 1)[-1] for n in lm} == {"k_proj", "v_proj", "down_proj"} and len(lm) == 2 * 3
        for n, m in lm.items():
            ff = n.endswith("down_proj")
            assert m.is_feedforward == ff
            assert m.ia3_l["default"].shape == ((1, m.in_features) if ff else (m.out_features, 1))
        vision = {n for n in layers if n.startswith("vision.")}
        assert bool(vision) == (case == "ia3_with_vision")  # its k_proj, v_proj
        assert not any(p.requires_grad for n, p in model.component_params()["vision"] if own not in n)
    assert not any(p.requires_grad for n, p in model.component_params()["lm"] if own not in n)
    # DoRA starts with m = ||W|| (B = 0), IA3 with ones: the adapted model starts as the one it adapts
    torch.testing.assert_close(_logits(model), _logits(plain), rtol=0, atol=0)


def test_dora_on_the_cross_attention_and_resampler():
    model, plain = _model(*CASES["dora_on_xattn"][0]), _model()
    groups = model.component_params()
    xattn = {n for n, p in groups["xattn"] if p.requires_grad}
    assert all("lora_" in n or n.endswith(("attn_gate", "ff_gate")) for n in xattn), xattn
    for block in model.xattn_blocks():  # every linear layer of a block, with its magnitude
        assert {n.split(".lora_magnitude_vector")[0] for n, _ in block.named_parameters()
                if "lora_magnitude_vector" in n} == {"to_q", "to_kv", "to_out", "ff.1", "ff.3"}
    resampler = {n for n, p in groups["resampler"] if p.requires_grad}
    assert resampler and all("lora_" in n for n in resampler)
    assert any("lora_magnitude_vector" in n for n in resampler)
    torch.testing.assert_close(_logits(model), _logits(plain), rtol=0, atol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_merged_export_equals_the_unmerged_model(case):
    from mmscale.export.merge import plain_linears

    overrides, _ = CASES[case]
    model = _trained(_model(*overrides))
    want = _logits(model)
    assert not torch.allclose(want, _logits(_model()), atol=1e-3)  # the perturbed adapters do change the model
    layers = _peft_layers(model)
    counts = plain_linears(model, merge=True)
    assert not _peft_layers(model) and not any("lora_" in n or "ia3_l" in n for n in model.state_dict())
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in layers)
    if case.startswith("dora"):
        assert counts == {"lora_merged": len(layers), "lora_removed": 0, "dequantized": 0}
    else:
        assert counts == {"lora_merged": 0, "lora_removed": 0, "dequantized": 0, "ia3_merged": len(layers),
                          "ia3_removed": 0}
    # the names and shapes of the model built without the method (what the exported config builds)
    plain = _model(*[o.replace("=lora", "=full") for o in overrides if not o.startswith("callbacks")])
    assert {n: t.shape for n, t in model.state_dict().items()} == {n: t.shape for n, t in plain.state_dict().items()}
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-5)


def test_dora_merge_is_peft_own_merge():
    """The fp32 merge of one DoRA layer against peft's merge_and_unload of the same layer."""
    import copy

    from mmscale.export.merge import plain_linears

    model = _trained(_model(*CASES["dora"][0]))
    name = _peft_layers(model)[0]
    layer = copy.deepcopy(model.get_submodule(name))
    theirs = layer.merge(safe_merge=True) or layer.get_base_layer().weight
    plain_linears(model, merge=True)
    torch.testing.assert_close(model.get_submodule(name).weight, theirs, rtol=1e-6, atol=1e-6)


def test_separate_takes_the_vectors_off():
    """--adapters separate: the IA3 layers become their base layers (the vectors go to the adapter folder)."""
    from mmscale.export.merge import plain_linears

    model = _trained(_model(*CASES["ia3"][0]))
    counts = plain_linears(model, merge=False)
    assert counts["ia3_removed"] == 6 and counts["ia3_merged"] == 0 and not _peft_layers(model)
    torch.testing.assert_close(_logits(model), _logits(_model()), rtol=0, atol=0)


@pytest.mark.parametrize("args, message", [
    ("{name: dora, args: {r: 0}}", "r must be an integer >= 1, got 0"),
    ("{name: dora, args: {alpha: -1}}", "alpha must be > 0, got -1"),
    ("{name: dora, args: {target_modules: []}}", "target_modules must be a non-empty list of module names"),
    ("{name: dora, args: {use_dora: false}}", "use_dora"),  # not an argument: dora is LoRA with use_dora
    ("{name: ia3, args: {target_modules: []}}", "target_modules must be a non-empty list of module names"),
    ("{name: ia3, args: {target_modules: [k_proj, 3]}}", "target_modules must be a non-empty list"),
    ("{name: ia3, args: {feedforward_modules: [up_proj]}}",
     "feedforward_modules ['up_proj'] are not in target_modules ['k_proj', 'v_proj', 'down_proj']"),
    ("{name: ia3, args: {feedforward_modules: 7}}", "feedforward_modules must be a list of module names, got 7"),
    ("{name: ia3, args: {components: [lm, audio]}}", "components must be a non-empty list of lm, vision"),
    ("{name: ia3, args: {r: 8}}", "'r'"),
])
def test_bad_arguments_are_refused_with_their_name(args, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [f"callbacks=[{args}]"], check_paths=False)
    assert message in str(e.value) and "callbacks[0].args" in str(e.value), str(e.value)


def test_ia3_is_not_what_lora_train_modes_ask_for():
    with pytest.raises(ConfigError, match="model.train_xattn: 'lora' puts the adapters of a lora or qlora callback"):
        load_config(TINY, ["callbacks=[{name: ia3}]", "model.train_xattn=lora"], check_paths=False)
    load_config(TINY, ["callbacks=[{name: ia3, args: {feedforward_modules: []}}]"], check_paths=False)  # none: valid
    with pytest.raises(ValueError, match=r"ia3: no module of the vision is named any of \['down_proj'\]"):
        _model("callbacks=[{name: ia3, args: {target_modules: [down_proj], components: [lm, vision]}}]")


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_the_exported_config_leaves_the_method_out(method):
    from mmscale.export.config import export_config

    cfg = load_config(TINY, [f"callbacks=[{{name: {method}}}, {{name: early_stopping}}]"], check_paths=False)
    out, changes = export_config(cfg, "tokenizer.model", 64)
    assert [c.name for c in out.callbacks] == ["early_stopping"]
    assert any(f"callbacks: {method} taken out" in c for c in changes)


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_lm_adapters_write_in_peft_format(method, tmp_path):
    """write_adapter (`--adapters separate`, the `adapter` subcommand): peft loads the folder onto the plain Hugging
    Face LM holding the same base weights, and each of its adapted layers computes what ours does."""
    import json

    from peft import PeftModel

    from mmscale.export.adapter import adapter_settings, write_adapter
    from mmscale.model.multimodal import build_lm
    from mmscale.training.weights import plain_lm_name

    overrides = [f"callbacks=[{{name: {method}}}]"]
    cfg = load_config(TINY, [*BASE, *overrides], check_paths=False)
    model, plain = _trained(_model(*overrides)), _model()
    hf = build_lm(cfg.model, vocab_size=64)
    base = {plain_lm_name(n): t for n, t in plain.lm.state_dict().items() if ".xattn." not in n}
    assert set(base) == set(hf.state_dict())
    hf.load_state_dict(base)
    n = write_adapter(model, adapter_settings(cfg), tmp_path, None, "run")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == ("LORA" if method == "dora" else "IA3")
    if method == "dora":
        assert config["use_dora"] is True and n == 2 * 4 * 3
    else:
        assert sorted(config["feedforward_modules"]) == ["down_proj"] and n == 2 * 3
    peft_model = PeftModel.from_pretrained(hf, tmp_path).eval()
    theirs = dict(peft_model.base_model.model.named_modules())
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for name in _peft_layers(model):
            ours = model.get_submodule(name)
            other = theirs[plain_lm_name(name)]
            assert type(other) is type(ours), name
            xi = x[:, :ours.in_features]
            torch.testing.assert_close(other(xi), ours(xi), rtol=1e-6, atol=1e-6)
