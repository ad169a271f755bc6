"""Interleaved image-text documents: JSONL -> shards (real tars) -> decode -> collate -> the model's cross-attention.

Real components only: PNG files written by PIL, shards written by the writer, a sentencepiece model trained here on
the synthetic documents' words, a tiny MultimodalModel from configs/tiny.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmscale.objectives import attach_objectives
from mmscale.objectives.captioning import mean_loss
from mmscale.config import DataConfig
from mmscale.job.preflight import load_config
from mmscale.data.collate import collate_samples
from mmscale.data.decode import image_to_tensor
from mmscale.data.interleaved import (
    decode_document,
    document_sample,
    is_document,
    main,
    make_document_files,
    synthetic_document_words,
    write_documents,
)
from mmscale.data.reading import SampleError, SkipCounter, tar_samples
from mmscale.data.shards import resolve_shards
from mmscale.data.synthetic import make_shapes_sample
from mmscale.data.write_shards import BadRowError
from mmscale.model import build_model

REPO = Path(__file__).resolve().parent.parent
SIZE = 32
NUM_DOCS = 12


def data_cfg(**overrides) -> DataConfig:
    base = dict(image_size=SIZE, max_text_len=48, max_images=4, num_workers=0, shuffle_buffer=0)
    return DataConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def doc_tokenizer(tmp_path_factory):
    """Word-level sentencepiece model that spells every synthetic document word (".", ":" included)."""
    from mmscale.data.tokenizer import load_tokenizer, train_sentencepiece

    words = synthetic_document_words()
    texts = [" ".join(words)] + [" ".join(words[i:] + words[:i]) for i in range(0, len(words), 3)]
    return load_tokenizer(train_sentencepiece(texts, tmp_path_factory.mktemp("doc_tok") / "docs", vocab_size=64))


@pytest.fixture(scope="module")
def doc_files(tmp_path_factory) -> Path:
    """docs.jsonl (12 synthetic documents, 1-4 images each) and images/ beside it."""
    return make_document_files(tmp_path_factory.mktemp("doc_files"), NUM_DOCS, image_size=SIZE, seed=0)


@pytest.fixture(scope="module")
def doc_shards(doc_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("doc_shards")
    assert main(["write", "--input", str(doc_files), "--images", str(doc_files.parent / "images"),
                 "--out", str(out), "--samples-per-shard", "4"]) == 0
    return out


def raw_documents(shards: Path) -> list[dict]:
    counter = SkipCounter()
    raws = list(tar_samples(resolve_shards(str(shards)), counter))
    assert counter.count == 0
    return raws


def pixels(path: Path) -> torch.Tensor:
    cfg = data_cfg()
    with Image.open(path) as img:
        return image_to_tensor(img, SIZE, cfg.image_mean, cfg.image_std)


def expected(doc: dict, tok, images_dir: Path) -> tuple[list[int], list[torch.Tensor]]:
    """What decoding should give for an input document without truncation: (ids, images)."""
    ids, images = [], []
    for text, image in zip(doc["texts"], doc["images"]):
        if image is None:
            ids += tok.encode(text)
        else:
            ids.append(tok.image_token_id)
            images.append(pixels(images_dir / image))
    return ids + [tok.eos_id], images


# ----------------------------------------------------------------------------------------------- writer + decode


def test_documents_round_trip_through_shards_decode_and_collate(doc_files, doc_shards, doc_tokenizer):
    tok, cfg = doc_tokenizer, data_cfg()
    docs = [json.loads(line) for line in doc_files.read_text().splitlines()]
    assert json.loads((doc_shards / "sizes.json").read_text()) == {
        "train-000000.tar": 4, "train-000001.tar": 4, "train-000002.tar": 4}
    raws = raw_documents(doc_shards)
    assert [r["__key__"] for r in raws] == [f"{i:09d}" for i in range(NUM_DOCS)]
    samples = []
    for raw, doc in zip(raws, docs):
        assert is_document(raw)
        s = decode_document(raw, cfg, tok)
        want_ids, want_images = expected(doc, tok, doc_files.parent / "images")
        assert s["input_ids"] == want_ids and s["class_label"] == -100
        assert len(s["images"]) == len(want_images) == s["input_ids"].count(tok.image_token_id)
        for got, want in zip(s["images"], want_images):  # PNG: lossless, so the very same pixels, in order
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        samples.append(s)
    assert {len(s["images"]) for s in samples} >= {1, 2, 3}  # the synthetic draw mixes image counts
    assert any(doc["texts"][0] is not None for doc in docs)  # ... and documents opening with text

    batch = collate_samples(samples, pad_id=tok.pad_id, image_token_id=tok.image_token_id, max_images=4,
                            seq_len=1 + cfg.max_text_len)
    for b, s in enumerate(samples):
        n = len(s["images"])
        assert batch["image_mask"][b].tolist() == [True] * n + [False] * (4 - n)
        assert not batch["pixel_values"][b, n:].any()
        positions = [t for t, i in enumerate(s["input_ids"]) if i == tok.image_token_id]
        media = batch["media_index"][b]
        for j, p in enumerate(positions):  # token at p sees image j, up to (not including) the next image token
            end = positions[j + 1] if j + 1 < len(positions) else len(s["input_ids"])
            assert media[p:end].tolist() == [j] * (end - p)
            torch.testing.assert_close(batch["pixel_values"][b, j], s["images"][j], rtol=0, atol=0)
        assert (media[: positions[0]] == -1).all()
        assert (batch["labels"][b][torch.tensor(positions)] == -100).all()


def _write_one(tmp_path: Path, doc: dict, images: dict[str, Image.Image]) -> dict:
    for name, img in images.items():
        img.save(tmp_path / name)
    write_documents([doc], tmp_path, tmp_path / "shards", samples_per_shard=8)
    [raw] = raw_documents(tmp_path / "shards")
    return raw


def three_image_doc(tmp_path: Path, intro: str = "number of pictures : three .") -> dict:
    """A raw shard sample: intro, then 3 images each followed by its 9-token caption (10 tokens per image)."""
    texts, names, images = [intro], [None], {}
    for j in range(3):
        img, caption = make_shapes_sample(100 + j, SIZE, seed=1)
        images[f"im{j}.png"] = img
        texts += [None, f"{caption} ."]
        names += [f"im{j}.png", None]
    return _write_one(tmp_path, {"texts": texts, "images": names}, images)


def test_truncation_drops_images_with_their_tokens(tmp_path, doc_tokenizer):
    tok = doc_tokenizer
    raw = three_image_doc(tmp_path)
    full = decode_document(raw, data_cfg(max_text_len=64), tok)
    positions = [t for t, i in enumerate(full["input_ids"]) if i == tok.image_token_id]
    assert len(positions) == 3 and positions[0] == 6  # "number of pictures : three ." is 6 tokens

    # the cut falls just after image 2's token: it stays (and is seen by the eos after it)
    s = decode_document(raw, data_cfg(max_text_len=positions[2] + 1), tok)
    assert len(s["images"]) == 3 and s["input_ids"][-2:] == [tok.image_token_id, tok.eos_id]
    # one token earlier, image 2's token would be cut: image 2 goes with it
    s = decode_document(raw, data_cfg(max_text_len=positions[2]), tok)
    assert len(s["input_ids"]) == 1 + positions[2] and s["input_ids"][-1] == tok.eos_id
    assert len(s["images"]) == s["input_ids"].count(tok.image_token_id) == 2
    torch.testing.assert_close(s["images"][1], full["images"][1], rtol=0, atol=0)

    # max_images: image 2 and its token go, the caption after it stays
    s = decode_document(raw, data_cfg(max_images=2, max_text_len=64), tok)
    assert len(s["images"]) == s["input_ids"].count(tok.image_token_id) == 2
    assert len(s["input_ids"]) == len(full["input_ids"]) - 1
    assert s["input_ids"][positions[2]:] == full["input_ids"][positions[2] + 1:]
    # max_images=1 (the default config): a document still trains, on its first image
    s = decode_document(raw, data_cfg(max_images=1, max_text_len=64), tok)
    assert len(s["images"]) == s["input_ids"].count(tok.image_token_id) == 1

    # no image within the first max_text_len tokens: skipped, with the reason
    with pytest.raises(SampleError, match=r"000000000 in .*: no image within the first 5 tokens"):
        decode_document(raw, data_cfg(max_text_len=5), tok)


def test_literal_image_token_in_text_is_not_an_image(tmp_path):
    from mmscale.data.tokenizer import load_tokenizer, train_sentencepiece

    # a subword model spells a typed "<image>" as the image token itself (a word model would not)
    tok = load_tokenizer(train_sentencepiece([" ".join(synthetic_document_words())] * 4, tmp_path / "uni",
                                             vocab_size=80, model_type="unigram"))
    assert tok.image_token_id in tok.encode("number of <image> pictures .")
    raw = three_image_doc(tmp_path, intro="number of <image> pictures .")
    s = decode_document(raw, data_cfg(max_text_len=256), tok)
    assert s["input_ids"].count(tok.image_token_id) == len(s["images"]) == 3
    assert s["input_ids"].index(tok.image_token_id) == len([t for t in tok.encode("number of <image> pictures .")
                                                            if t != tok.image_token_id])


def test_mmc4_documents_put_each_image_before_its_sentence(tmp_path, doc_tokenizer):
    tok = doc_tokenizer
    img0, _ = make_shapes_sample(0, SIZE, seed=2)
    img1, _ = make_shapes_sample(1, SIZE, seed=2)
    doc = {"text_list": ["a red circle .", "a blue square .", "a green diamond ."],
           "image_info": [{"image_name": "b.png", "matched_text_index": 2},
                          {"image_name": "a.png", "matched_text_index": 0}]}
    raw = _write_one(tmp_path, doc, {"a.png": img0, "b.png": img1})
    assert json.loads(raw["json"]) == {"texts": [None, "a red circle .", "a blue square .", None,
                                                 "a green diamond ."],
                                       "images": ["0.png", None, None, "1.png", None]}
    s = decode_document(raw, data_cfg(), tok)
    e = tok.encode
    assert s["input_ids"] == ([tok.image_token_id] + e("a red circle .") + e("a blue square .")
                              + [tok.image_token_id] + e("a green diamond .") + [tok.eos_id])
    torch.testing.assert_close(s["images"][0], pixels(tmp_path / "a.png"), rtol=0, atol=0)
    torch.testing.assert_close(s["images"][1], pixels(tmp_path / "b.png"), rtol=0, atol=0)


def test_bad_rows_stop_the_writer_or_are_skipped_and_counted(tmp_path, capsys):
    img, _ = make_shapes_sample(0, SIZE, seed=0)
    img.save(tmp_path / "ok.png")
    (tmp_path / "notes.txt").write_text("not an image")
    good = {"texts": ["a red circle .", None], "images": [None, "ok.png"]}
    rows = [
        good,
        {"texts": ["a .", None], "images": [None, "missing.png"]},  # line 2
        "not json",  # line 3
        {"texts": ["   ", None], "images": [None, "ok.png"]},  # no text
        {"texts": ["a red circle ."], "images": [None]},  # no image
        {"texts": ["a", "b"], "images": [None]},  # lengths differ
        {"texts": ["a", None], "images": ["ok.png", "ok.png"]},  # position 0 holds both
        {"texts": ["a", None], "images": [None, "https://example.com/x.jpg"]},  # a URL
        {"texts": ["a", None], "images": [None, "notes.txt"]},  # suffix
        {"text_list": ["a"], "image_info": [{"image_name": "ok.png", "matched_text_index": 3}]},
        {"caption": "a", "image": "ok.png"},  # a pairs row, not a document
        {"text_list": ["a blue square ."], "image_info": [{"image_name": "ok.png", "matched_text_index": 0}]},
    ]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    args = ["write", "--input", str(docs), "--images", str(tmp_path), "--out", str(tmp_path / "out")]

    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{docs}:2: image file {str(tmp_path / 'missing.png')!r} does not exist" in err
    assert "--skip-bad-rows" in err

    assert main(args + ["--skip-bad-rows"]) == 0
    out, err = capsys.readouterr()
    assert "wrote 2 documents into 1 shards" in out and "skipped 10 rows" in out
    for line, reason in [(3, "not JSON"), (4, "no text"), (5, "no image"), (6, "differ in length"),
                         (7, "position 0 holds both a text and an image"), (8, "is a URL"),
                         (9, "unsupported suffix"), (10, "matched_text_index 3 is outside text_list"),
                         (11, "are neither form")]:
        assert f"skipped {docs}:{line}: " in err and reason in err, (line, reason)
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"train-000000.tar": 2}

    # the Python API: raises naming the document, or describes it in `skipped`
    with pytest.raises(BadRowError, match="document 1: no image"):
        write_documents([good, rows[4]], tmp_path, tmp_path / "api", 4)
    skipped: list[str] = []
    assert write_documents([good, rows[4], good], tmp_path, tmp_path / "api", 4, skipped=skipped) == {
        "train-000000.tar": 2}
    assert skipped == ["document 1: no image"]


def test_unusable_documents_raise_sample_errors_naming_key_and_problem(tmp_path, doc_tokenizer):
    tok, cfg = doc_tokenizer, data_cfg()
    img, _ = make_shapes_sample(0, SIZE, seed=0)
    img.save(tmp_path / "ok.png")
    raw = document_sample("doc7", {"texts": ["a red circle .", None], "images": [None, "ok.png"]}, tmp_path)
    raw = {**raw, "__url__": "s.tar"}
    assert decode_document(raw, cfg, tok)["input_ids"][-2:] == [tok.image_token_id, tok.eos_id]
    cases = [
        ({"json": b"{not json"}, "doc7 in s.tar: malformed document (.json member is not JSON", "other"),
        ({"json": b"[1, 2]"}, "doc7 in s.tar: malformed document (.json member): expected a JSON object", "other"),
        ({"json": b'{"texts": ["\xff"]}'}, "doc7 in s.tar: document (.json member) is not UTF-8", "bad_encoding"),
        ({"json": json.dumps({"texts": ["", None], "images": [None, "0.png"]}).encode()},
         "doc7 in s.tar: document has no text", "empty_caption"),
        ({"json": json.dumps({"texts": ["a"], "images": [None]}).encode()}, "doc7 in s.tar: document has no image",
         "missing_image"),
        ({"0.png": b"\x89PNG\r\n\x1a\n broken"}, "doc7 in s.tar: image member '0.png': undecodable image",
         "undecodable_image"),
        ({"0.png": None}, "doc7 in s.tar: the document names image member '0.png', which the sample lacks",
         "missing_image"),
    ]
    for change, message, kind in cases:
        bad = {k: v for k, v in {**raw, **change}.items() if v is not None}
        with pytest.raises(SampleError) as e:
            decode_document(bad, cfg, tok)
        assert str(e.value).startswith(message) and e.value.kind == kind, (str(e.value), e.value.kind)
    with pytest.raises(SampleError, match="image member '0.png': image too large: 32x32") as e:  # data.max_image_pixels
        decode_document(raw, data_cfg(max_image_pixels=1000), tok)
    assert e.value.kind == "image_too_large"

    assert is_document(raw)
    # img2dataset's shards carry a .json of metadata beside each single image: not documents
    assert not is_document({"__key__": "k", "jpg": b"", "txt": b"a", "json": b"{}"})
    assert not is_document({"__key__": "k", "jpg": b"", "txt": b"a"})
    assert not is_document({"__key__": "k", "txt": b"a", "json": b"{}"})  # ... even one whose image is missing


# ----------------------------------------------------------------------------------------------- model


def tiny_model(*overrides: str):
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides=["model.xattn.backend=sdpa", *overrides],
                      check_paths=False)
    torch.manual_seed(0)
    return attach_objectives(build_model(cfg.model, vocab_size=64))


@pytest.mark.parametrize("mode", ["previous", "all"])
def test_text_sees_only_the_images_its_mode_allows(tmp_path, doc_tokenizer, mode):
    """Perturb image 1 of a 3-image document and see which positions change."""
    tok = doc_tokenizer
    model = tiny_model(f"model.xattn.media_mode={mode}", "model.xattn.gate_init=1.0").eval()
    assert tok.vocab_size <= 64
    s = decode_document(three_image_doc(tmp_path), data_cfg(max_text_len=40), tok)
    batch = collate_samples([s], pad_id=tok.pad_id, image_token_id=tok.image_token_id, max_images=4, seq_len=41)
    length = len(s["input_ids"])
    p0, p1, p2 = [t for t, i in enumerate(s["input_ids"]) if i == tok.image_token_id]
    first_block: list[torch.Tensor] = []
    model.xattn_blocks()[0].register_forward_hook(lambda m, args, out: first_block.append(out[0, :length]))
    inputs = {k: batch[k] for k in ("pixel_values", "image_mask", "input_ids", "attention_mask", "media_index")}

    with torch.no_grad():
        before = model(**inputs).logits[0, :length]
        inputs["pixel_values"] = batch["pixel_values"].clone()
        inputs["pixel_values"][0, 1] = torch.flip(batch["pixel_values"][0, 1], dims=(1,))  # image 1 mirrored
        after = model(**inputs).logits[0, :length]

    def changed(a, b):
        return ((a - b).abs().amax(-1) > 1e-5).tolist()

    logits, xattn = changed(before, after), changed(*first_block)
    # no position before image 1's token changes: a token cannot see an image after it
    assert logits[:p1] == [False] * p1 and xattn[:p1] == [False] * p1
    if mode == "all":  # every position from image 1's token on sees it
        assert logits[p1:] == [True] * (length - p1)
        assert xattn[p1:] == [True] * (length - p1)
    else:
        # directly (the first cross-attention block, whose input is the embeddings alone) only image 1's span,
        # from its token up to (not including) image 2's, sees it
        assert xattn[p1:] == [True] * (p2 - p1) + [False] * (length - p2)
        assert logits[p1:p2] == [True] * (p2 - p1)
        # (positions after image 2's token still change through the LM's self-attention over image 1's span, as in
        # Flamingo: logits past p2 are not image-1-free, so they are not checked here)
    assert p0 < p1


def test_encode_media_encodes_only_real_slots(doc_tokenizer):
    model = tiny_model("model.train_vision=true").eval()
    n = model.resampler.num_latents
    g = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, 3, SIZE, SIZE, generator=g)  # padded slots hold noise: it must not matter
    image_mask = torch.tensor([[True, True, False], [True, False, False]])
    seen: list[int] = []
    model.vision.model.register_forward_hook(lambda m, args, kw, out: seen.append(kw["pixel_values"].shape[0]),
                                             with_kwargs=True)

    out = model.encode_media(pixel_values, image_mask)
    assert seen == [3] and out.shape == (2, 3 * n, model.vision.hidden_size)
    alone = model.encode_media(pixel_values[image_mask].unsqueeze(1))  # the real images, no mask: all encoded
    assert seen == [3, 3]
    per_slot = out.view(2, 3, n, -1)
    torch.testing.assert_close(per_slot[image_mask], alone.view(3, n, -1), rtol=1e-5, atol=1e-5)
    assert not per_slot[~image_mask].any()

    out.square().sum().backward()  # gradients reach a trainable tower and the resampler through the scatter
    params = {n: p for n, p in model.named_parameters() if n.startswith(("vision.", "resampler."))}
    used = {n for n, p in params.items() if p.grad is not None}
    # every parameter but CLIP's post_layernorm, which feeds only the pooled output that nothing reads
    assert set(params) - used == {"vision.model.post_layernorm.weight", "vision.model.post_layernorm.bias"}
    for prefix in ("vision.", "resampler."):
        assert sum(params[n].grad.abs().sum() for n in used if n.startswith(prefix)) > 0, prefix
    model.zero_grad(set_to_none=True)

    # no real image: the tower still runs once (ZeRO-3 gathers its parameters in a collective on every rank) and
    # every parameter gets a gradient, all zeros
    none = torch.zeros_like(image_mask)
    out = model.encode_media(pixel_values, none)
    assert seen[-1] == 1 and out.shape == (2, 3 * n, model.vision.hidden_size) and not out.any()
    out.sum().backward()
    assert {n for n, p in params.items() if p.grad is not None} == used
    assert not any(params[n].grad.any() for n in used)

    # the whole model on a batch without images: a finite loss
    ids = torch.tensor([doc_tokenizer.encode("a red circle .") + [doc_tokenizer.eos_id]] * 2)
    res = model(pixel_values=torch.zeros_like(pixel_values), image_mask=none, input_ids=ids,
                attention_mask=torch.ones_like(ids), media_index=torch.full_like(ids, -1), labels=ids)
    assert torch.isfinite(mean_loss(res))


def test_frozen_tower_runs_without_autograd():
    model = tiny_model()  # the tiny preset trains the resampler, not the tower
    assert model.vision_frozen
    grad_enabled: list[bool] = []
    model.vision.model.register_forward_hook(lambda m, args, out: grad_enabled.append(torch.is_grad_enabled()))
    pixel_values = torch.randn(1, 2, 3, SIZE, SIZE)
    out = model.encode_media(pixel_values, torch.tensor([[True, False]]))
    assert grad_enabled == [False] and out.requires_grad  # the resampler still trains
    out.sum().backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert all(p.grad is not None for p in model.resampler.parameters())


# ----------------------------------------------------------------------------------------------- the real loader


def test_train_loader_batches_documents(doc_shards, doc_tokenizer, tmp_path):
    from mmscale.continual.replay_buffer import ReservoirBuffer
    from mmscale.data.decode import decode_for_training
    from mmscale.data.pipeline import TrainLoader

    tok, cfg = doc_tokenizer, data_cfg()
    loader = TrainLoader(cfg, tok, micro_batch_size=4, rank=0, world_size=1, seed=0, shards=str(doc_shards),
                         keep_raw=True)
    model = tiny_model("model.xattn.gate_init=1.0", "model.train_vision=true")
    with loader:
        it = iter(loader)
        for _ in range(loader.steps_per_epoch):
            batch = next(it)
            assert batch["input_ids"].shape == (4, 1 + cfg.max_text_len)
            counts = (batch["input_ids"] == tok.image_token_id).sum(1)
            assert counts.tolist() == batch["image_mask"].sum(1).tolist() and (counts >= 1).all()
            assert batch["media_index"].amax(1).tolist() == (counts - 1).tolist()
            assert all(set(r) >= {"json", "0.png"} for r in batch["__raw__"])  # a replay buffer gets documents
    out = model(**{k: batch[k] for k in ("pixel_values", "image_mask", "input_ids", "attention_mask",
                                         "media_index", "labels")})
    mean_loss(out).backward()
    assert torch.isfinite(mean_loss(out)) and model.vision.model.embeddings.patch_embedding.weight.grad.abs().sum() > 0

    # a replay buffer stores a document's raw members and decodes it again, the same
    buffer = ReservoirBuffer(tmp_path / "replay", capacity=8)
    buffer.add(batch["__raw__"][0])
    [again] = buffer.sample(1)
    s = decode_for_training(again, cfg, tok)
    b = collate_samples([s], pad_id=tok.pad_id, image_token_id=tok.image_token_id, max_images=4,
                        seq_len=1 + cfg.max_text_len)
    for k in ("pixel_values", "image_mask", "input_ids", "media_index"):
        torch.testing.assert_close(b[k][0], batch[k][0], rtol=0, atol=0)
