"""Inference (mmscale/inference.py, launchers/generate.py): greedy / beam / sampling, the KV cache against the
uncached training forward, visual tokens computed once per image, loading, inputs, and the CLI end to end."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmscale import inference
from mmscale.inference import generate
from test_training import ROOT, RUN_TINY, launch, tiny_data  # noqa: F401  (tiny_data is a fixture)


def _cfg(*overrides: str):
    from mmscale.job.preflight import load_config

    return load_config(ROOT / "configs/tiny.yaml", list(overrides), check_paths=False)


def _build(tokenizer, *overrides: str):
    from mmscale.job.build import model_recipe

    cfg = _cfg("model.xattn.gate_init=1.0", *overrides)  # gates open: the images change the text
    torch.manual_seed(0)
    return model_recipe(cfg).build(tokenizer.vocab_size).eval(), tokenizer, cfg


@pytest.fixture(scope="module")
def tiny(sp_tokenizer):
    """(model, tokenizer, cfg): the tiny preset as built for training (random weights), gates open."""
    return _build(sp_tokenizer)


@pytest.fixture(scope="module")
def varied(sp_tokenizer):
    """The same with a wide LM initialisation: varied captions (logits ~10) rather than one token repeated."""
    return _build(sp_tokenizer, "model.lm.config.initializer_range=0.4")


def _images(b: int = 3, m: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, m, 3, 32, 32, generator=g)


class _EosIs:
    """The tokenizer with another eos id: the model's logits stay the same, only where decoding stops moves."""

    def __init__(self, tok, eos: int):
        self._tok, self.eos_id = tok, eos

    def __getattr__(self, name):
        return getattr(self._tok, name)


def _until(tokens: list[int], eos: int, max_new: int) -> tuple[list[int], str]:
    if eos in tokens:
        return tokens[: tokens.index(eos)], "eos"
    return tokens[:max_new], "length"


def test_greedy_is_deterministic_and_stops_at_eos_or_max_tokens(varied):
    model, tok, _ = varied
    pv = _images()
    a = generate(model, tok, pv, mode="greedy", max_new_tokens=6)
    b = generate(model, tok, pv, mode="greedy", max_new_tokens=6)
    assert [g.tokens for g in a] == [g.tokens for g in b] and [g.logprob for g in a] == [g.logprob for g in b]
    free = generate(model, _EosIs(tok, -1), pv, mode="greedy", max_new_tokens=10)  # an eos never generated
    for g in free:  # every row runs to the limit; never pad, bos or <image>
        assert g.stopped == "length" and len(g.tokens) == 10
        assert not {tok.pad_id, tok.bos_id, tok.image_token_id} & set(g.tokens)
    assert len({tuple(g.tokens) for g in free}) == 3  # the images make a difference
    # each row stops right before its first eos (the others run on): the real one, and row 0's third token
    for eos in (tok.eos_id, free[0].tokens[2]):
        stopped = generate(model, _EosIs(tok, eos), pv, mode="greedy", max_new_tokens=10)
        assert [(g.tokens, g.stopped) for g in stopped] == [_until(f.tokens, eos, 10) for f in free]
    assert stopped[0].stopped == "eos" and len(stopped[0].tokens) <= 2
    assert generate(model, tok, pv, max_new_tokens=0)[0].tokens == []


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_with_one_beam_is_greedy(varied, length_penalty):
    model, tok, _ = varied
    pv = _images(4, seed=1)
    greedy = generate(model, tok, pv, mode="greedy", max_new_tokens=8)
    beam = generate(model, tok, pv, mode="beam", num_beams=1, length_penalty=length_penalty, max_new_tokens=8)
    assert [(g.tokens, g.stopped) for g in beam] == [(g.tokens, g.stopped) for g in greedy]
    assert [g.logprob for g in beam] == pytest.approx([g.logprob for g in greedy], abs=1e-6)
    # and with an eos that cuts the sequences (row 0 at its 4th token)
    eos = greedy[0].tokens[3]
    g2 = generate(model, _EosIs(tok, eos), pv, mode="greedy", max_new_tokens=8)
    b2 = generate(model, _EosIs(tok, eos), pv, mode="beam", num_beams=1, length_penalty=length_penalty,
                  max_new_tokens=8)
    assert [(g.tokens, g.stopped) for g in b2] == [(g.tokens, g.stopped) for g in g2]


