"""Inference: caption images (and classify them, with a classification head) with a trained model.

    python launchers/generate.py --model runs/demo --images photos/ [--mode greedy|beam|sample] [--classify]
    python launchers/generate.py --model exported/demo --shards 'data/val-{000000..000001}.tar' --mode beam --beams 4

prints one JSON line per image on stdout: {"key", "caption", "num_tokens", "stopped": "eos" | "length",
"logprob", ...}, plus "label" and "probs" with --classify, and "reference" / "true_label" when a shard sample has a
caption (.txt) / class label (.cls). Everything else (library logging, skipped images) goes to stderr.

`--model` is a RUN directory (its newest checkpoint under `checkpoints/` that verifies against its manifest, damaged
ones skipped with a warning; the model built from the config recorded in it), one checkpoint directory inside it
(which must verify), or an exported directory (`model.safetensors` or `model.safetensors.index.json`, loaded by
`mmscale.export.load_exported`).

Inputs get exactly the training preprocessing (`mmscale.data.decode.image_to_tensor` with the run's image size,
mean and std; `collate_samples` for the batch) and the prompt training puts before every caption: the single token
`<image>` (see `caption_to_ids`). Generation continues after it until eos or `max_new_tokens`.

Decoding (`generate`): greedy; beam search (scores normalised by length**length_penalty, default 1.0 = mean
log-probability per token, eos counted; 0 = plain sum); sampling (temperature, top-k, top-p), seeded per image
by (seed, the image's index in the input), so a sample does not depend on the batch it fell into (up to float
rounding). pad, bos and `<image>` are never generated (training never has them as caption targets).

The decoder's KV cache (`KVCacheStepper`): the visual tokens (vision tower + resampler) are computed once per
image and, from them, each gated cross-attention block's keys and values once per batch (`media_kv`); the Hugging
Face LM keeps a `DynamicCache` of its self-attention keys and values. Each step feeds only the new token(s) and
conditions the cross-attention wrappers on the key ranges of those positions alone: a text token's cross-attention
depends on its own hidden state and the visual tokens only, never on other text positions, so nothing else of it
needs caching. The uncached reference (`FullForwardStepper`, `use_cache=False`) runs `MultimodalModel.forward`,
the training forward, on the whole sequence at every step; both give the same tokens and logits.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

MODES = ("greedy", "beam", "sample")
DIR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
"""Files `--images DIR` reads (any PIL can open; shards are read with the training pipeline's IMAGE_EXTS)."""


# ============================================================================================= loading


def is_export_dir(path: Path) -> bool:
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()


def load_model(path: str | Path, device: str | torch.device = "cpu", task: str | None = None) -> tuple[Any, Any, Any]:
    """(model, tokenizer, cfg) of a RUN directory (its newest checkpoint that verifies against its manifest), a
    checkpoint directory inside one (`RUN/checkpoints/step_N`, which must verify), or an exported directory; the
    model in eval mode on `device`. A run's model is built from the config recorded with those weights
    (mmscale.job.runs.open_run); a damaged checkpoint is skipped with a warning, or an error when named."""
    from mmscale.training.verified import is_checkpoint_dir, is_run_dir

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--model {str(path)!r} does not exist")
    if is_export_dir(path):
        from mmscale.export import load_exported  # lazily: written beside this module

        model, tokenizer, cfg = load_exported(path, task=task)  # (a per-task export: that task's adapter)
    elif is_run_dir(path) or is_checkpoint_dir(path):
        from mmscale.job.runs import load_run

        cfg, model, tokenizer = load_run(path, what="--model")
    else:
        raise ValueError(
            f"--model {str(path)!r} is neither a run directory (config.yaml and checkpoints/), a checkpoint "
            f"directory inside one, nor an exported model (model.safetensors or model.safetensors.index.json)")
    return model.to(device).eval(), tokenizer, cfg


# ============================================================================================= steppers


def _lm_call_names(lm: torch.nn.Module) -> tuple[str, bool]:
    """(the LM forward's name for the KV cache: `cache` in transformers >= 5.x, `past_key_values` before;
    whether it takes `logits_to_keep`). A peft wrapper passes keyword arguments through to its base model."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    params = inspect.signature(type(base).forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _media_index(seen_before: torch.Tensor, ids: torch.Tensor, image_token_id: int,
                 num_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`media_index_from_ids` continued over new tokens: (media index (B, T), images seen after them (B,))."""
    seen = seen_before.unsqueeze(1) + torch.cumsum(ids == image_token_id, dim=1)
    return torch.minimum(seen - 1, (num_images - 1).unsqueeze(1)), seen[:, -1]


class KVCacheStepper:
    """Feeds new tokens to the LM with a KV cache; `__call__(ids (B, T)) -> (B, V)` fp32 logits of the last one.

    Built on a batch (`pixel_values`, `image_mask`): encodes the images once (vision tower + resampler), repeats
    the visual tokens `expand` times (beams: rows b*expand ... b*expand+expand-1 are image b's), and computes each
    cross-attention block's keys and values from them once. `reorder(index)` keeps the rows `index` (beam search;
    rows must stay with their image).
    """

    def __init__(self, model: Any, pixel_values: torch.Tensor, image_mask: torch.Tensor, image_token_id: int,
                 expand: int = 1):
        from transformers import DynamicCache

        from mmscale.kernels import build_media_key_range

        self.model, self.lm, self.image_token_id = model, model.lm, image_token_id
        self._key_range = build_media_key_range
        media = model.encode_media(pixel_values)  # (B, M*n, Dv): once per image
        dtype = self.lm.get_input_embeddings().weight.dtype
        # each cross-attention block's keys and values: once per image too, then one copy per beam
        self.layers = [(layer, tuple(t.repeat_interleave(expand, 0) for t in layer.xattn.media_kv(media, dtype)))
                       for layer in model.xattn_layers()]
        image_mask = image_mask.repeat_interleave(expand, 0)
        self.n = model.resampler.num_latents
        self.num_images = image_mask.sum(dim=1)
        self.kv_lens = self.num_images * self.n
        try:
            self.cache = DynamicCache(config=self.lm.config)
        except TypeError:  # transformers 4.x
            self.cache = DynamicCache()
        self.cache_name, self.keep_logits = _lm_call_names(self.lm)
        self.length = 0  # positions in the cache (soft prompt included)
        self.seen = torch.zeros(image_mask.shape[0], dtype=torch.long, device=media.device)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        B = ids.shape[0]
        media_index, self.seen = _media_index(self.seen, ids, self.image_token_id, self.num_images)
        inputs: dict[str, torch.Tensor] = {"input_ids": ids}
        if self.length == 0 and self.model.prompt is not None:  # prompt tuning: soft tokens first, seeing no image
            prefix = self.model.prompt(B)
            embeds = self.lm.get_input_embeddings()(ids)
            inputs = {"inputs_embeds": torch.cat([prefix.to(embeds.dtype), embeds], dim=1)}
            media_index = torch.cat([media_index.new_full(prefix.shape[:2], -1), media_index], dim=1)
        T = media_index.shape[1]
        key_range = self._key_range(media_index, self.n, self.model.media_mode)  # the new positions only
        for layer, kv in self.layers:
            layer.condition(kv, key_range, self.kv_lens)
        positions = torch.arange(self.length, self.length + T, device=ids.device).unsqueeze(0).expand(B, T)
        self.length += T
        extra = {"logits_to_keep": 1} if self.keep_logits else {}
        out = self.lm(**inputs, attention_mask=ids.new_ones(B, self.length), position_ids=positions,
                      use_cache=True, **{self.cache_name: self.cache}, **extra)
        return out.logits[:, -1].float()

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder_cache(index)
        self.seen = self.seen[index]

    def close(self) -> None:
        for layer, _ in self.layers:
            layer.condition(None)


class FullForwardStepper:
    """The uncached reference: `MultimodalModel.forward` (images included) on the whole sequence at each call."""

    def __init__(self, model: Any, pixel_values: torch.Tensor, image_mask: torch.Tensor, image_token_id: int,
                 expand: int = 1):
        self.model, self.image_token_id = model, image_token_id
        self.pixel_values = pixel_values.repeat_interleave(expand, 0)
        self.image_mask = image_mask.repeat_interleave(expand, 0)
        self.ids: torch.Tensor | None = None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        from mmscale.data.collate import media_index_from_ids

        self.ids = ids if self.ids is None else torch.cat([self.ids, ids], dim=1)
        media_index = media_index_from_ids(self.ids, self.image_token_id, self.image_mask.sum(dim=1))
        out = self.model(pixel_values=self.pixel_values, image_mask=self.image_mask, input_ids=self.ids,
                         attention_mask=torch.ones_like(self.ids), media_index=media_index)
        return out.logits[:, -1].float()

    def reorder(self, index: torch.Tensor) -> None:
        self.ids = self.ids[index]

    def close(self) -> None:
        for layer in self.model.xattn_layers():
            layer.condition(None)


# ============================================================================================= decoding


@dataclass
class Generation:
    tokens: list[int]
    """Generated ids after the prompt, eos excluded."""
    stopped: str
    """"eos" or "length" (max_new_tokens reached)."""
    logprob: float
    """Sum of the model's log-probabilities of the generated tokens (eos included), pad/bos/<image> excluded
    from the distribution, temperature 1."""
    score: float | None = None
    """Beam search: logprob / length**length_penalty, length = generated tokens with eos."""


def _banned_ids(tokenizer: Any, vocab: int) -> torch.Tensor:
    ids = sorted({tokenizer.pad_id, tokenizer.bos_id, tokenizer.image_token_id} - {tokenizer.eos_id})
    return torch.tensor([i for i in ids if 0 <= i < vocab], dtype=torch.long)


def _logprobs(logits: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    logits = logits.clone()
    logits[:, banned.to(logits.device)] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits outside the top-k / the smallest set whose probability reaches top_p set to -inf (at least one
    token kept)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p  # the mass before this token already reaches top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of the image at `index` of the input, for run seed `seed`."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _decode_one_path(step: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor,
                     choose: Callable[[torch.Tensor], torch.Tensor], max_new_tokens: int, eos: int, pad: int,
                     banned: torch.Tensor, trace: list[torch.Tensor] | None) -> list[Generation]:
    """Greedy and sampling: one path per row; a finished row is fed pad (and ignored) until all are done."""
    B = prompt.shape[0]
    tokens: list[list[int]] = [[] for _ in range(B)]
    logprob = torch.zeros(B, dtype=torch.float64)
    done = torch.zeros(B, dtype=torch.bool)
    if max_new_tokens <= 0:
        return [Generation([], "length", 0.0) for _ in range(B)]
    logits = step(prompt)
    for t in range(max_new_tokens):
        if trace is not None:
            trace.append(logits.detach().cpu())
        lp = _logprobs(logits, banned)
        nxt = choose(lp).cpu()
        chosen = lp.gather(1, nxt.to(lp.device).unsqueeze(1)).squeeze(1).double().cpu()
        for b in range(B):
            if not done[b]:
                logprob[b] += chosen[b]
                if int(nxt[b]) != eos:
                    tokens[b].append(int(nxt[b]))
        done |= nxt == eos
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        logits = step(nxt.unsqueeze(1).to(prompt.device))
    return [Generation(tokens[b], "eos" if done[b] else "length", float(logprob[b])) for b in range(B)]


def _beam_search(step: Callable[[torch.Tensor], torch.Tensor], reorder: Callable[[torch.Tensor], None],
                 prompt: torch.Tensor, B: int, K: int, max_new_tokens: int, eos: int, pad: int,
                 banned: torch.Tensor, length_penalty: float, trace: list[torch.Tensor] | None) -> list[Generation]:
    """Beam search over B images x K beams (prompt rows b*K+j). Each step keeps the 2K best continuations of each
    image: one ending in eos among its top K becomes a finished hypothesis (score = sum of log-probs /
    length**length_penalty, eos counted in the length); the best K others continue. An image is done when it has
    K finished hypotheses and none of its running beams, scored at its current length, beats the worst of them
    (the rule of Hugging Face's `early_stopping=False`); at max_new_tokens the running beams are finished too.
    With K = 1 this is greedy decoding."""
    if max_new_tokens <= 0:
        return [Generation([], "length", 0.0, 0.0) for _ in range(B)]
    norm = (lambda s, n: s / (n ** length_penalty))
    beam_scores = torch.full((B, K), float("-inf"), dtype=torch.float64)
    beam_scores[:, 0] = 0.0  # the K beams start identical: expand only the first
    beam_tokens: list[list[int]] = [[] for _ in range(B * K)]
    finished: list[list[tuple[float, float, list[int], str]]] = [[] for _ in range(B)]  # (score, logprob, ids)
    done = [False] * B
    logits = step(prompt)
    for t in range(max_new_tokens):
        if trace is not None:
            trace.append(logits.detach().cpu())
        lp = _logprobs(logits, banned).double().cpu()  # (B*K, V)
        V = lp.shape[1]
        cand = (beam_scores.view(-1, 1) + lp).view(B, K * V)
        top_scores, top_idx = torch.topk(cand, min(2 * K, K * V), dim=1)
        src = torch.arange(B * K)
        nxt = torch.full((B * K,), pad, dtype=torch.long)
        new_scores = beam_scores.clone()
        for b in range(B):
            if done[b]:
                continue
            chosen: list[tuple[float, int, int]] = []
            for rank, (s, idx) in enumerate(zip(top_scores[b].tolist(), top_idx[b].tolist())):
                if s == float("-inf"):
                    break
                j, tok = divmod(idx, V)
                if tok == eos:
                    if rank < K:
                        finished[b].append((norm(s, t + 1), s, list(beam_tokens[b * K + j]), "eos"))
                    continue
                chosen.append((s, j, tok))
                if len(chosen) == K:
                    break
            for slot in range(K):
                if slot < len(chosen):
                    s, j, tok = chosen[slot]
                    src[b * K + slot], nxt[b * K + slot], new_scores[b, slot] = b * K + j, tok, s
                else:  # fewer live continuations than beams
                    src[b * K + slot], new_scores[b, slot] = b * K, float("-inf")
            finished[b].sort(key=lambda h: -h[0])
            del finished[b][K:]
            if len(finished[b]) >= K:
                best_running = max((s for s, _, _ in chosen), default=float("-inf"))
                if best_running == float("-inf") or finished[b][-1][0] >= norm(best_running, t + 1):
                    done[b] = True
        beam_tokens = [beam_tokens[int(src[r])] + ([int(nxt[r])] if new_scores.view(-1)[r] > float("-inf")
                                                   else []) for r in range(B * K)]
        beam_scores = new_scores
        if all(done) or t == max_new_tokens - 1:
            break
        reorder(src.to(prompt.device))
        logits = step(nxt.unsqueeze(1).to(prompt.device))
    out = []
    for b in range(B):
        hyps = list(finished[b])
        if not done[b]:  # max_new_tokens reached: the running beams are hypotheses too
            for j in range(K):
                s = float(beam_scores[b, j])
                if s > float("-inf"):
                    hyps.append((norm(s, max(len(beam_tokens[b * K + j]), 1)), s, beam_tokens[b * K + j], "length"))
        best = max(hyps, key=lambda h: h[0])
        out.append(Generation(best[2], best[3], best[1], best[0]))
    return out


@torch.no_grad()
def generate(model: Any, tokenizer: Any, pixel_values: torch.Tensor, image_mask: torch.Tensor | None = None, *,
             mode: str = "greedy", max_new_tokens: int = 32, num_beams: int = 4, length_penalty: float = 1.0,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             sample_seeds: Sequence[int] | None = None, use_cache: bool = True,
             trace: list[torch.Tensor] | None = None) -> list[Generation]:
    """Captions of a batch of images: pixel_values (B, M, 3, H, W) as `collate_samples` makes them (image_mask
    (B, M); default all slots real), prompt `<image>`.

    mode "greedy"; "beam" (`num_beams`, `length_penalty`: 1.0 = mean log-prob per token, 0 = sum); "sample"
    (`temperature`, `top_k` (0 = off), `top_p` (1.0 = off); row b draws from a generator seeded with
    `sample_seeds[b]`, default `sample_seed(seed, b)`). `use_cache=False` runs the uncached reference.
    `trace`, if given, receives the (rows, V) fp32 logits each step decided from."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "sample" and not (temperature > 0):
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature} (use mode='greedy')")
    if not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    if mode == "beam" and num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    model.eval()
    device = next(model.parameters()).device
    pixel_values = pixel_values.to(device)
    B = pixel_values.shape[0]
    image_mask = (torch.ones(pixel_values.shape[:2], dtype=torch.bool) if image_mask is None else image_mask).to(device)
    K = num_beams if mode == "beam" else 1
    Stepper = KVCacheStepper if use_cache else FullForwardStepper
    stepper = Stepper(model, pixel_values, image_mask, tokenizer.image_token_id, expand=K)
    prompt = torch.full((B * K, 1), tokenizer.image_token_id, dtype=torch.long, device=device)
    eos, pad = tokenizer.eos_id, tokenizer.pad_id
    vocab = model.lm.get_input_embeddings().num_embeddings
    banned = _banned_ids(tokenizer, vocab)
    try:
        if mode == "beam":
            return _beam_search(stepper, stepper.reorder, prompt, B, K, max_new_tokens, eos, pad, banned,
                                length_penalty, trace)
        if mode == "greedy":
            choose = lambda lp: lp.argmax(dim=-1)  # noqa: E731
        else:
            seeds = list(sample_seeds) if sample_seeds is not None else [sample_seed(seed, b) for b in range(B)]
            if len(seeds) != B:
                raise ValueError(f"{len(seeds)} sample_seeds for {B} images")
            gens = [torch.Generator().manual_seed(s) for s in seeds]

            def choose(lp: torch.Tensor) -> torch.Tensor:
                probs = torch.softmax(_filter_top_k_top_p(lp / temperature, top_k, top_p), dim=-1).cpu()
                return torch.cat([torch.multinomial(probs[b], 1, generator=gens[b]) for b in range(B)])

        return _decode_one_path(stepper, prompt, choose, max_new_tokens, eos, pad, banned, trace)
    finally:
        stepper.close()


@torch.no_grad()
def classify(model: Any, tokenizer: Any, pixel_values: torch.Tensor, image_mask: torch.Tensor | None = None,
             captions: Sequence[Sequence[int]] | None = None, max_text_len: int = 16) -> torch.Tensor:
    """(B, num_classes) class probabilities (inactive classes 0). The text is `<image>` eos, what a labelled sample
    without a caption is in training, or, with `captions` (token ids), `<image>` caption eos as `caption_to_ids`
    makes it."""
    from mmscale.data.collate import collate_samples

    if "classification" not in model.objectives:
        raise ValueError("the model has no classification head (no classification objective)")
    device = next(model.parameters()).device
    B = pixel_values.shape[0]
    image_mask = torch.ones(pixel_values.shape[:2], dtype=torch.bool) if image_mask is None else image_mask
    texts = [[tokenizer.image_token_id] + list(c)[: max_text_len - 1] + [tokenizer.eos_id]
             for c in (captions if captions is not None else [[]] * B)]
    samples = [{"__key__": str(b), "images": [pixel_values[b, 0]], "input_ids": texts[b]} for b in range(B)]
    batch = collate_samples(samples, pad_id=tokenizer.pad_id, image_token_id=tokenizer.image_token_id,
                            max_images=pixel_values.shape[1], seq_len=max(len(t) for t in texts))
    out = model(pixel_values=pixel_values.to(device), image_mask=image_mask.to(device),
                **{k: batch[k].to(device) for k in ("input_ids", "attention_mask", "media_index")})
    return torch.softmax(out.terms["classification"]["logits"].float(), dim=-1).cpu()


# ============================================================================================= inputs


@dataclass
class ImageItem:
    key: str
    pixels: torch.Tensor | None = None
    """(3, S, S) as training preprocesses it; None when the image could not be used (`error` says why)."""
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Shard samples: "reference" (the .txt caption), "true_label" (the .cls label), when present."""


def _pixels(data: bytes, data_cfg: Any) -> torch.Tensor:
    """As training decodes an image: any mode to RGB, EXIF orientation, the pixel limit (mmscale.data.decode)."""
    from mmscale.data.decode import image_to_tensor, load_image

    img = load_image(data, data_cfg.max_image_pixels)  # SampleError (a ValueError) when unusable
    return image_to_tensor(img, data_cfg.image_size, data_cfg.image_mean, data_cfg.image_std)


def shard_items(spec: str, data_cfg: Any) -> Iterator[ImageItem]:
    """The samples of the shards `spec` (any form `resolve_shards` takes), in order, read by the training
    pipeline's tar reader. A sample needs only an image: the caption and label are kept as references when
    present. Unusable samples and broken tars come as items with `error`."""
    from mmscale.data.reading import SkipCounter, tar_samples
    from mmscale.data.shards import IMAGE_EXTS, resolve_shards

    counter = SkipCounter()
    for raw in tar_samples(resolve_shards(spec), counter):
        key = raw.get("__key__", "?")
        extra: dict[str, Any] = {}
        if raw.get("txt") is not None:
            extra["reference"] = raw["txt"].decode("utf-8", errors="replace").strip()
        if raw.get("cls") is not None:
            with contextlib.suppress(ValueError):
                extra["true_label"] = int(raw["cls"].decode("utf-8", errors="replace").strip())
        data = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
        if data is None:
            yield ImageItem(key, error=f"no image member (one of {', '.join(IMAGE_EXTS)}) in {raw.get('__url__')}")
            continue
        try:
            yield ImageItem(key, _pixels(data, data_cfg), extra=extra)
        except Exception as e:  # PIL raises many types
            yield ImageItem(key, error=f"undecodable image in {raw.get('__url__')}: {e!r}"[:300])
        for reason in counter.take()[1]:
            yield ImageItem("?", error=reason)
    for reason in counter.take()[1]:  # broken tars (after their last good sample)
        yield ImageItem("?", error=reason)


def image_files(directory: str | Path) -> list[Path]:
    """Image files under `directory` (recursively, sorted); raises if it is not a folder or holds none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--images {str(directory)!r} is not a directory")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in DIR_IMAGE_EXTS)
    if not files:
        raise ValueError(f"--images {str(directory)!r} holds no image files ({', '.join(DIR_IMAGE_EXTS)})")
    return files


def dir_items(directory: str | Path, data_cfg: Any) -> Iterator[ImageItem]:
    """Images of a folder, keyed by their path relative to it (the file name for files directly in it)."""
    directory = Path(directory)
    for path in image_files(directory):
        key = path.relative_to(directory).as_posix()
        try:
            yield ImageItem(key, _pixels(path.read_bytes(), data_cfg))
        except Exception as e:
            yield ImageItem(key, error=f"unreadable image: {e!r}"[:300])


# ============================================================================================= captioning


def caption_items(model: Any, tokenizer: Any, cfg: Any, items: Iterable[ImageItem], *, batch_size: int = 8,
                  classify_input: str | None = None, on_skip: Callable[[ImageItem], None] | None = None,
                  limit: int | None = None, **decode: Any) -> Iterator[dict[str, Any]]:
    """One record per usable item, in input order, batched `batch_size` at a time: {"key", "caption",
    "num_tokens", "stopped", "logprob", (beam) "score", ...}; with `classify_input` ("image" or "caption")
    also "label" and "probs". Unusable items go to `on_skip`. `decode`: `generate`'s options; sampling seeds
    follow each image's index among the usable ones (`sample_seed(seed, index)`)."""
    M = cfg.data.max_images
    index = 0
    batch: list[ImageItem] = []

    def run(batch: list[ImageItem], first: int) -> Iterator[dict[str, Any]]:
        from mmscale.data.collate import collate_samples

        samples = [{"__key__": it.key, "images": [it.pixels], "input_ids": [tokenizer.image_token_id]}
                   for it in batch]
        collated = collate_samples(samples, pad_id=tokenizer.pad_id, image_token_id=tokenizer.image_token_id,
                                   max_images=M, seq_len=1)
        pv, mask = collated["pixel_values"], collated["image_mask"]
        seeds = [sample_seed(decode.get("seed", 0), first + i) for i in range(len(batch))]
        gens = generate(model, tokenizer, pv, mask, sample_seeds=seeds, **decode)
        probs = None
        if classify_input is not None:
            probs = classify(model, tokenizer, pv, mask, [g.tokens for g in gens] if classify_input == "caption"
                             else None, cfg.data.max_text_len)
        for i, (it, g) in enumerate(zip(batch, gens)):
            rec = {"key": it.key, "caption": tokenizer.decode(g.tokens).strip(), "num_tokens": len(g.tokens),
                   "stopped": g.stopped, "logprob": round(g.logprob, 6)}
            if g.score is not None:
                rec["score"] = round(g.score, 6)
            if probs is not None:
                rec["label"] = int(probs[i].argmax())
                rec["probs"] = [round(float(p), 6) for p in probs[i]]
            yield {**rec, **it.extra}

    for it in items:
        if it.pixels is None:
            if on_skip is not None:
                on_skip(it)
            continue
        if limit is not None and index + len(batch) >= limit:
            break
        batch.append(it)
        if len(batch) == batch_size:
            yield from run(batch, index)
            index += len(batch)
            batch = []
    if batch:
        yield from run(batch, index)


def _max_new_tokens(model: Any, requested: int) -> int:
    """`requested`, capped so that the prompt (soft tokens too) and the caption fit the LM's positions."""
    limit = getattr(model.lm.config, "max_position_embeddings", None)
    with torch.no_grad():
        prefix = model.prompt(1).shape[1] if model.prompt is not None else 0
    if limit is not None and 1 + prefix + requested > limit:
        capped = max(0, limit - 1 - prefix)
        log.warning("--max-new-tokens %d: capped at %d (the LM has %d positions)", requested, capped, limit)
        return capped
    return requested


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="generate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="run directory, checkpoint directory or exported directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="shard spec: brace pattern, glob, folder of .tar or list file")
    src.add_argument("--images", help="folder of image files (searched recursively)")
    p.add_argument("--mode", choices=MODES, default="greedy")
    p.add_argument("--beams", type=int, default=4, help="beam width (--mode beam)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score = sum log-prob / length**this: 1 = per-token mean (default), 0 = plain sum")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (each image's generator: seed and its index)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--task", default=None, help="a task_adapters model: the task whose module runs (its name)")
    p.add_argument("--classify", action="store_true", help="also classify (the model needs a classification head)")
    p.add_argument("--classify-input", choices=("image", "caption"), default="image",
                   help="text the head pools over: `<image> eos` (default, a caption-less labelled training "
                        "sample) or `<image> CAPTION eos` with the generated caption")
    p.add_argument("--limit", type=int, default=None, help="caption at most this many images")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (reference)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    args = p.parse_args(argv)
    if args.beams < 1 or args.batch_size < 1 or args.max_new_tokens < 0:
        p.error("--beams and --batch-size must be >= 1, --max-new-tokens >= 0")
    if args.mode == "sample" and args.temperature <= 0:
        p.error("--temperature must be > 0 with --mode sample")
    if args.top_k < 0 or not 0 < args.top_p <= 1:
        p.error("--top-k must be >= 0 and --top-p in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 = every usable image captioned (skipped ones reported on stderr), 1 = none could be, 2 = bad
    arguments or model."""
    args = parse_args(argv)
    records = sys.stdout  # the JSON lines; everything else printed meanwhile (DeepSpeed prints) goes to stderr
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):
        try:  # what can be wrong with the arguments is reported before any image is read
            if args.images:
                image_files(args.images)  # an empty or missing folder, before the model loads
            else:
                from mmscale.data.shards import resolve_shards

                resolve_shards(args.shards)
            model, tokenizer, cfg = load_model(args.model, args.device, args.task)
            from mmscale.callbacks.task_adapters import choose_task

            choose_task(model, args.task, "--task")
            if args.classify and "classification" not in model.objectives:
                raise ValueError(f"--classify: the model in {args.model} has no classification head (it was "
                                 f"trained without the classification objective)")
        except (OSError, ValueError, RuntimeError) as e:  # ShardSpecError is a ValueError
            print(f"error: {e}", file=sys.stderr)
            return 2
        items = shard_items(args.shards, cfg.data) if args.shards else dir_items(args.images, cfg.data)
        skipped: list[ImageItem] = []

        def on_skip(it: ImageItem) -> None:
            skipped.append(it)
            print(f"skipped {it.key}: {it.error}", file=sys.stderr, flush=True)

        done = 0
        for rec in caption_items(
                model, tokenizer, cfg, items, batch_size=args.batch_size, limit=args.limit,
                classify_input=args.classify_input if args.classify else None, on_skip=on_skip,
                mode=args.mode, max_new_tokens=_max_new_tokens(model, args.max_new_tokens), num_beams=args.beams,
                length_penalty=args.length_penalty, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache):
            print(json.dumps(rec), file=records, flush=True)
            done += 1
    print(f"captioned {done} image(s), skipped {len(skipped)}", file=sys.stderr)
    return 0 if done > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
