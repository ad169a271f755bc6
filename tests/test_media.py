"""Media besides images (mmscale.media): decoding, the batch layout, the model's encoders, config checks.

The 2-rank ZeRO-3 run where the ranks' batches hold different media is in tests/test_media_zero3.py (slow)."""

from __future__ import annotations

import io
import itertools
import random

import numpy as np
import pytest
import torch

from mmscale.data.collate import collate_samples
from mmscale.data.decode import decode_for_training, image_to_tensor, load_image
from mmscale.data.media_demo import make_audio_sample, make_video_sample
from mmscale.data.reading import MISSING_IMAGE, UNDECODABLE_MEDIA, SampleError
from mmscale.data.tokenizer import load_tokenizer, train_sentencepiece
from mmscale.job.build import model_recipe
from mmscale.job.preflight import load_config
from mmscale.media import bind_media
from mmscale.media.audio import LogMel, fit_clip
from mmscale.training.trainer import MODEL_INPUTS

WORDS = "a red blue circle square moves left right up down one two three four low high beep beeps hello world"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenizer with both placeholders, one training shard (the preflight wants one) and a bound config."""
    from mmscale.data.media_demo import write_media_demo

    root = tmp_path_factory.mktemp("media")
    tok = train_sentencepiece([WORDS], root / "tok", 64, extra_symbols=["<video>", "<audio>"])
    shards = write_media_demo("video", root / "v", 4, 0, samples_per_shard=4, frames=4, size=32)["train"]
    return root, tok, shards[0]


def config(setup, *overrides):
    root, tok, shard = setup
    return load_config("configs/tiny.yaml", [f"data.tokenizer={tok}", f"data.train_shards={shard}",
                                             f"output_dir={root / 'run'}", "media.video.frames=4",
                                             "media.audio.seconds=0.5", "data.text_only=true", *overrides])


def decoded(cfg, raws):
    tok = load_tokenizer(cfg.data.tokenizer)
    media = bind_media(cfg, tok)
    samples = [decode_for_training(r, cfg.data, tok, 0, media) for r in raws]
    return tok, media, samples


def batch_of(cfg, raws):
    tok, media, samples = decoded(cfg, raws)
    return collate_samples(samples, pad_id=tok.pad_id, image_token_id=tok.image_token_id, max_images=1,
                           seq_len=1 + cfg.data.max_text_len, media=media, image_shape=(3, 32, 32))


def image_raw(key: str, colour=(200, 30, 30)) -> dict:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 32), colour).save(buf, format="PNG")
    return {"__key__": key, "png": buf.getvalue(), "txt": b"a red circle"}


def video_raw(i: int, key: str | None = None, frames: int = 4) -> dict:
    return {**make_video_sample(i, 0, frames=frames, size=32), "__key__": key or f"v{i}"}


def audio_raw(i: int, key: str | None = None) -> dict:
    return {**make_audio_sample(i, 0, seconds=0.5), "__key__": key or f"a{i}"}


# ------------------------------------------------------------------------------------------------------- data


def test_slots_follow_the_text_order_of_every_medium(setup):
    cfg = config(setup)
    both = {**video_raw(0), **audio_raw(1), "__key__": "va"}
    both_and_image = {**both, **image_raw("x"), "__key__": "iva"}
    b = batch_of(cfg, [video_raw(2), audio_raw(3), {"__key__": "t", "txt": b"hello world"}, both_and_image])
    # 3 slot kinds, one each: image, then video, then audio in a sample holding all three (their placeholders'
    # order); a text-only sample has none and sees none
    assert b["image_slot"].tolist() == [[-1], [-1], [-1], [0]]
    assert b["video_slot"].tolist() == [[0], [-1], [-1], [1]]
    assert b["audio_slot"].tolist() == [[-1], [0], [-1], [2]]
    assert b["video_mask"].tolist() == [[True], [False], [False], [True]]
    assert b["audio_values"].shape == (4, 1, 8000) and b["video_values"].shape == (4, 1, 4, 3, 32, 32)
    assert (b["media_index"][2] == -1).all()
    assert b["media_index"][3, :4].tolist() == [0, 1, 2, 2]
    tok = load_tokenizer(cfg.data.tokenizer)
    marks = {tok.image_token_id, tok.piece_id("<video>"), tok.piece_id("<audio>")}
    assert b["input_ids"][3, :3].tolist() == [tok.image_token_id, tok.piece_id("<video>"), tok.piece_id("<audio>")]
    assert not any(int(t) in marks for t in b["labels"].flatten() if t >= 0)  # placeholders are never targets


def test_text_only_samples_need_data_text_only(setup):
    raw = {"__key__": "t", "txt": b"hello world", "__url__": "shard.tar"}
    tok, _, (s,) = decoded(config(setup), [raw])
    assert s["images"] == [] and s["input_ids"] == tok.encode("hello world") + [tok.eos_id]
    with pytest.raises(SampleError, match="data.text_only=true") as e:
        decoded(config(setup, "data.text_only=false"), [raw])
    assert e.value.kind == MISSING_IMAGE
    # a video-only sample is not text-only: it needs no image
    _, _, (v,) = decoded(config(setup, "data.text_only=false"), [video_raw(0)])
    assert len(v["videos"]) == 1 and v["images"] == []


def test_video_frames_are_sampled_uniformly_and_decoded_as_images(setup):
    cfg = config(setup, "media.video.frames=3")
    raw = video_raw(5, frames=5)
    _, _, (s,) = decoded(cfg, [raw])
    (clip,) = s["videos"]
    d = cfg.data
    want = [image_to_tensor(load_image(raw[f"frame_{i:03d}.png"]), d.image_size, d.image_mean, d.image_std)
            for i in (0, 2, 4)]
    assert torch.equal(clip, torch.stack(want))
    too_short = {k: v for k, v in raw.items() if k != "frame_001.png" and not k.startswith("frame_00") or k == "frame_000.png"}
    assert sum(k.startswith("frame_") for k in too_short) == 1
    with pytest.raises(SampleError, match="fewer than media.video.min_frames") as e:
        decoded(cfg, [too_short])
    assert e.value.kind == UNDECODABLE_MEDIA
    broken = {**raw, "frame_002.png": b"not a png"}
    with pytest.raises(SampleError) as e:
        decoded(cfg, [broken])
    assert e.value.kind == UNDECODABLE_MEDIA


def test_video_file_decodes_with_pyav(setup):
    pytest.importorskip("av")
    cfg = config(setup)
    frames = {**video_raw(7, frames=4)}
    mp4 = {**make_video_sample(7, 0, frames=4, size=32, mp4=True), "__key__": "m"}
    assert "mp4" in mp4 and not any(k.startswith("frame_") for k in mp4)
    _, _, (a, b) = decoded(cfg, [frames, mp4])
    # the same clip through a lossy codec: close to the frames' pixels, not equal
    assert a["videos"][0].shape == b["videos"][0].shape == (4, 3, 32, 32)
    assert (a["videos"][0] - b["videos"][0]).abs().mean() < 0.25
    with pytest.raises(SampleError, match="undecodable video") as e:
        decoded(cfg, [{**mp4, "mp4": mp4["mp4"][: len(mp4["mp4"]) // 3]}])
    assert e.value.kind == UNDECODABLE_MEDIA


def test_audio_is_resampled_and_cut_or_padded(setup):
    cfg = config(setup, "media.audio.sample_rate=8000")
    raw = audio_raw(2)  # 16 kHz, 0.5 s
    _, _, (s,) = decoded(cfg, [raw])
    (clip,) = s["audio"]
    assert clip.shape == (4000,)
    # linear interpolation from 16 kHz to 8 kHz keeps every other sample here
    import wave

    with wave.open(io.BytesIO(raw["wav"])) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
    np.testing.assert_allclose(clip.numpy(), pcm[::2], atol=1e-6)
    assert fit_clip(np.ones(10, np.float32), 10, 10, 2.0).tolist() == [1.0] * 10 + [0.0] * 10
    with pytest.raises(SampleError) as e:
        decoded(cfg, [{**raw, "wav": b"RIFF....garbage"}])
    assert e.value.kind == UNDECODABLE_MEDIA


def test_log_mel_is_whispers(setup):
    from transformers import WhisperFeatureExtractor

    x = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    fe = WhisperFeatureExtractor(feature_size=40, sampling_rate=16000, hop_length=160, n_fft=400)
    want = fe._torch_extract_fbank_features(x[None])
    got = LogMel(16000, 40)(torch.from_numpy(x)[None]).numpy()
    assert got.shape == want.shape == (1, 40, 100)
    np.testing.assert_allclose(got, want, atol=1e-5)


# ------------------------------------------------------------------------------------------------------- model


def model_and_batch(cfg, raws, seed=0):
    b = batch_of(cfg, raws)
    torch.manual_seed(seed)
    model = model_recipe(cfg).build(load_tokenizer(cfg.data.tokenizer).vocab_size)
    return model, {k: b[k] for k in MODEL_INPUTS if k in b}


def test_a_sample_sees_only_its_own_media_and_frame_order_counts(setup):
    cfg = config(setup, "model.xattn.gate_init=1.0")
    model, batch = model_and_batch(cfg, [video_raw(0), {**video_raw(1), **audio_raw(2), "__key__": "va"}])
    model.eval()
    base = model(**batch).logits
    other = dict(batch, video_values=batch["video_values"].clone(), audio_values=batch["audio_values"].clone())
    other["video_values"][1] = torch.randn_like(other["video_values"][1])
    other["audio_values"][1] = torch.randn_like(other["audio_values"][1])
    changed = model(**other).logits
    assert torch.equal(changed[0], base[0])  # sample 0's logits: bit-identical
    assert not torch.allclose(changed[1], base[1])
    shuffled = dict(batch, video_values=batch["video_values"][:, :, [3, 1, 0, 2]])
    assert not torch.allclose(model(**shuffled).logits[0], base[0])  # time embeddings: order is seen


def test_every_parameter_gets_a_gradient_whatever_the_batch_holds(setup):
    """ZeRO-3 needs every rank to run every encoder each step: a text-only batch still reaches every parameter."""
    cfg = config(setup, "model.train_vision=true")
    model, batch = model_and_batch(cfg, [{"__key__": "t", "txt": b"hello world"}] * 2)
    model.train()
    out = model(**batch)
    out.terms["captioning"]["loss_sum"].backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("media.audio.") for n, _ in trainable) and any(n.startswith("media.video.") for n, _ in trainable)
    # (CLIP's post_layernorm only makes the pooled output, which nothing reads, with or without media)
    assert [n for n, p in trainable if p.grad is None and "post_layernorm" not in n] == []
    for n, p in trainable:
        if p.grad is not None and n.startswith(("media.", "vision.", "resampler.")):
            assert not p.grad.any(), n  # no media: all-zero gradients, never missing ones


def test_images_only_batches_are_unchanged_by_the_media_layout(setup):
    """An images-only model's encode_media equals the same images with explicit image slots 0..M-1."""
    cfg = load_config("configs/tiny.yaml", [f"data.tokenizer={setup[1]}", f"data.train_shards={setup[2]}",
                                            "data.max_images=2"])
    torch.manual_seed(0)
    model = model_recipe(cfg).build(64).eval()
    assert len(model.media) == 0 and "media" not in model.param_counts()["by_component"]
    px = torch.randn(3, 2, 3, 32, 32)
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    plain = model.encode_media(px, mask)
    slotted = model.encode_media(px, mask, image_slot=torch.tensor([[0, 1]] * 3))
    assert torch.equal(plain, slotted)
    n = model.resampler.num_latents
    assert not plain[2].any() and not plain[1, n:].any() and plain[1, :n].any()  # padded slots: zeros


