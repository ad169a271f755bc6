"""Per-rank memory of full fine-tuning, LoRA and QLoRA side by side: same model, ZeRO-3, 2 ranks, bf16.

    deepspeed --num_gpus 2 benchmarks/peft_memory.py [--steps 100] [--smoke] [--out FILE]
    deepspeed --num_gpus 2 benchmarks/peft_memory.py --smoke --out /tmp/peft_memory.json   # checks the script

One job builds and trains the four variants in turn through mmscale's own code path (`load_config` over
configs/tiny.yaml with a wider LM, `build_trainer`, `Trainer.train_step`, `Trainer.evaluate`), each from the same
base LM (a save_pretrained folder, `model.lm.path`; QLoRA quantizes it to 4 bits as it loads), on the same batches,
for the same number of steps; each engine is destroyed before the next is built. Per rank and per variant it
counts the bytes the engine holds after training:

    params     each parameter's ZeRO-3 partition (`p.ds_tensor`), trainable and frozen apart; for QLoRA the frozen
               part is the packed 4-bit weights' partitions plus their quantization state (absmax, code, nested
               state), which is a plain attribute and stays whole on every rank
    grads      DeepSpeed's flat gradient partition buffer (`grad_partitions_flat_buffer`, one slot per trainable
               element of this rank's partitions); the fp32 copy one sub-group gets during `step` is transient
               and reported apart (`grad_fp32_step_peak`)
    optimizer  the fp32 master partitions (`fp32_partitioned_groups_flat`) and the Adam moments in the wrapped
               torch optimizer's `state` (exp_avg, exp_avg_sq, step)
    buffers    the reduce bucket (`ipg_buckets[...].buffer`, `reduce_bucket_size` elements whatever the model):
               reported, counted in no ratio

and the median step time and the validation loss after the last step. Prints a table, writes
benchmarks/results/peft_memory.json (`--out`; rank 0) and prints the headline as one JSON object on its last line.
The data and base LM go to a temporary folder, removed at the end. `--smoke`: a 2-layer LM of width 128, 3 steps per
variant; without `--out`, the JSON goes to a temporary folder (benchmarks/smoke.py).

The variants: `full` (model.train_lm=true; cross-attention and resampler in full), `lora_full_xattn` (LoRA r=8
on the LM's q/k/v/o, cross-attention and resampler in full: what every method did before model.train_xattn took a
mode), `lora` (the same LoRA, and model.train_xattn=lora, model.train_resampler=lora: every linear layer of the
cross-attention blocks and the resampler adapted too, the gates trainable), `qlora` (as `lora`, over the 4-bit LM).

Headline ratios (targets from the issues):
    qlora_base_bytes_ratio   QLoRA's bytes for the LM weights it quantizes / the same weights' bf16 bytes (LoRA run),
                             per rank, max over ranks                                          target <= 0.3
    trainable_state_ratio    LoRA's trainable params + grads + optimizer state / full fine-tuning's   <= 0.02
    (and, with no target, trainable_state_ratio_full_xattn: the same for `lora_full_xattn`)
    qlora_over_lora_loss     QLoRA's validation loss / LoRA's                                        <= 1.05
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported from elsewhere

import smoke  # noqa: E402  (benchmarks/smoke.py)
from machine import cpu_model, native_bf16  # noqa: E402  (benchmarks/machine.py)

if TYPE_CHECKING:  # the functions import torch themselves (main, after the arguments parse)
    import torch

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("full", "lora_full_xattn", "lora", "qlora")
LORA_MODES = ["model.train_xattn=lora", "model.train_resampler=lora"]
TARGETS = {"qlora_base_bytes_ratio": 0.3, "trainable_state_ratio": 0.02, "qlora_over_lora_loss": 1.05}


def _loadavg() -> float:
    """The 1-minute load average: step times on a shared CPU mean little when it is above the core count."""
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _quant_state_tensors(qs) -> list[torch.Tensor]:
    """Every tensor of a bitsandbytes QuantState, the nested one (double quantization) included."""
    import torch

    out = [t for t in (getattr(qs, k, None) for k in ("absmax", "code", "offset")) if torch.is_tensor(t)]
    if getattr(qs, "state2", None) is not None:
        out += _quant_state_tensors(qs.state2)
    return out


def measure(engine) -> dict:
    """This rank's bytes of parameters (trainable / frozen, per component), gradients, optimizer state and buffers.
    Call after a step: Adam's moments exist from the first one on."""
    import torch

    module, opt = engine.ds.module, engine.ds.optimizer
    if not hasattr(opt, "fp32_partitioned_groups_flat"):
        raise RuntimeError(f"expected DeepSpeed's ZeRO-3 optimizer, got {type(opt).__name__}")
    comp_of = {id(p): c for c, params in module.component_params().items() for _, p in params}
    params = {"trainable": 0, "frozen": 0}
    resident_full = 0  # parameters gathered whole and kept (persistent ones): 0 with the threshold at 0
    by_comp: dict[str, dict[str, int]] = {}
    trainable_numel: dict[str, int] = {}  # this rank's trainable partition elements per component
    quantized: dict[str, int] = {}  # name -> bytes: 4-bit weights' partitions + their quantization state
    quant_state = 0  # of which quantization state (whole on every rank)
    weights: dict[str, int] = {}  # name -> this rank's partition bytes, for every parameter
    seen: set[int] = set()
    for name, p in module.named_parameters():
        local = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        b = _nbytes(local)
        if hasattr(p, "ds_tensor") and p.data.numel() > 0:
            resident_full += _nbytes(p.data)
        weights[name] = b
        if type(p).__name__ == "Params4bit":
            qs = [t for t in _quant_state_tensors(p.quant_state) if t.data_ptr() not in seen]
            seen.update(t.data_ptr() for t in qs)
            quant_state += sum(map(_nbytes, qs))
            b += sum(map(_nbytes, qs))
            quantized[name] = b
        kind = "trainable" if p.requires_grad else "frozen"
        params[kind] += b
        comp = comp_of[id(p)]
        by_comp.setdefault(comp, {"trainable": 0, "frozen": 0})[kind] += b
        if p.requires_grad:
            trainable_numel[comp] = trainable_numel.get(comp, 0) + local.numel()
    grads = _nbytes(opt.grad_partitions_flat_buffer)
    master = sum(map(_nbytes, opt.fp32_partitioned_groups_flat))
    moments = sum(_nbytes(v) for state in opt.optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    buffers = sum(_nbytes(b.buffer) for b in opt.ipg_buckets.values())
    numel = sum(trainable_numel.values())
    # DeepSpeed's flat buffers hold exactly this rank's trainable partitions, nothing else (checked, not assumed)
    grad_numel = opt.grad_partitions_flat_buffer.numel()
    fp32_numel = sum(t.numel() for t in opt.fp32_partitioned_groups_flat)
    if grad_numel != numel or fp32_numel != numel:
        raise RuntimeError(f"flat buffers ({grad_numel} grad, {fp32_numel} fp32) != trainable partition elements "
                           f"({numel})")
    state = params["trainable"] + grads + master + moments
    # The trainable state per component, attributed by partition elements (every trainable element costs the same)
    per_elem = state / max(numel, 1)
    return {
        "params_trainable": params["trainable"], "params_frozen": params["frozen"],
        "params_resident_full": resident_full, "grads": grads,
        "grad_fp32_step_peak": max((t.numel() * 4 for t in opt.fp32_partitioned_groups_flat), default=0),
        "optimizer_master": master, "optimizer_moments": moments, "optimizer": master + moments,
        "buffers": buffers, "trainable_state": state,
        "trainable_state_by_component": {c: round(n * per_elem) for c, n in trainable_numel.items()},
        "params_by_component": by_comp, "quantized": quantized, "quant_state": quant_state, "weights": weights,
        "grad_dtype": str(opt.grad_partitions_flat_buffer.dtype),
        "master_dtype": str(opt.fp32_partitioned_groups_flat[0].dtype),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per variant")
    smoke.add_smoke_args(p, "peft_memory")  # a few steps of a small LM: checks the script, not memory
    p.add_argument("--lm-hidden", type=int, default=512)
    p.add_argument("--lm-layers", type=int, default=4)
    p.add_argument("--lm-intermediate", type=int, default=1376)
    p.add_argument("--no-double-quant", action="store_true", help="QLoRA without double quantization")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args(argv)
    smoke.check_smoke_paths(p, args)
    if args.smoke:
        args.steps, args.lm_hidden, args.lm_layers, args.lm_intermediate = min(args.steps, 3), 128, 2, 256

    import deepspeed  # here, not at the top: --help and a refused argument answer without importing torch
    import torch

    from mmscale.job.preflight import load_config
    from mmscale.data import make_shapes_dataset, train_sentencepiece
    from mmscale.data.tokenizer import captions_from_shards, load_tokenizer
    from mmscale.model.multimodal import build_lm
    from mmscale.job.build import build_trainer
    from mmscale.training.engine import all_gather_object, barrier, broadcast_object, init_distributed

    rank, world = init_distributed()
    tmp = Path(broadcast_object(tempfile.mkdtemp(prefix="mmscale_peft_memory_") if rank == 0 else None))
    heads = max(1, args.lm_hidden // 64)
    model = [f"model.lm.config.hidden_size={args.lm_hidden}", f"model.lm.config.num_hidden_layers={args.lm_layers}",
             f"model.lm.config.intermediate_size={args.lm_intermediate}",
             f"model.lm.config.num_attention_heads={heads}", f"model.lm.config.num_key_value_heads={heads}",
             # Flamingo-9B's spacing: one gated cross-attention block per 4 decoder layers
             f"model.xattn.every_n_layers={min(4, args.lm_layers)}"]
    data = [f"data.train_shards={tmp / 'train'}", f"data.val_shards={tmp / 'val'}",
            f"data.tokenizer={tmp / 'tok.model'}", "data.num_workers=0"]
    if rank == 0:  # the data, the tokenizer and the base LM every variant starts from
        make_shapes_dataset(tmp / "train", 1024, samples_per_shard=64, image_size=32, seed=7, prefix="train")
        make_shapes_dataset(tmp / "val", 64, samples_per_shard=16, image_size=32, seed=8, prefix="val",
                            first_index=10_000)
        train_sentencepiece(captions_from_shards(str(tmp / "train")), tmp / "tok", vocab_size=64)
        torch.manual_seed(0)
        base_cfg = load_config(REPO / "configs/tiny.yaml", model, check_paths=False).model
        build_lm(base_cfg, vocab_size=load_tokenizer(tmp / "tok.model").vocab_size).save_pretrained(tmp / "base_lm")
    barrier()
    common = [*data, *model, f"model.lm.path={tmp / 'base_lm'}", "train.precision=bf16",
              f"train.max_steps={args.steps}", f"train.lr={args.lr}", f"train.warmup_steps={min(5, args.steps)}",
              "train.checkpoint_every=0", "train.eval_batches=8",
              # every parameter partitioned (none kept whole for being small): the counts are the partitions
              "deepspeed.stage3_param_persistence_threshold=0"]
    qlora_args = "{double_quant: " + ("false" if args.no_double_quant else "true") + "}"
    overrides = {
        "full": ["model.train_lm=true"],
        "lora_full_xattn": ["callbacks=[{name: lora}]"],
        "lora": ["callbacks=[{name: lora}]", *LORA_MODES],
        "qlora": [f"callbacks=[{{name: qlora, args: {qlora_args}}}]", *LORA_MODES],
    }

    results = {}
    for variant in VARIANTS:
        cfg = load_config(REPO / "configs/tiny.yaml", [*common, *overrides[variant], f"output_dir={tmp / variant}"],
                          world_size=world)
        trainer = build_trainer(cfg)
        trainer._data_iter = iter(trainer.train_data)  # the loop without checkpoints (as benchmarks/train_step.py)
        trainer.engine.train(True)
        times, losses, load = [], [], [_loadavg()]
        for _ in range(args.steps):
            times.append(trainer.train_step()["step_time"])
            losses.append(trainer._flush_window()["loss"])
        load.append(_loadavg())
        mem = measure(trainer.engine)
        val = trainer.evaluate()["val_loss"]
        counts = trainer.engine.module.param_counts()
        per_rank = all_gather_object(mem)
        warm = times[2:] if len(times) > 3 else times  # the first steps allocate Adam's state and buffers
        results[variant] = {"per_rank": per_rank, "val_loss": val, "train_loss_first": losses[0],
                            "train_loss_last": losses[-1], "step_time_median_s": statistics.median(warm),
                            "step_times_s": times, "loadavg_1min": load,
                            # as mmscale logs them: a 4-bit weight counts its packed storage elements (4 weights each)
                            "param_counts_logged": counts}
        for data_ in (trainer.train_data, trainer.eval_data):
            if hasattr(data_, "close"):
                data_.close()
        trainer.metrics.close()
        trainer.engine.ds.destroy()
        del trainer
        gc.collect()
        barrier()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)

    def worst(variant: str, key: str) -> int:  # max over ranks
        return max(r[key] for r in results[variant]["per_rank"])

    # QLoRA's bytes for the weights it quantized against the same weights' bf16 partitions in the LoRA run
    q_names = set(results["qlora"]["per_rank"][0]["quantized"])
    missing = q_names - set(results["lora"]["per_rank"][0]["weights"])
    if missing:
        raise RuntimeError(f"quantized weights without a bf16 counterpart in the LoRA run: {sorted(missing)[:5]}")
    base_q = max(sum(r["quantized"].values()) for r in results["qlora"]["per_rank"])
    base_bf16 = max(sum(r["weights"][n] for n in q_names) for r in results["lora"]["per_rank"])
    lm_state = {v: max(r["trainable_state_by_component"].get("lm", 0) for r in results[v]["per_rank"])
                for v in ("full", "lora")}
    headline = {
        "benchmark": "peft_memory",
        "qlora_base_bytes_ratio": base_q / base_bf16,
        "trainable_state_ratio": worst("lora", "trainable_state") / worst("full", "trainable_state"),
        "trainable_state_ratio_full_xattn": worst("lora_full_xattn", "trainable_state") / worst("full",
                                                                                                "trainable_state"),
        "lora_over_lora_full_xattn_loss": results["lora"]["val_loss"] / results["lora_full_xattn"]["val_loss"],
        "qlora_over_lora_loss": results["qlora"]["val_loss"] / results["lora"]["val_loss"],
        "trainable_state_ratio_lm_only": lm_state["lora"] / lm_state["full"],
        "val_loss": {v: results[v]["val_loss"] for v in VARIANTS},
        "step_time_median_s": {v: results[v]["step_time_median_s"] for v in VARIANTS},
        "steps": args.steps,
        "smoke": args.smoke,
        "world_size": world,
        "cpu_model": cpu_model(),
    }
    headline["targets_met"] = {k: headline[k] <= t for k, t in TARGETS.items()}
    if rank == 0:
        notes = _notes(headline, results, base_q, base_bf16, args)
        print(_table(results, headline, base_q, base_bf16, notes))
        slim = {v: {**r, "per_rank": [{k: x for k, x in pr.items() if k not in ("weights", "quantized")}
                                      | {"quantized_bytes": sum(pr["quantized"].values())} for pr in r["per_rank"]]}
                for v, r in results.items()}
        payload = {
            **headline, "targets": TARGETS, "notes": notes, "variants": slim,
            "base_quantized_bytes_per_rank": base_q, "base_bf16_bytes_per_rank": base_bf16,
            "setup": {"config": "configs/tiny.yaml", "lm_hidden": args.lm_hidden, "lm_layers": args.lm_layers,
                      "lm_intermediate": args.lm_intermediate, "lm_heads": heads,
                      "xattn_every_n_layers": min(4, args.lm_layers), "zero_stage": 3, "precision": "bf16",
                      "persistence_threshold": 0, "lr": args.lr, "global_batch": 8, "micro_batch": 4,
                      "qlora": f"nf4, double_quant={not args.no_double_quant}, LoRA r=8 on q/k/v/o",
                      "lora": "r=8 on q/k/v/o, and on every linear layer of the cross-attention and the resampler",
                      "lora_full_xattn": "r=8 on q/k/v/o; cross-attention and resampler trained in full",
                      "full": "model.train_lm=true (vision tower frozen in all four)",
                      "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                      "date": time.strftime("%Y-%m-%d"), "cpu_native_bf16": native_bf16()},
        }
        out = smoke.out_path(args, "peft_memory")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2))
        print(json.dumps(headline))
    torch.distributed.destroy_process_group()


def _mb(b: float) -> str:
    return f"{b / 2**20:.2f}"


def _notes(h: dict, results: dict, base_q: int, base_bf16: int, args) -> list[str]:
    notes = []
    if args.smoke:
        notes.append("smoke run: a small LM and a few steps; the figures check the script, not the methods")
    busy = {v: max(r["loadavg_1min"]) for v, r in results.items()}
    cores = os.cpu_count() or 1
    if max(busy.values()) > cores:
        notes.append(f"step times are indicative only: the {cores}-core machine was shared (1-minute load average "
                     f"up to " + ", ".join(f"{v} {x:.1f}" for v, x in busy.items()) + ")")
    if not h["targets_met"]["trainable_state_ratio"]:
        by = results["lora"]["per_rank"][0]["trainable_state_by_component"]
        total = sum(by.values())
        share = ", ".join(f"{c} {v / total:.0%}" for c, v in sorted(by.items(), key=lambda kv: -kv[1]))
        notes.append(f"trainable_state_ratio misses: LoRA's trainable state by component: {share}. LM alone: "
                     f"{h['trainable_state_ratio_lm_only']:.4f}")
    if not h["targets_met"]["qlora_base_bytes_ratio"]:
        state = max(r["quant_state"] for r in results["qlora"]["per_rank"])
        notes.append(f"qlora_base_bytes_ratio misses: the packed 4-bit weights are 0.25 of bf16 per rank (ZeRO-3 "
                     f"partitions them), but their quantization state ({_mb(state)} MiB: absmax per 64-weight block, "
                     f"{'fp32' if args.no_double_quant else 'uint8 + a 256-entry fp32 code table per layer'}) is an "
                     f"attribute of the parameter that every rank keeps whole: {state / base_bf16:.3f} of the bf16 "
                     f"bytes on its own")
    if not h["targets_met"]["qlora_over_lora_loss"]:
        notes.append("qlora_over_lora_loss misses: the 4-bit base differs from the bf16 base by its quantization "
                     "error, and the adapters had only these steps to make up for it")
    return notes


def _table(results: dict, h: dict, base_q: int, base_bf16: int, notes: list[str]) -> str:
    cols = ("params trainable", "params frozen", "grads", "optim master", "optim moments", "trainable state",
            "reduce bucket")
    keys = ("params_trainable", "params_frozen", "grads", "optimizer_master", "optimizer_moments", "trainable_state",
            "buffers")
    lines = ["per-rank MiB (max over ranks) after training; ZeRO-3, 2 ranks, bf16 weights, fp32 master + Adam",
             f"{'variant':<16}" + "".join(f"{c:>17}" for c in cols) + f"{'step s (med)':>14}{'val loss':>10}"]
    for v, r in results.items():
        row = [max(pr[k] for pr in r["per_rank"]) for k in keys]
        lines.append(f"{v:<16}" + "".join(f"{_mb(x):>17}" for x in row)
                     + f"{r['step_time_median_s']:>14.3f}{r['val_loss']:>10.4f}")
    state = max(r["quant_state"] for r in results["qlora"]["per_rank"])
    lines.append(f"LM weights QLoRA quantizes, per rank: {_mb(base_q)} MiB as 4-bit partitions + quantization state "
                 f"({_mb(state)} MiB of it, whole on every rank) vs {_mb(base_bf16)} MiB as bf16 partitions (LoRA)")
    for k, t in TARGETS.items():
        lines.append(f"{k:<24} {h[k]:.4f}  target <= {t}  {'met' if h['targets_met'][k] else 'MISSED'}")
    lines.append("reduce bucket: DeepSpeed's reduce_bucket_size buffer (50M elements by default), the same whatever "
                 "trains: counted in no ratio")
    lines.append(f"{'trainable_state_ratio_lm_only':<24} {h['trainable_state_ratio_lm_only']:.4f}  (adapters vs the "
                 f"LM's own weights, cross-attention and resampler left out)")
    lines.append(f"{'trainable_state_ratio_full_xattn':<24} {h['trainable_state_ratio_full_xattn']:.4f}  (LoRA on the "
                 f"LM only, cross-attention and resampler in full); its val loss over lora's: "
                 f"{1 / h['lora_over_lora_full_xattn_loss']:.4f}")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