def test_beam_search_scores_and_finds_at_least_greedy_with_sum_scores(varied):
    model, tok, _ = varied
    pv = _images(2, seed=2)
    eos = generate(model, tok, pv, max_new_tokens=6)[0].tokens[2]  # a token the model does say: some beams end
    t = _EosIs(tok, eos)
    for lp in (0.0, 1.0):
        beams = generate(model, t, pv, mode="beam", num_beams=4, length_penalty=lp, max_new_tokens=6)
        greedy = generate(model, t, pv, mode="greedy", max_new_tokens=6)
        for b, g in zip(beams, greedy):
            n = len(b.tokens) + (b.stopped == "eos")
            assert b.score == pytest.approx(b.logprob / n ** lp)
            assert eos not in b.tokens and len(b.tokens) <= 6
            if lp == 0.0:  # greedy's path is among those beam search weighs: it cannot end up worse
                assert b.logprob >= g.logprob - 1e-9


def _soft_prompt(model, k: int = 3):
    from mmscale.callbacks.peft_methods import SoftPrompt

    torch.manual_seed(5)
    return SoftPrompt(k, model.lm.config.hidden_size, 0.5)


@pytest.mark.parametrize("case", ["greedy", "beam", "sample", "two_slots", "soft_prompt", "wide_init"])
def test_kv_cache_equals_uncached_forward(tiny, varied, case):
    """Tokens equal, and the logits each step decided from within 1e-5 (fp32) of the training forward's on the
    whole sequence (logits ~0.3 here). The wide initialisation's logits are ~10 and differ by ~2e-5: fp32 rounding,
    relative 2e-6, checked against 1e-5 of their scale."""
    model, tok, _ = varied if case == "wide_init" else tiny
    pv, mask = _images(3, seed=3), None
    opts = dict(mode="greedy", max_new_tokens=7)
    if case == "beam":
        opts.update(mode="beam", num_beams=3)
    elif case == "sample":
        opts.update(mode="sample", temperature=1.5, top_k=20, top_p=0.95, seed=11)
    elif case == "two_slots":  # two image slots, the second padding in one row
        pv, mask = _images(3, m=2, seed=4), torch.tensor([[True, False], [True, True], [True, True]])
    if case == "soft_prompt":
        model.prompt = _soft_prompt(model)
    try:
        cached_trace, full_trace = [], []
        cached = generate(model, tok, pv, mask, use_cache=True, trace=cached_trace, **opts)
        full = generate(model, tok, pv, mask, use_cache=False, trace=full_trace, **opts)
    finally:
        model.prompt = None
    assert [(g.tokens, g.stopped) for g in cached] == [(g.tokens, g.stopped) for g in full]
    assert len(cached_trace) == len(full_trace) == 7
    scale = max(1.0, max(float(f[f.isfinite()].abs().max()) for f in full_trace)) if case == "wide_init" else 1.0
    for step, (c, f) in enumerate(zip(cached_trace, full_trace)):
        assert c.dtype == torch.float32 and c.shape == f.shape
        assert torch.allclose(c, f, atol=1e-5 * scale, rtol=0), (step, (c - f).abs().max())


def test_visual_tokens_are_computed_once_per_image(tiny, monkeypatch):
    model, tok, _ = tiny
    calls = {"vision": [], "resampler": []}
    encode = model.vision.encode_images

    def counting_encode(pixel_values):
        calls["vision"].append(pixel_values.shape[0])
        return encode(pixel_values)

    monkeypatch.setattr(model.vision, "encode_images", counting_encode)
    hook = model.resampler.register_forward_hook(lambda m, args, out: calls["resampler"].append(args[0].shape[0]))
    try:
        for opts in (dict(mode="greedy"), dict(mode="beam", num_beams=3), dict(mode="sample", seed=1)):
            calls["vision"].clear(), calls["resampler"].clear()
            generate(model, tok, _images(3, m=2), max_new_tokens=6, **opts)
            assert calls == {"vision": [6], "resampler": [6]}, opts  # 3 samples x 2 slots, one call each
        calls["vision"].clear(), calls["resampler"].clear()
        generate(model, tok, _images(3), max_new_tokens=6, use_cache=False)  # the reference: once per step
        assert calls["vision"] == [3] * 6
    finally:
        hook.remove()


def test_sampling_is_seeded_and_independent_of_the_batch(varied):
    model, tok, _ = varied
    pv = _images(3, seed=6)
    opts = dict(mode="sample", temperature=2.0, max_new_tokens=8)
    a = generate(model, tok, pv, seed=1, **opts)
    assert [g.tokens for g in a] == [g.tokens for g in generate(model, tok, pv, seed=1, **opts)]
    assert [g.tokens for g in a] != [g.tokens for g in generate(model, tok, pv, seed=2, **opts)]
    # row 2 alone, with the seed it had in the batch: the same caption
    alone = generate(model, tok, pv[2:], sample_seeds=[inference.sample_seed(1, 2)], **opts)
    assert alone[0].tokens == a[2].tokens
    greedy = [g.tokens for g in generate(model, tok, pv, mode="greedy", max_new_tokens=8)]
    assert [g.tokens for g in generate(model, tok, pv, mode="sample", top_k=1, max_new_tokens=8)] == greedy
    assert [g.tokens for g in generate(model, tok, pv, mode="sample", top_p=1e-6, max_new_tokens=8)] == greedy
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tok, pv, mode="sample", temperature=0.0)


