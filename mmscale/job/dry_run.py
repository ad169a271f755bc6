"""Size a job without training: parameter counts and a per-rank memory estimate, model built on the meta device.

The estimate follows the ZeRO paper's accounting (Rajbhandari et al. 2020): with Psi parameters, of which Psi_t
trainable, world size N and 2-byte (bf16) or 4-byte (fp32) weights,

    weights      = Psi * w            (/ N at stage 3)
    gradients    = Psi_t * w          (/ N at stage >= 2)
    optimizer    = Psi_t * (8 + m)    (/ N at stage >= 1)   Adam moments in fp32, + fp32 master copy (m=4) with bf16
    logits       = micro_batch * seq * vocab * (w + 4)   (and their fp32 copy for the loss)
    buckets      = (prefetch bucket at stage 3 + reduce bucket) * w
    activations  ~ micro_batch * seq * hidden * layers * 34 bytes (Korthikanti et al. 2022, no recompute), or
                   micro_batch * seq * hidden * layers * 2 * w with activation checkpointing; an order of magnitude only.

Offloaded optimizer state or parameters are counted in host memory instead. Activations are shown both ways
(with and without activation checkpointing); the total counts the configured one.

Step time (`estimate_step`), per GPU and optimizer step, from two stated machine figures (`gpu_tflops`: the
achieved, not peak, training throughput; `link_gbytes_per_s`: the bandwidth each GPU's collectives see, i.e. the
inter-node link once a job spans nodes):

    compute  FLOPs = 2 * Psi_c * tokens_c            forward, per component c (vision: images x patches tokens,
                   + 2 * Psi_c * tokens_c            resampler: images x (patches + latents), LM and cross-attention:
                   + 2 * Psi_t,c * tokens_c          text tokens); input gradients on the backward path (a frozen
                   (+ 2 * Psi_lm * tokens with       tower runs without autograd: forward only), weight gradients of
                   activation checkpointing)         what trains (Kaplan et al. 2020's 6 * N * D; attention scores left
                                                     out: short sequences)
    ZeRO-3   bytes = grad_accum * (N-1)/N * w *      parameters all-gathered for each micro batch's forward and again
                     (Psi + Psi_bwd + Psi_t)         for its backward, gradients reduce-scattered each micro batch
                                                     (Rajbhandari et al. 2020: 3 * Psi vs data parallelism's 2 * Psi)
    ZeRO 0-2 bytes = 2 * (N-1)/N * w * Psi_t         one all-reduce of the trainable gradients per step

    step time = compute / gpu_tflops + bytes / link_gbytes_per_s   (no overlap; max of the two with full overlap)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mmscale.config import JobConfig
from mmscale.media import attach_media, media_problems
from mmscale.model import build_model

log = logging.getLogger("mmscale.job")

GiB = 1024**3


def quantized_bytes_per_weight(double_quant: bool, block: int = 64) -> float:
    """Bytes per weight of bitsandbytes' 4-bit storage: half a byte, plus an absmax per block of 64 (fp32, or with
    double quantization an 8-bit one with an fp32 per 256 blocks)."""
    return 0.5 + (1 / block + 4 / (block * 256) if double_quant else 4 / block)


def estimate_memory(cfg: JobConfig, counts: dict[str, Any], world_size: int, hidden: int, layers: int,
                    seq_len: int, vocab_size: int, quantized: int = 0, quant_bytes: float = 0.5) -> dict[str, float]:
    """`quantized` of the (frozen) weights are held in 4 bits at `quant_bytes` each (qlora)."""
    t, z = cfg.train, cfg.deepspeed
    w = 2 if t.precision == "bf16" else 4
    total, trainable = counts["total"], counts["trainable"]
    stage = z.zero_stage
    weights = ((total - quantized) * w + quantized * quant_bytes) / (world_size if stage == 3 else 1)
    grads = trainable * w / (world_size if stage >= 2 else 1)
    optim = trainable * (8 + (4 if w == 2 else 0)) / (world_size if stage >= 1 else 1)
    acts_plain = t.micro_batch_size * seq_len * hidden * layers * 34
    acts_ckpt = t.micro_batch_size * seq_len * hidden * layers * 2 * w
    acts = acts_ckpt if cfg.model.activation_checkpointing else acts_plain
    # logits and their fp32 copy for the loss; ZeRO-3's gather/prefetch and reduce buckets
    logits = t.micro_batch_size * seq_len * vocab_size * (w + 4)
    buckets = (z.stage3_prefetch_bucket_size if stage == 3 else 0) * w + z.reduce_bucket_size * w
    device = {"weights": weights, "gradients": grads, "optimizer": optim, "activations": acts, "logits": logits,
              "zero_buckets": buckets}
    host = {}
    if z.offload_optimizer != "none":
        host["optimizer"] = device.pop("optimizer")
    if z.offload_params != "none":
        host["weights"] = device.pop("weights")
    out = {f"device_{k}_gib": v / GiB for k, v in device.items()}
    out["device_total_gib"] = sum(device.values()) / GiB
    # both ways, whichever the config chose (the total counts the chosen one)
    out["activations_without_checkpointing_gib"] = acts_plain / GiB
    out["activations_with_checkpointing_gib"] = acts_ckpt / GiB
    out.update({f"host_{k}_gib": v / GiB for k, v in host.items()})
    return out


GPU_TFLOPS = 400.0
"""Default achieved training throughput per GPU, TFLOP/s: about 40% of an H100 SXM's 989 dense bf16 peak."""
LINK_GBYTES_PER_S = 50.0
"""Default bandwidth per GPU for collectives, GB/s: one 400 Gb/s NDR InfiniBand adapter per GPU (DGX H100)."""