def test_whisper_encoder_from_config_and_from_a_saved_model(setup, tmp_path):
    from transformers import WhisperConfig, WhisperModel

    from mmscale.media.audio import Audio, AudioSection

    kw = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, decoder_layers=1, decoder_attention_heads=2,
              encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=40, max_source_positions=25, vocab_size=100,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    section = AudioSection(seconds=0.5, encoder="whisper", config=kw)
    assert Audio.config_problems(section, None) == []
    torch.manual_seed(0)
    WhisperModel(WhisperConfig(**kw)).save_pretrained(tmp_path / "whisper")
    enc = Audio.build_encoder(AudioSection(seconds=0.5, encoder="whisper", path=str(tmp_path / "whisper")), None, 48)
    wave = torch.randn(2, 8000) * 0.1
    out = enc(wave, None)
    assert out.shape == (2, 25, 48)  # 50 mel frames, halved by Whisper's strided conv; mapped to the media width
    saved = WhisperModel.from_pretrained(tmp_path / "whisper").get_encoder()
    feats = enc.tower.features(wave)
    assert torch.equal(enc.tower.encoder(input_features=feats).last_hidden_state,
                       saved(input_features=feats).last_hidden_state)
    wrong = Audio.config_problems(AudioSection(seconds=1.0, encoder="whisper", config=kw), None)
    assert wrong and "media.audio.seconds=0.5" in wrong[0]