def test_top_k_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    inf = float("-inf")
    kept = lambda k, p: (inference._filter_top_k_top_p(logits, k, p) > inf).tolist()[0]  # noqa: E731
    assert kept(0, 1.0) == [True] * 4
    assert kept(2, 1.0) == [True, True, False, False]
    assert kept(0, 0.5) == [True, False, False, False]  # 0.5 reached by the first token
    assert kept(0, 0.7) == [True, True, False, False]
    assert kept(0, 0.9) == [True, True, True, False]
    assert kept(3, 0.7) == [True, True, False, False]


def test_classify_pools_over_the_training_text(sp_tokenizer):
    from mmscale.data.collate import collate_samples

    model, tok, _ = _build(sp_tokenizer, "model.num_classes=4")
    pv = _images(2, seed=7)
    caption = tok.encode("a red circle")

    def reference(ids):  # the batch training makes of a labelled sample with these ids
        batch = collate_samples([{"__key__": str(i), "images": [pv[i, 0]], "input_ids": ids} for i in range(2)],
                                pad_id=tok.pad_id, image_token_id=tok.image_token_id, max_images=1, seq_len=len(ids))
        with torch.no_grad():
            return torch.softmax(model(**{k: batch[k] for k in ("pixel_values", "image_mask", "input_ids",
                                                                 "attention_mask", "media_index")}).terms["classification"]["logits"], -1)

    probs = inference.classify(model, tok, pv)
    assert probs.shape == (2, 4) and torch.allclose(probs, reference([tok.image_token_id, tok.eos_id]), atol=1e-6)
    with_caption = inference.classify(model, tok, pv, captions=[caption, caption])
    assert torch.allclose(with_caption, reference([tok.image_token_id, *caption, tok.eos_id]), atol=1e-6)
    model.objectives["classification"].set_active_classes([0, 1]) # class-incremental: inactive classes get no probability
    assert (inference.classify(model, tok, pv)[:, 2:] == 0).all()


