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

Offloaded optimizer state or parameters are counted in host memory instead.
"""

from __future__ import annotations

from typing import Any

from mmscale.config import JobConfig

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
    per_layer = 2 * w if cfg.model.activation_checkpointing else 34
    acts = t.micro_batch_size * seq_len * hidden * layers * per_layer
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
    out.update({f"host_{k}_gib": v / GiB for k, v in host.items()})
    return out


def dry_run(cfg: JobConfig, world_size: int, vocab_size: int | None) -> dict[str, Any]:
    from mmscale.config import validate
    from mmscale.model import build_model

    problems = validate(cfg, world_size=world_size, check_paths=False)  # sizing needs no data
    model = build_model(cfg.model, vocab_size=vocab_size, meta=True)
    quantized, quant_bytes = 0, 0.5
    if not problems:  # the fine-tuning methods change what trains, and so the gradient and optimizer memory
        from mmscale.callbacks import build_callbacks
        from mmscale.model import BuildOptions

        callbacks, options = build_callbacks(cfg.callbacks), BuildOptions()
        for cb in callbacks:
            cb.on_build(options)
        # on the meta device nothing is quantized: count the weights qlora would hold in 4 bits, before its
        # adapters wrap the linear layers (the LM's own, as transformers quantizes them: not its head, not the
        # cross-attention added to it; the tower's with quantize_vision)
        if options.lm_quantization is not None:
            q = options.lm_quantization
            quant_bytes = quantized_bytes_per_weight(bool(q.get("bnb_4bit_use_double_quant")))
            quantized = _linear_weights(model.lm, skip=("lm_head", "xattn"))  # xattn: added after the LM loads
            if any(getattr(cb, "quantize_vision", False) for cb in callbacks):
                quantized += _linear_weights(model.vision)
        for cb in callbacks:
            cb.on_model_built(model)
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
    for name, n in c.get("by_component", {}).items():
        lines.append(f"  {name:<15} {n:,}")
    lines.append("memory per rank (estimate, GiB)")
    for k, v in report["memory_per_rank"].items():
        lines.append(f"  {k:<28} {v:8.2f}")
    for p in report["problems"]:
        lines.append(f"PROBLEM: {p}")
    return "\n".join(lines)