def patches_per_image(model: Any, image_size: int) -> int:
    """Visual tokens the tower makes of one image: its forward on the meta device (before a fine-tuning method
    swaps in layers that cannot run there, e.g. 4-bit ones)."""
    import torch

    with torch.no_grad():
        return int(model.vision.encode_images(torch.empty(1, 3, image_size, image_size, device="meta")).shape[1])


def estimate_step(cfg: JobConfig, model: Any, world_size: int, gpu_tflops: float = GPU_TFLOPS,
                  link_gbytes_per_s: float = LINK_GBYTES_PER_S, patches: int | None = None) -> dict[str, float]:
    """Compute, ZeRO communication and time per optimizer step and GPU (see the module doc for the formulas)."""
    t, d = cfg.train, cfg.data
    w = 2 if t.precision == "bf16" else 4
    groups = model.component_params()
    n_all = {c: sum(_numel(p) for _, p in ps) for c, ps in groups.items()}
    n_train = {c: sum(_numel(p) for _, p in ps if p.requires_grad) for c, ps in groups.items()}
    if patches is None:
        patches = patches_per_image(model, d.image_size)
    latents = model.resampler.num_latents
    text = 1 + d.max_text_len
    tokens = {"vision": d.max_images * patches, "resampler": d.max_images * (patches + latents),
              "lm": text, "xattn": text, "head": 1}
    vision_backward = n_train.get("vision", 0) > 0
    flops_per_sample = 0.0
    for c, n in n_all.items():
        k = tokens.get(c, text)
        on_backward_path = c != "vision" or vision_backward
        flops_per_sample += 2 * n * k + (2 * n * k if on_backward_path else 0) + 2 * n_train.get(c, 0) * k
    if cfg.model.activation_checkpointing:  # the decoder's forward again in the backward pass
        flops_per_sample += 2 * (n_all.get("lm", 0) + n_all.get("xattn", 0)) * text
    accum = max(1, t.global_batch_size // (t.micro_batch_size * world_size))
    flops = flops_per_sample * t.micro_batch_size * accum
    total, trainable = sum(n_all.values()), sum(n_train.values())
    backward = total - (0 if vision_backward else n_all.get("vision", 0))
    share = (world_size - 1) / world_size
    if cfg.deepspeed.zero_stage == 3:
        comm = accum * share * w * (total + backward + trainable)
    else:
        comm = 2 * share * w * trainable
    compute_s = flops / (gpu_tflops * 1e12)
    comm_s = comm / (link_gbytes_per_s * 1e9)
    return {"gpu_tflops": gpu_tflops, "link_gbytes_per_s": link_gbytes_per_s, "tflop_per_step": flops / 1e12,
            "comm_gbytes_per_step": comm / 1e9, "compute_s": compute_s, "comm_s": comm_s,
            "step_s_no_overlap": compute_s + comm_s, "step_s_full_overlap": max(compute_s, comm_s),
            "samples_per_s_no_overlap": t.global_batch_size / (compute_s + comm_s),
            "patches_per_image": patches}


def _numel(p: Any) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())