def _png(colour=(200, 10, 10), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _image_dir(root: Path) -> Path:
    d = root / "imgs"
    (d / "sub").mkdir(parents=True)
    (d / "red.png").write_bytes(_png())
    (d / "sub" / "blue.png").write_bytes(_png((10, 10, 200), (32, 32)))
    (d / "broken.png").write_bytes(b"not an image at all")
    (d / "cut.png").write_bytes(_png((0, 200, 0), (64, 64))[:60])  # truncated
    (d / "notes.txt").write_text("not an image file: ignored")
    return d


def test_directory_images_skip_unreadable_ones(tiny, tmp_path):
    model, tok, cfg = tiny
    d = _image_dir(tmp_path)
    items = list(inference.dir_items(d, cfg.data))
    assert [it.key for it in items] == ["broken.png", "cut.png", "red.png", "sub/blue.png"]
    # the training preprocessing: the same tensor image_to_tensor makes
    from mmscale.data.pipeline import image_to_tensor

    with Image.open(d / "red.png") as img:
        assert torch.equal(items[2].pixels, image_to_tensor(img, cfg.data.image_size, cfg.data.image_mean,
                                                            cfg.data.image_std))
    skipped = []
    records = list(inference.caption_items(model, tok, cfg, items, batch_size=1, on_skip=skipped.append,
                                           max_new_tokens=3))
    assert [r["key"] for r in records] == ["red.png", "sub/blue.png"]
    assert all(isinstance(r["caption"], str) and r["num_tokens"] == 3 for r in records)
    assert [s.key for s in skipped] == ["broken.png", "cut.png"] and all(s.error for s in skipped)
    # batching does not change greedy captions
    again = list(inference.caption_items(model, tok, cfg, items, batch_size=8, max_new_tokens=3))
    assert again == records


def test_shard_items_keep_references_and_report_bad_samples(tmp_path, shapes_shards):
    import tarfile

    cfg = _cfg()
    items = list(inference.shard_items(str(shapes_shards), cfg.data))
    assert len(items) == 64 and all(it.pixels is not None and it.extra["reference"] for it in items)
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in (("a.png", _png()), ("a.cls", b"2"), ("b.png", b"junk"), ("c.txt", b"no image")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    items = list(inference.shard_items(str(bad), cfg.data))
    assert [(it.key, it.pixels is not None) for it in items] == [("a", True), ("b", False), ("c", False)]
    assert items[0].extra == {"true_label": 2} and "undecodable" in items[1].error and "no image" in items[2].error


def test_load_model_refuses_what_is_neither_run_nor_export(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inference.load_model(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="neither a run directory"):
        inference.load_model(tmp_path / "junk")
    (tmp_path / "junk" / "config.yaml").write_text("output_dir: x\n")  # a run that saved no checkpoint yet
    with pytest.raises(ValueError, match="--model .* holds no complete checkpoint. Train the run until it saves one"):
        inference.load_model(tmp_path / "junk")
    # an exported directory goes to mmscale.export.load_exported (written elsewhere; stubbed here)
    import mmscale.export

    exp = tmp_path / "exported"
    exp.mkdir()
    (exp / "model.safetensors.index.json").write_text("{}")
    seen = []
    monkeypatch.setattr(mmscale.export, "load_exported", lambda d, **kw: seen.append(d) or (torch.nn.Linear(1, 1), "tok",
                                                                                       "cfg"), raising=False)
    model, tok, cfg = inference.load_model(exp)
    assert seen == [exp] and (tok, cfg) == ("tok", "cfg") and not model.training


def test_cli_bad_input(tmp_path, capsys, tiny, monkeypatch):
    (tmp_path / "empty").mkdir()
    assert inference.main(["--model", str(tmp_path), "--images", str(tmp_path / "empty")]) == 2
    assert "holds no image files" in capsys.readouterr().err
    d = _image_dir(tmp_path)
    assert inference.main(["--model", str(tmp_path / "empty"), "--images", str(d)]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    assert inference.main(["--model", str(tmp_path), "--shards", str(tmp_path / "empty")]) == 2
    assert "no .tar files" in capsys.readouterr().err
    model, tok, cfg = tiny  # no classification head
    monkeypatch.setattr(inference, "load_model", lambda path, device, task=None: (model, tok, cfg))
    assert inference.main(["--model", "x", "--images", str(d), "--classify"]) == 2
    assert "no classification head" in capsys.readouterr().err
    assert inference.main(["--model", "x", "--images", str(d), "--max-new-tokens", "2", "--mode", "beam",
                           "--beams", "2"]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line)["key"] for line in out.splitlines()] == ["red.png", "sub/blue.png"]
    assert "skipped broken.png" in err and "skipped cut.png" in err and "skipped 2" in err


# ------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):  # noqa: F811
    """A RUN directory: the tiny job, 1 process, 3 steps, with a 3-class head (trained on captions only)."""
    out = tmp_path_factory.mktemp("gen_run") / "run"
    launch(RUN_TINY, [str(out.parent / "run.json"), f"output_dir={out}", *tiny_data, "train.max_steps=3",
                      "train.checkpoint_every=0", "model.num_classes=3"], nprocs=1)
    shards = next(a.split("=", 1)[1] for a in tiny_data if a.startswith("data.train_shards="))
    return out, shards


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launchers/generate.py"), *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=300)


@pytest.mark.slow
def test_cli_end_to_end_on_a_trained_run(trained_run, tmp_path):
    run, shards = trained_run
    r = _cli("--model", str(run), "--shards", shards, "--limit", "5", "--batch-size", "2", "--mode", "beam",
             "--beams", "2", "--max-new-tokens", "8", "--classify")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in r.stdout.splitlines()]  # stdout holds the JSON lines only
    assert len(lines) == 5 and len({x["key"] for x in lines}) == 5
    for x in lines:
        assert isinstance(x["caption"], str) and x["reference"] and 0 <= x["label"] < 3
        assert len(x["probs"]) == 3 and sum(x["probs"]) == pytest.approx(1, abs=1e-5)
    # the same captions from a checkpoint directory, greedy = beam 1, in process
    from mmscale.training.checkpoint import latest_checkpoint

    model, tok, cfg = inference.load_model(latest_checkpoint(run / "checkpoints"))
    items = list(inference.shard_items(shards, cfg.data))[:2]
    recs = list(inference.caption_items(model, tok, cfg, items, mode="beam", num_beams=2, max_new_tokens=8,
                                        classify_input="image"))
    assert recs == lines[:2]

    d = _image_dir(tmp_path)
    r = _cli("--model", str(run), "--images", str(d), "--max-new-tokens", "6", "--mode", "sample", "--seed", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["key"] for x in lines] == ["red.png", "sub/blue.png"] and all("caption" in x for x in lines)
    assert "skipped broken.png" in r.stderr and "skipped cut.png" in r.stderr
