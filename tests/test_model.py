"""Model tests on tiny configs, CPU only. Big presets are only ever built on the meta device."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mmscale.objectives import attach_objectives
from mmscale.objectives.captioning import mean_loss
from mmscale.config import ModelConfig, VisionConfig
from mmscale.kernels import build_media_key_range
from mmscale.model import PRESETS, MultimodalModel, build_model, build_vision_tower
from mmscale.model.multimodal import apply_freeze_policy
from mmscale.model.presets import register_preset
from mmscale.model.xattn import GatedCrossAttentionBlock, XAttnDecoderLayer, apply_gated_xattn

VOCAB = 50
B, M, L = 2, 2, 12
IMG1_AT, IMG2_AT = 2, 6  # media_index: -1 before IMG1_AT, 0 from IMG1_AT, 1 from IMG2_AT


def tiny_cfg(**overrides) -> ModelConfig:
    cfg = PRESETS["tiny"]()
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if field:
            setattr(getattr(cfg, section), field, value)
        else:
            setattr(cfg, key, value)
    return cfg


def tiny_model(**overrides) -> MultimodalModel:
    torch.manual_seed(0)
    return attach_objectives(build_model(tiny_cfg(**overrides), vocab_size=VOCAB))


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    media_index = torch.full((B, L), -1, dtype=torch.int64)
    media_index[:, IMG1_AT:] = 0
    media_index[:, IMG2_AT:] = 1
    labels = torch.randint(0, VOCAB, (B, L), generator=g)
    labels[:, :3] = -100
    labels[1, -2:] = -100
    return dict(
        pixel_values=torch.randn(B, M, 3, 32, 32, generator=g),
        image_mask=torch.ones(B, M, dtype=torch.bool),
        input_ids=torch.randint(0, VOCAB, (B, L), generator=g),
        attention_mask=torch.ones(B, L, dtype=torch.int64),
        media_index=media_index,
        labels=labels,
    )


def set_gates(model: MultimodalModel, value: float) -> None:
    with torch.no_grad():
        for block in model.xattn_blocks():
            block.attn_gate.fill_(value)
            block.ff_gate.fill_(value)


def lm_config_kwargs() -> dict:
    return {**PRESETS["tiny"]().lm.config, "vocab_size": VOCAB}


# ----------------------------------------------------------------------------------------------- vision


TOWER_KW = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=8, image_size=32)


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2"])
def test_vision_tower_from_config_and_path(kind, tmp_path):
    kw = dict(TOWER_KW, **({"mlp_ratio": 2} if kind == "dinov2" else {"intermediate_size": 64}))
    torch.manual_seed(0)
    tower = build_vision_tower(VisionConfig(type=kind, config=kw)).eval()
    assert tower.hidden_size == 32
    x = torch.randn(3, 3, 32, 32)
    feats = tower.encode_images(x)
    patches = (32 // 8) ** 2 + (0 if kind == "siglip" else 1)  # CLIP and DINOv2 keep their CLS token
    assert feats.shape == (3, patches, 32)

    tower.model.save_pretrained(tmp_path)
    loaded = build_vision_tower(VisionConfig(type=kind, path=str(tmp_path))).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_images(x), tower.encode_images(x))

    meta = build_vision_tower(VisionConfig(type=kind, path=str(tmp_path)), meta=True)
    assert all(p.is_meta for p in meta.parameters())
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in tower.parameters())


def test_unknown_vision_type():
    with pytest.raises(ValueError, match="'vit'"):
        build_vision_tower(VisionConfig(type="vit"))


# ----------------------------------------------------------------------------------------------- LM


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("lm")
    LlamaForCausalLM(LlamaConfig(**lm_config_kwargs())).save_pretrained(path)
    return path


def test_lm_from_path_and_gates_at_zero_leave_lm_unchanged(lm_dir):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**{"lm.path": str(lm_dir)}), vocab_size=VOCAB).eval()
    bare = LlamaForCausalLM.from_pretrained(lm_dir).eval()
    batch = make_batch()
    with torch.no_grad():
        out = model(**batch)
        ref = bare(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert out.logits.shape == (B, L, VOCAB)
    torch.testing.assert_close(out.logits, ref)


def test_lm_from_path_resizes_to_larger_tokenizer_and_builds_on_meta(lm_dir):
    model = build_model(tiny_cfg(**{"lm.path": str(lm_dir)}), vocab_size=VOCAB + 6)
    assert model.lm.get_input_embeddings().num_embeddings == VOCAB + 6
    meta = build_model(tiny_cfg(**{"lm.path": str(lm_dir)}), vocab_size=VOCAB, meta=True)
    assert all(p.is_meta for p in meta.parameters())
    assert meta.param_counts() == build_model(tiny_cfg(**{"lm.path": str(lm_dir)}), vocab_size=VOCAB).param_counts()


def test_xattn_inserted_every_n_layers():
    model = tiny_model(**{"xattn.every_n_layers": 2})
    layers = model.lm.model.layers
    assert [type(layer).__name__ for layer in layers] == ["XAttnDecoderLayer", "LlamaDecoderLayer"]
    assert len(model.xattn_blocks()) == 1


class _TupleLayer(torch.nn.Module):
    def forward(self, hidden_states, scale=1.0, *, extra=None):
        return hidden_states * scale, extra


def test_decoder_layer_wrapper_passes_everything_through():
    block = GatedCrossAttentionBlock(dim_text=8, dim_visual=4, heads=2, dim_head=4, ff_mult=2)
    layer = XAttnDecoderLayer(_TupleLayer(), block)
    x, media = torch.randn(1, 3, 8), torch.randn(1, 5, 4)
    key_range = torch.tensor([[[0, 0], [0, 5], [2, 5]]], dtype=torch.int32)
    assert layer(x, 2.0, extra="e")[1] == "e"
    torch.testing.assert_close(layer(hidden_states=x, scale=2.0)[0], 2 * x)  # no conditioning: the plain layer
    layer.condition(media, key_range, torch.tensor([5]))
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
    out, extra = layer(hidden_states=x, scale=2.0, extra="e")
    assert extra == "e"
    torch.testing.assert_close(out[:, 0], 2 * x[:, 0])  # empty key range and ff_gate 0: unchanged
    assert changed(out[:, 1:], 2 * x[:, 1:])


def test_gate_init_sets_both_gates_and_opens_the_visual_path():
    x, media = torch.randn(1, 3, 8), torch.randn(1, 5, 4)
    key_range = torch.tensor([[[0, 5]] * 3], dtype=torch.int32)
    closed = GatedCrossAttentionBlock(dim_text=8, dim_visual=4, heads=2, dim_head=4, ff_mult=2)
    opened = GatedCrossAttentionBlock(dim_text=8, dim_visual=4, heads=2, dim_head=4, ff_mult=2, gate_init=1.0)
    assert closed.attn_gate.item() == closed.ff_gate.item() == 0.0
    assert opened.attn_gate.item() == opened.ff_gate.item() == 1.0
    grads = []
    for block in (closed, opened):
        m = media.clone().requires_grad_(True)
        block(x, m, key_range).sum().backward()
        grads.append(m.grad.abs().sum().item())
    assert grads[0] == 0.0 and grads[1] > 0  # gates at 0 pass no gradient to the visual tokens


def test_gated_xattn_fits_other_decoders():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64)).eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        ref = gpt2(ids).logits
    wrappers = apply_gated_xattn(gpt2, dim_visual=16, every_n_layers=1, heads=2, dim_head=8, ff_mult=2)
    assert len(wrappers) == 2 and gpt2.transformer.h[0] is wrappers[0]
    key_range = build_media_key_range(torch.zeros(2, 7, dtype=torch.int64), 4, "previous")
    for w in wrappers:
        w.condition(torch.randn(2, 4, 16), key_range, torch.tensor([4, 4]))
    with torch.no_grad():
        torch.testing.assert_close(gpt2(ids).logits, ref)
        for w in wrappers:
            w.xattn.attn_gate.fill_(1.0)
        assert changed(gpt2(ids).logits, ref)


def test_wrapper_forwards_public_attributes_of_the_decoder_layer():
    layer = tiny_model().lm.model.layers[0]
    assert layer.self_attn is layer.decoder_layer.self_attn
    with pytest.raises(AttributeError):
        layer._not_an_attribute  # private names are never forwarded (ZeRO-3 probes them with hasattr)


# ----------------------------------------------------------------------------------------------- gradients


def test_gradients_reach_gates_at_init_then_weights_once_gates_open():
    model = tiny_model().train()
    batch = make_batch()
    mean_loss(model(**batch)).backward()
    for block in model.xattn_blocks():
        # d loss / d gate is nonzero at gate 0, while d loss / d W = tanh(0) * ... = 0 for the block's weights
        assert block.attn_gate.grad.abs().item() > 0
        assert block.ff_gate.grad.abs().item() > 0
        assert block.to_kv.weight.grad.abs().max().item() == 0
    assert model.resampler.latents.grad.abs().max().item() == 0
    assert all(p.grad is None for p in model.vision.parameters())  # frozen in `tiny`

    set_gates(model, 0.5)
    model.zero_grad()
    mean_loss(model(**batch)).backward()
    for block in model.xattn_blocks():
        for w in (block.to_q.weight, block.to_kv.weight, block.to_out.weight, block.ff[1].weight):
            assert w.grad.abs().max().item() > 0
    for name, p in model.resampler.named_parameters():
        assert p.grad is not None and p.grad.abs().max().item() > 0, name


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = tiny_model(activation_checkpointing=ckpt).train()
        set_gates(model, 0.5)
        mean_loss(model(**make_batch())).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert model.lm.model.layers[0].decoder_layer.gradient_checkpointing
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


# ----------------------------------------------------------------------------------------------- media mask


def perturbed_logits(model, batch, images: list[int], **changes):
    batch = {**batch, **changes}
    with torch.no_grad():
        base = model(**batch).logits
        pixels = batch["pixel_values"].clone()
        pixels[:, images] += torch.randn_like(pixels[:, images])
        return base, model(**{**batch, "pixel_values": pixels}).logits


def changed(a, b):
    return not torch.allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["previous", "all"])
def test_tokens_never_see_later_images(mode):
    model = tiny_model(**{"xattn.media_mode": mode}).eval()
    set_gates(model, 1.0)
    batch = make_batch()

    base, new = perturbed_logits(model, batch, images=[1])
    torch.testing.assert_close(new[:, :IMG2_AT], base[:, :IMG2_AT])
    assert changed(new[:, IMG2_AT:], base[:, IMG2_AT:])

    base, new = perturbed_logits(model, batch, images=[0, 1])
    torch.testing.assert_close(new[:, :IMG1_AT], base[:, :IMG1_AT])  # media_index -1: no image at all
    assert changed(new[:, IMG1_AT:], base[:, IMG1_AT:])


@pytest.mark.parametrize("mode", ["previous", "all"])
def test_media_mode_previous_hides_earlier_images(mode):
    model = tiny_model(**{"xattn.media_mode": mode}).eval()
    set_gates(model, 1.0)
    # Mask the text between image 1 and image 2 out of self-attention, so image 1 can reach the tokens after
    # image 2 only through cross-attention (otherwise it reaches them through the text that saw it).
    attention_mask = torch.ones(B, L, dtype=torch.int64)
    attention_mask[:, IMG1_AT:IMG2_AT] = 0
    base, new = perturbed_logits(model, make_batch(), images=[0], attention_mask=attention_mask)
    after = slice(IMG2_AT, None)
    if mode == "previous":
        torch.testing.assert_close(new[:, after], base[:, after])
    else:
        assert changed(new[:, after], base[:, after])


def test_padded_image_slots_are_invisible():
    model = tiny_model(**{"xattn.media_mode": "all"}).eval()
    set_gates(model, 1.0)
    image_mask = torch.tensor([[True, False], [True, True]])
    base, new = perturbed_logits(model, make_batch(), images=[1], image_mask=image_mask)
    torch.testing.assert_close(new[0], base[0])  # sample 0's second slot is padding
    assert changed(new[1, IMG2_AT:], base[1, IMG2_AT:])


# ----------------------------------------------------------------------------------------------- loss


def test_loss_sum_and_token_count_match_manual_cross_entropy():
    model = tiny_model().eval()
    set_gates(model, 0.5)
    batch = make_batch()
    with torch.no_grad():
        out = model(**batch, return_token_loss=True)
    logits, labels = out.logits, batch["labels"]
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(B):
        for t in range(L - 1):
            if labels[b, t + 1] != -100:
                total += F.cross_entropy(logits[b, t].double()[None], labels[b, t + 1][None])
                count += 1
    terms = out.terms["captioning"]  # the captioning objective's sums (mmscale.objectives.captioning)
    assert terms["count"].dtype == torch.int64 and terms["count"].item() == count
    assert terms["loss_sum"].dtype == torch.float32
    torch.testing.assert_close(terms["loss_sum"].double(), total)
    torch.testing.assert_close(mean_loss(out), terms["loss_sum"] / count)
    assert terms["token_loss"].shape == (B, L - 1)
    assert (terms["token_loss"][labels[:, 1:] == -100] == 0).all()
    torch.testing.assert_close(terms["token_loss"].sum(), terms["loss_sum"])
    with torch.no_grad():
        assert model(**{**batch, "labels": None}).terms["captioning"] == {}


# ----------------------------------------------------------------------------------------------- freezing, sizes


@pytest.mark.parametrize(
    "flags",
    [
        dict(train_vision=False, train_lm=False, train_resampler=True, train_xattn=True),
        dict(train_vision=True, train_lm=True, train_resampler=False, train_xattn=False),
        dict(train_vision=False, train_lm=True, train_resampler=True, train_xattn=False),
    ],
)
def test_freeze_policy(flags):
    model = tiny_model(**flags)
    groups = model.component_params()
    expected = {"vision": "train_vision", "lm": "train_lm", "resampler": "train_resampler", "xattn": "train_xattn"}
    for comp, flag in expected.items():
        assert groups[comp], comp
        assert all(p.requires_grad == flags[flag] for _, p in groups[comp]), comp
    assert all(".xattn." in n for n, _ in groups["xattn"])
    assert not any(".xattn." in n for n, _ in groups["lm"])
    assert model.lm.get_input_embeddings().weight.requires_grad == flags["train_lm"]
    counts = model.param_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters()) == sum(counts["by_component"].values())
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)

    apply_freeze_policy(model, dataclasses.replace(tiny_cfg(), train_xattn=True, train_resampler=False))
    assert all(p.requires_grad for block in model.xattn_blocks() for p in block.parameters())
    assert not any(p.requires_grad for p in model.resampler.parameters())


def test_param_counts_use_ds_numel_of_partitioned_params():
    model = tiny_model()
    before = model.param_counts()
    for p in model.lm.parameters():  # what ZeRO-3 leaves on a rank: an empty tensor and the full size
        p.ds_numel = p.numel()
        p.data = torch.empty(0)
    assert model.param_counts() == before


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_param_counts_on_meta(name):
    model = build_model(PRESETS[name](), vocab_size=32000, meta=True)
    assert all(p.is_meta for p in model.parameters())
    counts = model.param_counts()
    print(name, counts)
    assert counts["total"] == sum(counts["by_component"].values())
    assert all(n > 0 for n in counts["by_component"].values())
    bounds = {"tiny": (1e5, 1e7), "demo": (1e6, 5e7), "flamingo-3b": (2e9, 4e9), "flamingo-9b": (8e9, 10e9)}[name]
    assert bounds[0] < counts["total"] < bounds[1]


def test_tiny_preset_forward_runs():
    model = tiny_model()
    out = model(**make_batch())
    assert torch.isfinite(mean_loss(out))


def test_preset_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="tiny"):
        register_preset("tiny")(lambda: ModelConfig())


@pytest.mark.parametrize("mode", ["previous", "all"])
def test_model_outputs_equal_under_each_backend(mode):
    """The same weights and batch through SDPA and through the Triton kernel (the interpreter on CPU)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the Triton backend needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    results = {}
    for backend in ("sdpa", "triton"):
        torch.manual_seed(0)
        cfg = tiny_cfg()
        cfg.xattn.media_mode, cfg.xattn.backend = mode, backend
        model = attach_objectives(build_model(cfg, vocab_size=VOCAB)).train()
        set_gates(model, 0.5)
        out = model(**make_batch())
        mean_loss(out).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = (out.logits.detach(), grads)
    (l_sdpa, g_sdpa), (l_triton, g_triton) = results["sdpa"], results["triton"]
    torch.testing.assert_close(l_triton, l_sdpa, rtol=1e-4, atol=1e-5)
    assert g_sdpa.keys() == g_triton.keys() and g_sdpa
    for name in g_sdpa:
        torch.testing.assert_close(g_triton[name], g_sdpa[name], rtol=1e-3, atol=1e-5, msg=name)