def dry_run(cfg: JobConfig, world_size: int, vocab_size: int | None, gpu_tflops: float = GPU_TFLOPS,
            link_gbytes_per_s: float = LINK_GBYTES_PER_S) -> dict[str, Any]:
    from mmscale.job.build import model_recipe
    from mmscale.job.preflight import problems_of

    # every figure below divides by these: a meaningless size is an error, not a table of negative numbers
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: {world_size!r} must be an integer >= 1 (the number of ranks, e.g. 64)")
    for name, value in (("gpu_tflops", gpu_tflops), ("link_gbytes_per_s", link_gbytes_per_s)):
        if not value > 0:
            raise ValueError(f"{name}: {value!r} must be > 0")
    problems = problems_of(cfg, world_size=world_size, check_paths=False)  # sizing needs no data
    recipe = model_recipe(cfg) if not problems else None
    if recipe:
        model = recipe.build(vocab_size, meta=True)
    else:  # a config with problems: the model as far as it can be built (its media encoders when those are fine)
        model = build_model(cfg.model, vocab_size=vocab_size, meta=True)
        if not media_problems(cfg):
            with torch.device("meta"):
                attach_media(model, cfg)
    patches = patches_per_image(model, cfg.data.image_size)
    quantized, quant_bytes = 0, 0.5
    if recipe is not None:  # the fine-tuning methods change what trains, and so the gradient and optimizer memory
        callbacks, options = recipe.callbacks, recipe.options
        # on the meta device nothing is quantized: count the weights qlora would hold in 4 bits, before its
        # adapters wrap the linear layers (the LM's own, as transformers quantizes them: not its head, not the
        # cross-attention added to it; the tower's with quantize_vision)
        if options.lm_quantization is not None:
            q = options.lm_quantization
            quant_bytes = quantized_bytes_per_weight(bool(q.get("bnb_4bit_use_double_quant")))
            quantized = _linear_weights(model.lm, skip=("lm_head", "xattn"))  # xattn: added after the LM loads
            if any(getattr(cb, "quantize_vision", False) for cb in callbacks):
                quantized += _linear_weights(model.vision)
        recipe.finish(model)
    counts = model.param_counts()
    lm_cfg = model.lm.config
    seq_len = 1 + cfg.data.max_text_len
    mem = estimate_memory(cfg, counts, world_size, lm_cfg.hidden_size, lm_cfg.num_hidden_layers, seq_len,
                          lm_cfg.vocab_size, quantized, quant_bytes)
    return {
        "world_size": world_size,
        "grad_accum": cfg.train.global_batch_size // (cfg.train.micro_batch_size * world_size)
        if not problems else None,
        "params": counts,
        "memory_per_rank": mem,
        "step": estimate_step(cfg, model, world_size, gpu_tflops, link_gbytes_per_s, patches),
        "problems": problems,
    }


def _linear_weights(module: Any, skip: tuple[str, ...] = ()) -> int:
    import torch

    return sum(m.weight.numel() for name, m in module.named_modules()
               if type(m) is torch.nn.Linear and not set(name.split(".")) & set(skip))


def format_dry_run(report: dict[str, Any]) -> str:
    c = report["params"]
    lines = [
        f"world size        {report['world_size']}   (gradient accumulation {report['grad_accum']})",
        f"parameters        total {c['total']:,}   trainable {c['trainable']:,}",
    ]
    trains = c.get("trainable_by_component", {})
    for name, n in c.get("by_component", {}).items():
        lines.append(f"  {name:<15} {n:>14,}   trainable {trains.get(name, 0):>14,}" if trains else f"  {name:<15} {n:,}")
    lines.append("memory per rank (estimate, GiB)")
    for k, v in report["memory_per_rank"].items():
        lines.append(f"  {k:<40} {v:8.2f}")
    st = report.get("step")
    if st:
        lines += [
            f"per optimizer step and GPU (estimate; {st['gpu_tflops']:g} TFLOP/s achieved per GPU, "
            f"{st['link_gbytes_per_s']:g} GB/s per GPU for collectives: --gpu-tflops, --link-gbytes-per-s)",
            f"  compute                {st['tflop_per_step']:10.1f} TFLOP {st['compute_s']:8.2f} s",
            f"  communication (ZeRO)   {st['comm_gbytes_per_step']:10.1f} GB    {st['comm_s']:8.2f} s",
            f"  step time              {st['step_s_full_overlap']:.2f} s (full overlap) to "
            f"{st['step_s_no_overlap']:.2f} s (none); {st['samples_per_s_no_overlap']:.0f} samples/s at worst",
        ]
    for p in report["problems"]:
        lines.append(f"PROBLEM: {p}")
    return "\n".join(lines)


def dry_run_vocab_size(cfg: JobConfig) -> int | None:
    """The vocabulary training would size the model with: the tokenizer's (the configured one, or the one mmscale
    already trained for the demo data), else the upper bound mmscale would train it with; None = the LM's own."""
    from mmscale.data import load_tokenizer

    d = cfg.data
    if d.tokenizer and Path(d.tokenizer).exists():
        return load_tokenizer(d.tokenizer).vocab_size
    if d.tokenizer:  # not made yet (a dry run checks no paths): the model is sized as its config says
        log.warning("dry run: data.tokenizer %r does not exist yet; the LM keeps its configured vocabulary",
                    d.tokenizer)
        return None
    if not d.train_shards and d.synthetic_train_samples > 0:
        made = Path(cfg.output_dir) / "data" / "tokenizer.model"
        return load_tokenizer(made).vocab_size if made.is_file() else d.tokenizer_vocab_size
    return None


def dry_run_report(cfg: JobConfig, world_size: int, **machine: float) -> tuple[str, dict[str, Any]]:
    """The --dry-run table and its figures; `machine`: gpu_tflops, link_gbytes_per_s ."""
    report = dry_run(cfg, world_size, vocab_size=dry_run_vocab_size(cfg), **machine)
    return format_dry_run(report), report
