"""The README's feature marks, run for real: many short training runs inside ONE process group (one launch).

    deepspeed --num_gpus 2 tests/dist/run_matrix.py OUT_JSON --work DIR [--only a,b] section.key=value ...

Every variant is a real `build_trainer(cfg)` + `Trainer.train()` on configs/tiny.yaml + the given overrides (the
tests pass their tiny shards and tokenizer) + the variant's own, in its own `DIR/<name>` output_dir, with the same
seed, so every variant reads the same batches. Variants, in this order (zero3 is the reference):

    zero0, zero1, zero2                        fp32, stage 0-2
    zero2_offload_opt                          + deepspeed.offload_optimizer=cpu
    zero3                                      fp32, stage 3: the reference
    zero3_offload_opt, zero3_offload_params    + deepspeed.offload_optimizer=cpu / offload_params=cpu
    zero3_act_ckpt                             + model.activation_checkpointing=true
    bf16                                       train.precision=bf16 under ZeRO-3
    lm_path                                    model.lm.path = an LM rank 0 saved with save_pretrained; the engine's
                                               (ZeRO-3 gathered) LM weights are compared with the saved file
    early_stopping                             the early_stopping callback, validation every step

Same initial weights: the same seed does NOT give a ZeRO-3 build the weights of a stage 0-2 build (under
`zero.Init` Hugging Face's `_init_weights` runs on already partitioned, empty parameters and does nothing, so the
towers keep PyTorch's default init, and the RNG stream shifts for every module built after them). So rank 0 first
builds the model plainly with train.seed and saves its weights; the variants that compare losses load them in
`on_model_built` (the `matrix_initial_weights` callback registered here, before the optimizer and DeepSpeed see the
model), and record how many of their own freshly built weights differed from that file (`native_init`).

Between variants: `trainer.train()` has closed the data loaders; the engine's ZeRO hooks and optimizer go with
`destroy()`; and transformers' global ZeRO-3 flag is switched off. That flag is a weak reference to the
HfDeepSpeedConfig the engine keeps, and a ZeRO-3 engine is never freed in-process under DeepSpeed 0.19.8,
destroy() and gc.collect() or not (DeepSpeed keeps its module in the global `parameter_offload.FWD_MODULE_STACK`
and in the class-level lru_cache of `PartitionedParameterCoordinator.__params_to_release`, and with both cleared
something outside Python's view still holds it), so `is_deepspeed_zero3_enabled()` would stay True and
`from_pretrained` would act ZeRO-3 aware in every later build of the process. `hf_zero3_leaked` records the flag
before it is switched off, `hf_zero3_after` after. The variants that are not ZeRO-3 run first all the same.

Rank 0 writes OUT_JSON: {"world_size", "wall_s", "variants": {name: {"history", "param_dtypes" (per rank),
"zero_stage_built", "offload_built", "native_init", "hf_zero3_leaked", "hf_zero3_after", "build_s", "train_s",
the checks' own keys, "error"}}}. A variant that raises is recorded with its
error and the next one runs (a build that DeepSpeed refuses fails on every rank alike; a rank-local failure
mid-step would hang the group and time the launch out instead).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from mmscale.callbacks import register_callback
from mmscale.job.preflight import load_config
from mmscale.training.callbacks import Callback

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs/tiny.yaml"

# Every variant: 4 optimizer steps (2 warmup, then cosine), logged every step. checkpoint_every=0 still saves once
# at the end, which also exercises a save under every stage and offload. No data-loader worker processes: on 2
# cores their start-up (per variant, and per evaluation pass) is most of what this launch would otherwise add;
# tests/test_data*.py cover the workers.
COMMON = ["train.max_steps=4", "train.checkpoint_every=0", "train.eval_every=0", "logging.log_every=1",
          "data.num_workers=0"]


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


# ----------------------------------------------------------------------------------------------- initial weights


def save_initial_weights(cfg: Any, path: Path) -> None:
    """Rank 0: the model a stage 0-2 build makes from train.seed (build_trainer seeds, then builds), saved."""
    from mmscale.data import load_tokenizer
    from mmscale.job.build import model_recipe, seed_everything
    from mmscale.training.engine import barrier

    if _rank() == 0:
        seed_everything(cfg.train.seed)
        model = model_recipe(cfg).build(load_tokenizer(cfg.data.tokenizer).vocab_size)
        torch.save(model.state_dict(), path)
        del model
    barrier()


@register_callback("matrix_initial_weights")
class InitialWeights(Callback):
    """Test-only: before the optimizer and DeepSpeed see the model, record how its fresh weights differ from the
    saved ones (`native_init`: how many differ, and each parameter's std, fresh and saved), then load the saved ones
    (under ZeRO-3: gathered, every rank writes the same values, rank 0's are kept)."""

    def __init__(self, path: str = ""):
        self.path = path
        self.native_init: dict[str, Any] = {}

    def on_model_built(self, model: torch.nn.Module) -> None:
        import deepspeed

        saved = torch.load(self.path, map_location="cpu", weights_only=True)
        params = dict(model.named_parameters())
        if set(params) != set(saved):
            raise RuntimeError(f"initial weights: names differ: {sorted(set(params) ^ set(saved))[:5]}")
        differ, std = [], {}
        with torch.no_grad(), deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            for name, p in params.items():
                fresh, want = p.data.float(), saved[name].float()
                if not torch.equal(fresh, want):
                    differ.append(name)
                std[name] = [float(fresh.std()) if fresh.numel() > 1 else 0.0,
                             float(want.std()) if want.numel() > 1 else 0.0]
                p.data.copy_(saved[name])
        self.native_init = {"compared": len(params), "differ": len(differ), "examples": differ[:6], "std": std}


def initial_weights(work: Path) -> str:
    return f"callbacks=[{{name: matrix_initial_weights, args: {{path: {work / 'initial_weights.pt'}}}}}]"


# ----------------------------------------------------------------------------------------------- checks


def param_dtypes(model: torch.nn.Module) -> dict[str, int]:
    """How many parameters hold each dtype: under ZeRO-3 the local partition `ds_tensor` (p.data is an empty
    placeholder there), otherwise the parameter itself."""
    return dict(Counter(str(getattr(p, "ds_tensor", p).dtype) for p in model.parameters()))


def _lm_param_name(engine_name: str) -> str | None:
    """`lm.model.layers.0.decoder_layer.mlp.up_proj.weight` (the engine's, layers wrapped for cross-attention) ->
    `model.layers.0.mlp.up_proj.weight` (save_pretrained's); None for the cross-attention blocks' own parameters."""
    if not engine_name.startswith("lm.") or ".xattn." in engine_name:
        return None
    return engine_name[len("lm."):].replace(".decoder_layer.", ".")


def save_reference_lm(cfg: Any, work: Path) -> list[str]:
    """Rank 0 builds the tiny preset's LM with its own seed (not train.seed: a silently re-initialised LM must not
    match by accident) and saves it; the others wait. Returns the override that loads it."""
    from mmscale.data import load_tokenizer
    from mmscale.model.multimodal import build_lm
    from mmscale.training.engine import barrier

    lm_dir = work / "saved_lm"
    if _rank() == 0:
        torch.manual_seed(4321)
        build_lm(cfg.model, load_tokenizer(cfg.data.tokenizer).vocab_size).save_pretrained(lm_dir)
    barrier()
    return [f"model.lm.path={lm_dir}"]


def check_loaded_lm(trainer: Any, record: dict) -> None:
    """Gather the engine's LM weights (a collective: every rank, same order) and compare them, tensor by tensor,
    with the safetensors file save_pretrained wrote. Every rank checks; all ranks' verdicts are recorded."""
    import deepspeed
    from safetensors.torch import load_file

    from mmscale.training.engine import all_gather_object

    saved = load_file(str(Path(trainer.cfg.model.lm.path) / "model.safetensors"))
    named = [(n, p) for n, p in trainer.engine.module.named_parameters() if _lm_param_name(n) is not None]
    seen, mismatched, max_diff = set(), [], 0.0
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        for name, p in named:
            key = _lm_param_name(name)
            if key not in saved:
                mismatched.append(f"{name}: no {key} in the saved file")
                continue
            seen.add(key)
            want, got = saved[key], p.detach().cpu()
            if got.shape != want.shape or not torch.equal(got, want):
                diff = float((got.float() - want.float()).abs().max()) if got.shape == want.shape else float("inf")
                max_diff = max(max_diff, diff)
                mismatched.append(f"{name}: {tuple(got.shape)} {got.dtype} vs saved {tuple(want.shape)} {want.dtype},"
                                  f" max |diff| {diff:.3g}")
    mine = {"compared": len(seen), "mismatched": mismatched, "unused_saved": sorted(set(saved) - seen),
            "max_abs_diff": max_diff, "zero3_partitioned": all(hasattr(p, "ds_tensor") for _, p in named)}
    record["lm_check"] = all_gather_object(mine)  # [rank 0's, rank 1's]


def make_val_shards(cfg: Any, work: Path) -> list[str]:
    """4 shards x 8 held-out samples (other indices than the 256 training ones), written by rank 0."""
    from mmscale.data import make_shapes_dataset
    from mmscale.training.engine import barrier

    val = work / "val"
    if _rank() == 0:
        make_shapes_dataset(val, 32, samples_per_shard=8, image_size=cfg.data.image_size, seed=7, prefix="val",
                            first_index=256)
    barrier()
    return [f"data.val_shards={val}"]


def check_early_stop_checkpoint(trainer: Any, record: dict) -> None:
    """Where the run stopped, and the callback state in the final checkpoint's rank-0 trainer state, loaded the way
    --resume loads it (weights_only)."""
    from mmscale.training import checkpoint

    record["trainer_step"] = trainer.step
    record["should_stop"] = trainer.should_stop
    if trainer.rank != 0:
        return
    ckpt = checkpoint.latest_checkpoint(trainer.ckpt_root)
    record["final_checkpoint"] = None if ckpt is None else ckpt.name
    if ckpt is not None:
        state = torch.load(ckpt / checkpoint.state_file(0), map_location="cpu", weights_only=True)
        record["checkpoint_step"] = state["step"]
        record["checkpoint_callbacks"] = state["callbacks"]


def count_recompute(trainer: Any, record: dict) -> None:
    """Count the calls of the first decoder layer's MLP (a forward pre-hook) while training: once per micro batch,
    twice with activation checkpointing (the backward recomputes the layer; transformers checkpoints the layer's
    `forward`, so the layer's own hooks run once either way, its submodules' twice). Also count the modules that
    checkpoint."""
    calls = record["mlp0_calls"] = [0]
    mlp = trainer.engine.module.xattn_layers()[0].decoder_layer.mlp
    record["_hook"] = mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    record["checkpointing_layers"] = sum(bool(getattr(m, "gradient_checkpointing", False))
                                         for m in trainer.engine.module.modules())


def stop_counting(trainer: Any, record: dict) -> None:
    record.pop("_hook").remove()
    record["mlp0_calls"] = record["mlp0_calls"][0]


# two instances of one callback: each keeps its own state in the checkpoint
EARLY_STOPPING = ("callbacks=[{name: early_stopping, args: {metric: val_loss, patience: 2, min_delta: 100.0}}, "
                  "{name: early_stopping, args: {metric: val_loss, patience: 50}}]")


@dataclass
class Variant:
    name: str
    overrides: list[str]
    same_init: bool = True
    """Start from the saved initial weights (see the module doc)."""
    before: Callable[[Any, Path], list[str]] | None = None
    """(cfg, work dir) -> more overrides; runs on every rank before the build (collectives allowed)."""
    after_build: Callable[[Any, dict], None] | None = None
    """(trainer, record): after the build, before training (collectives allowed)."""
    after_train: Callable[[Any, dict], None] | None = None
    """(trainer, record): after training, before the teardown."""


VARIANTS = [
    Variant("zero0", ["deepspeed.zero_stage=0"]),
    Variant("zero1", ["deepspeed.zero_stage=1"]),
    Variant("zero2", ["deepspeed.zero_stage=2"]),
    Variant("zero2_offload_opt", ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu"]),
    Variant("zero3", ["deepspeed.zero_stage=3"], after_build=count_recompute, after_train=stop_counting),
    Variant("zero3_offload_opt", ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu"]),
    Variant("zero3_offload_params", ["deepspeed.zero_stage=3", "deepspeed.offload_params=cpu"]),
    Variant("zero3_act_ckpt", ["deepspeed.zero_stage=3", "model.activation_checkpointing=true"],
            after_build=count_recompute, after_train=stop_counting),
    Variant("bf16", ["deepspeed.zero_stage=3", "train.precision=bf16"]),
    Variant("lm_path", ["deepspeed.zero_stage=3"], same_init=False, before=save_reference_lm,
            after_build=check_loaded_lm),
    Variant("early_stopping", ["deepspeed.zero_stage=3", "train.max_steps=10", "train.eval_every=1",
                               "train.eval_batches=2", EARLY_STOPPING],
            same_init=False, before=make_val_shards, after_train=check_early_stop_checkpoint),
]


# ----------------------------------------------------------------------------------------------- one variant


def run_variant(v: Variant, base_overrides: list[str], work: Path) -> dict[str, Any]:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    from mmscale.job.build import build_trainer
    from mmscale.training.engine import all_gather_object

    record: dict[str, Any] = {"overrides": v.overrides}
    t0 = time.perf_counter()
    overrides = [*base_overrides, *COMMON, f"output_dir={work / v.name}", *v.overrides]
    if v.same_init:
        overrides.append(initial_weights(work))
    trainer = None
    try:
        if v.before is not None:
            overrides += v.before(load_config(TINY, overrides), work)
        trainer = build_trainer(load_config(TINY, overrides))
        record["build_s"] = round(time.perf_counter() - t0, 2)
        record["param_dtypes"] = all_gather_object(param_dtypes(trainer.engine.module))  # per rank
        record["zero_stage_built"] = trainer.engine.ds.zero_optimization_stage()
        opt = trainer.engine.ds.optimizer  # DeepSpeed's ZeRO optimizer, or ours at stage 0
        record["offload_built"] = {"optimizer": bool(getattr(opt, "cpu_offload", False)  # stages 1-2
                                                     or getattr(opt, "offload_optimizer", False)),  # stage 3
                                   "params": bool(getattr(opt, "offload_param", False))}
        for cb in trainer.callbacks:
            if isinstance(cb, InitialWeights):
                record["native_init"] = cb.native_init
        if v.after_build is not None:
            v.after_build(trainer, record)
        t1 = time.perf_counter()
        record["history"] = trainer.train()
        record["train_s"] = round(time.perf_counter() - t1, 2)
        if v.after_train is not None:
            v.after_train(trainer, record)
    except Exception as e:  # recorded: this feature's test fails with it, the other variants still run
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc()[-6000:]
    finally:
        if trainer is not None:
            trainer.engine.ds.destroy()
            del trainer
        gc.collect()
        record["hf_zero3_leaked"] = is_deepspeed_zero3_enabled()
        unset_hf_deepspeed_config()  # see "Between variants" in the module doc
        record["hf_zero3_after"] = is_deepspeed_zero3_enabled()
        record["wall_s"] = round(time.perf_counter() - t0, 2)
    return record


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--work", default="", help="parent of the variants' output_dirs (default: OUT_JSON's folder)")
    p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_intermixed_args()

    from mmscale.job.build import close
    from mmscale.training.engine import init_distributed

    rank, world = init_distributed()
    work = Path(args.work) if args.work else Path(args.out).resolve().parent / "matrix"
    work.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.only.split(",")))
    if only - {v.name for v in VARIANTS}:
        raise SystemExit(f"--only: unknown {sorted(only - {v.name for v in VARIANTS})}; known: "
                         f"{[v.name for v in VARIANTS]}")
    t0 = time.perf_counter()
    save_initial_weights(load_config(TINY, [*args.overrides, f"output_dir={work}"]), work / "initial_weights.pt")
    results: dict[str, Any] = {}
    for v in VARIANTS:
        if only and v.name not in only:
            continue
        results[v.name] = r = run_variant(v, args.overrides, work)
        if rank == 0:
            print(f"[run_matrix] {v.name}: {r['wall_s']} s (build {r.get('build_s')} s, train {r.get('train_s')} s)"
                  + (f"  ERROR {r['error']}" if "error" in r else ""), flush=True)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"world_size": world, "wall_s": round(time.perf_counter() - t0, 2),
                                              "variants": results}, indent=1, default=str))
    close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