# ------------------------------------------------------------------------------------------------------- config


def test_config_problems_name_the_field_and_the_fix(setup, tmp_path):
    from mmscale.config import ConfigError

    root, tok, shard = setup
    base = ["configs/tiny.yaml"]
    with pytest.raises(ConfigError) as e:
        load_config(*base, [f"data.tokenizer={tok}", f"data.train_shards={shard}", "media.smell.max_items=1",
                            "media.video.frames=0", "media.video.colour=1", "media.audio.encoder=lstm",
                            "media.image.max_items=2"])
    text = str(e.value)
    assert "media.smell: unknown medium 'smell'. Registered: audio, video" in text
    assert "media.video: frames: 0 must be an integer >= 1" in text
    assert "media.video.colour" in text
    assert "media.audio: encoder: 'lstm' is not one of 'conv', 'whisper'" in text
    assert "media.image: images are every model's own medium" in text
    plain = train_sentencepiece([WORDS], tmp_path / "plain", 64)
    with pytest.raises(ConfigError, match=r"no '<video>' token.*extra-symbols '<video>'"):
        load_config(*base, [f"data.tokenizer={plain}", f"data.train_shards={shard}", "media.video.frames=4"])


@pytest.mark.slow
def test_a_video_and_audio_run_exports_and_reloads(setup, tmp_path):
    """Train a tiny run with both media (1 process, 2 steps), export it, and load it back without DeepSpeed: the
    export's logits equal the run's on a batch holding a video, a sound and a text-only sample."""
    import subprocess
    import sys

    from mmscale.data.media_demo import write_media_demo
    from mmscale.export import load_exported
    from mmscale.job.runs import load_run
    from test_training import ROOT

    root, tok, shard = setup
    run, out = tmp_path / "run", tmp_path / "export"
    data = write_media_demo("video", tmp_path / "v", 16, 8, samples_per_shard=8, frames=4, size=32)
    args = [f"data.tokenizer={tok}", f"data.train_shards={data['train'][0].parent}/train-*.tar",
            f"data.val_shards={data['val'][0]}", "media.video.frames=4", "media.audio.seconds=0.5",
            "data.text_only=true", "train.max_steps=2", "train.checkpoint_every=0", f"output_dir={run}"]
    subprocess.run([sys.executable, str(ROOT / "launchers/train.py"), "--config", str(ROOT / "configs/tiny.yaml"),
                    *args], cwd=ROOT, check=True, capture_output=True, timeout=600)
    subprocess.run([sys.executable, str(ROOT / "launchers/export.py"), "--run", str(run), "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    cfg, model, _ = load_run(run)
    exported, _, ecfg = load_exported(out)
    assert ecfg.media == cfg.media and set(exported.media) == {"video", "audio"}
    b = batch_of(config(setup), [video_raw(3), audio_raw(4), {"__key__": "t", "txt": b"hello world"}])
    inputs = {k: b[k] for k in MODEL_INPUTS if k in b}
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits, model.eval()(**inputs).logits, rtol=1e-4, atol=1e-4)


def test_the_pipeline_decodes_media_and_counts_bad_clips(setup, tmp_path):
    """Real shards through the TrainLoader (a worker process): videos, sounds and text-only samples batched with
    static shapes; an undecodable clip and a too-short one skipped and counted as undecodable_media."""
    from mmscale.data import TrainLoader
    from mmscale.data.shards import write_tar_shards

    cfg = config(setup, "data.num_workers=1", "data.shuffle_buffer=1")
    samples = [video_raw(i, f"v{i}") for i in range(5)] + [audio_raw(i, f"a{i}") for i in range(5)]
    samples += [{"__key__": f"t{i}", "txt": "hello world"} for i in range(4)]
    samples[1] = {**samples[1], "frame_002.png": b"broken"}
    samples[6] = {**samples[6], "wav": b"RIFF0000WAVEfmt nonsense"}
    samples.append({**{k: v for k, v in video_raw(9, "short").items() if not k.startswith("frame_00") or
                       k == "frame_000.png"}})
    write_tar_shards([{k: v for k, v in s.items() if k != "json"} for s in samples], tmp_path / "mixed", 8)
    tok = load_tokenizer(cfg.data.tokenizer)
    loader = TrainLoader(cfg.data, tok, 4, 0, 1, seed=0, shards=str(tmp_path / "mixed"),
                         media=bind_media(cfg, tok))
    batches = list(itertools.islice(iter(loader), 3))
    loader.close()
    kinds: dict[str, int] = {}
    for b in batches:
        for k, n in b["skipped_by_kind"].items():
            kinds[k] = kinds.get(k, 0) + n
        assert b["video_values"].shape == (4, 1, 4, 3, 32, 32) and b["audio_values"].shape == (4, 1, 8000)
    assert kinds == {"undecodable_media": 3}
    keys = [k for b in batches for k in b["__key__"]]
    assert len(keys) == 12 and not {"v1", "a1", "short"} & set(keys)
    for b in batches:  # each row's mask says what it holds
        for i, key in enumerate(b["__key__"]):
            assert bool(b["video_mask"][i, 0]) == key.startswith("v") and bool(b["audio_mask"][i, 0]) == key.startswith("a")


def test_a_stand_in_pass_leaves_batch_norm_statistics_alone(setup):
    """A trained conv tower's running statistics move with real images and videos only: a batch without any (text
    only) runs the tower on a padded stand-in, which must not pull them towards its zeros."""
    cfg = config(setup, "model.train_vision=true", "model.vision.type=resnet",
                 "model.vision.config={embedding_size: 8, hidden_sizes: [8, 16], depths: [1, 1]}")
    model, text = model_and_batch(cfg, [{"__key__": "t", "txt": b"hello world"}] * 2)
    model.train()
    stats = {n: b.clone() for n, b in model.vision.named_buffers() if "running" in n}
    assert stats
    model(**text).terms["captioning"]["loss_sum"].backward()
    assert all(torch.equal(b, stats[n]) for n, b in model.vision.named_buffers() if n in stats)
    _, with_video = model_and_batch(cfg, [video_raw(0), video_raw(1)])
    model(**with_video)
    assert any(not torch.equal(b, stats[n]) for n, b in model.vision.named_buffers() if "running_mean" in n)
    assert model.training and all(m.training for m in model.modules())
