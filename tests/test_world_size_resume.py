"""Resume on another world size (mmscale.training.reshard): a 2-rank ZeRO-3 run resumed on 1 rank, a 1-rank run on 2.

What must carry over exactly: the fp32 master weights, Adam's moments and step, the step count and the learning-rate
schedule. Checked twice:
- at the resume, before any step, on every new rank: this rank's slice of every trainable parameter's fp32 master
  weight, exp_avg and exp_avg_sq equals (bit for bit) the saved one, consolidated here from the saved ranks' own
  optimizer files (not through DeepSpeed's converter); each parameter group's weight decay and Adam step, the
  trainer's step and the learning rate are the saved ones;
- after it: steps 5-8 at the new size match the uninterrupted run at the old size (rel 1e-4), both fed the same
  global batches (`SameGlobalBatches`), the principle of test_training.py::test_two_rank_zero3_matches_single_process
  (2 ranks x micro 4 = 1 rank x micro 4 x 2 accumulation steps up to reduction order). With the same weights,
  moments, step and schedule, the new size's steps are the old size's up to that order; any of them carried wrong
  (a lost moment, the other group's weight decay, a step counted twice) moves the loss by far more than 1e-4.
The data position on another world size is checked in-process (`test_data_position_*`): every sample of the epoch
is seen, repeats only where the new rank count does not divide the rest into whole batches (README, Data).

This file is also the driver the slow tests start (`python tests/test_world_size_resume.py OUT ...` or under
`deepspeed --num_gpus N`).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_training import tiny_data  # noqa: E402,F401  (a fixture: 4 shards of 64 and a tokenizer)

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["train.max_steps=8", "train.checkpoint_every=4", "train.keep_checkpoints=10", "deepspeed.zero_stage=3",
          "train.precision=fp32", "train.global_batch_size=8", "train.micro_batch_size=4", "train.warmup_steps=2"]


# ----------------------------------------------------------------------------------------------- the saved state


def saved_optimizer_state(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every trainable parameter's whole fp32 weight, exp_avg and exp_avg_sq, from a ZeRO-3 checkpoint's per-rank
    optimizer files (each rank: per group, a flat vector of its partitions, ceil(numel / world) each)."""
    from mmscale.training.zero_checkpoint import safe_load

    optim = sorted(ckpt.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=lambda p: int(p.name.split("_")[3]))
    shapes = safe_load(ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt")["param_shapes"]
    ranks = [safe_load(f)["optimizer_state_dict"] for f in optim]
    world = len(ranks)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for g, group in enumerate(shapes):
        flats = {"fp32": [r["fp32_flat_groups"][g] for r in ranks],
                 "exp_avg": [r["optimizer_state_dict"]["state"][g]["exp_avg"] for r in ranks],
                 "exp_avg_sq": [r["optimizer_state_dict"]["state"][g]["exp_avg_sq"] for r in ranks]}
        offset = 0
        for name, shape in group.items():
            numel = int(torch.Size(shape).numel())
            part = math.ceil(numel / world)
            out[name] = {k: torch.cat([f[offset:offset + part] for f in fl])[:numel] for k, fl in flats.items()}
            offset += part
    return out


def check_engine_against(trainer, ckpt: Path) -> dict[str, float]:
    """On this rank, after the resume: the largest difference between what the engine holds and the checkpoint."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    from mmscale.training.zero_checkpoint import safe_load

    saved = saved_optimizer_state(ckpt)
    ds = trainer.engine.ds
    rank = dist.get_rank()
    diffs = {"fp32": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    checked = 0
    for name, p in ds.module.named_parameters():
        if not p.requires_grad:
            continue
        part = p.ds_tensor.numel()
        valid = max(0, min(part, p.ds_numel - rank * part))
        got = {"fp32": safe_get_local_fp32_param(p), "exp_avg": safe_get_local_optimizer_state(p, "exp_avg"),
               "exp_avg_sq": safe_get_local_optimizer_state(p, "exp_avg_sq")}
        for key, t in got.items():
            want = saved[name][key][rank * part:rank * part + valid]
            diffs[key] = max(diffs[key], float((t.flatten()[:valid] - want).abs().max()) if valid else 0.0)
        checked += 1
    base = ds.optimizer.optimizer
    old = safe_load(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
    old_base = old["optimizer_state_dict"]
    return {**diffs, "params_checked": checked, "params_saved": len(saved), "step": trainer.step,
            "lr": trainer.engine.lr,
            "weight_decay": [g["weight_decay"] for g in base.param_groups],
            "saved_weight_decay": [g["weight_decay"] for g in old_base["param_groups"]],
            "adam_step": [float(base.state[f]["step"]) for f in ds.optimizer.fp32_partitioned_groups_flat],
            "saved_adam_step": [float(s["step"]) for s in old_base["state"].values()],
            "step_tensors_distinct": len({id(base.state[f]["step"])
                                          for f in ds.optimizer.fp32_partitioned_groups_flat})}


# ----------------------------------------------------------------------------------------------- the driver


def main() -> int:
    import argparse
    import logging
    import os

    from dist.run_tiny import SameGlobalBatches

    from mmscale.job.preflight import load_config
    from mmscale.data import TrainLoader, load_tokenizer
    from mmscale.training import checkpoint
    from mmscale.job.build import build_trainer, close
    from mmscale.training.engine import init_distributed

    class Batches(SameGlobalBatches):  # the loader's layout never changes (world 1): its position moves as it is
        def load_state_dict(self, sd, all_ranks=None):
            self.loader.load_state_dict(sd)

    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_intermixed_args()
    cfg = load_config(ROOT / "configs/tiny.yaml", args.overrides)
    rank, world = init_distributed()
    accum = cfg.train.global_batch_size // (cfg.train.micro_batch_size * world)
    loader = TrainLoader(cfg.data, load_tokenizer(cfg.data.tokenizer), cfg.train.global_batch_size, rank=0,
                         world_size=1, seed=cfg.train.seed, shards=cfg.data.train_shards, keep_raw=True)
    ckpt = checkpoint.latest_checkpoint(Path(cfg.output_dir) / "checkpoints") if args.resume else None
    trainer = build_trainer(cfg, resume="required" if args.resume else None,
                            train_data=Batches(loader, cfg.train.micro_batch_size, rank, world, accum))
    checks = check_engine_against(trainer, ckpt) if args.resume else {}
    history = trainer.train()
    out = Path(args.out) if rank == 0 else Path(args.out).with_suffix(f".rank{rank}.json")
    out.write_text(json.dumps({"world_size": world, "history": history, "checks": checks}))
    close()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


# ----------------------------------------------------------------------------------------------- slow tests


def _losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in json.loads(path.read_text())["history"] if "loss" in r}


def _resume_elsewhere(tiny_data, tmp_path: Path, old: int, new: int) -> None:
    from test_training import launch

    from mmscale.training import checkpoint

    me = Path(__file__)
    run = tmp_path / "run"
    launch(me, [str(tmp_path / "full.json"), f"output_dir={run}", *tiny_data, *COMMON], nprocs=old)
    full = _losses(tmp_path / "full.json")
    assert sorted(full) == list(range(1, 9))
    # the same run, as if it had stopped after step 4's checkpoint
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints/step_00000008")
    ckpt = checkpoint.latest_checkpoint(cut / "checkpoints")
    assert ckpt.name == "step_00000004"
    launch(me, [str(tmp_path / "resumed.json"), f"output_dir={cut}", "--resume", *tiny_data, *COMMON], nprocs=new)
    outs = [tmp_path / "resumed.json", *(tmp_path / f"resumed.rank{r}.json" for r in range(1, new))]
    for out in outs:  # the state each new rank starts from: the saved one, exactly
        c = json.loads(out.read_text())["checks"]
        assert c["params_checked"] == c["params_saved"] > 0, c
        assert c["fp32"] == c["exp_avg"] == c["exp_avg_sq"] == 0.0, c
        assert c["step"] == 4 and c["adam_step"] == c["saved_adam_step"] == [4.0, 4.0], c
        assert c["weight_decay"] == c["saved_weight_decay"] and c["step_tensors_distinct"] == 2, c
    resumed = _losses(tmp_path / "resumed.json")
    assert sorted(resumed) == [5, 6, 7, 8], resumed
    # Tolerance: as test_two_rank_zero3_matches_single_process, fp32 with another reduction order (gloo's
    # reduce-scatter vs local accumulation), ~1e-7 relative per step, amplified by Adam; stated bound 1e-4.
    worst = max(abs(resumed[s] / full[s] - 1) for s in (5, 6, 7, 8))
    print(f"{old} -> {new} ranks: steps 5-8 {[resumed[s] for s in (5, 6, 7, 8)]} vs {[full[s] for s in (5, 6, 7, 8)]}"
          f", largest relative difference {worst:.2e}")
    for step in (5, 6, 7, 8):
        assert resumed[step] == pytest.approx(full[step], rel=1e-4), (step, resumed, full)
    assert not (cut / "checkpoints/.universal").exists()  # the converted copy is gone
    assert json.loads((cut / "checkpoints/step_00000008/manifest.json").read_text())["world_size"] == new


@pytest.mark.slow
def test_two_rank_zero3_run_resumes_on_one_rank(tiny_data, tmp_path):  # noqa: F811
    _resume_elsewhere(tiny_data, tmp_path, old=2, new=1)


@pytest.mark.slow
def test_one_rank_zero3_run_resumes_on_two_ranks(tiny_data, tmp_path):  # noqa: F811
    _resume_elsewhere(tiny_data, tmp_path, old=1, new=2)


# ----------------------------------------------------------------------------------------------- trainer state (fast)


def _trainer_state(rank: int, data: dict, step: int = 5, **kw) -> dict:
    from mmscale.training.trainer import rng_state

    return {"step": step, "samples_seen": 40, "tokens_seen": 400, "data_skipped": 1 + rank,
            "data_skipped_by_kind": {"corrupt": 1 + rank}, "nonfinite_steps": 0, "lr_scale": 1.0, "data": data,
            "callbacks": kw.get("callbacks", {"0:lora": {}}), "rng": rng_state(), "task_rows": []}


@pytest.mark.parametrize("old,new,repeats", [(2, 1, 0), (1, 2, 4)])
def test_data_position_moves_through_the_merged_trainer_state(shapes_shards, sp_tokenizer, old, new, repeats):
    """What each new rank's loader gets from `merge_trainer_states` (its own position and every saved rank's):
    the epoch's samples, none lost; repeats only where the new rank count does not divide the rest into whole
    batches (1 -> 2 ranks after 5 of 8 batches: the 4 samples of the half batch rounded away, README, Data)."""
    import collections

    from test_data_resume import MICRO, data_cfg, keys, run, shard_keys

    from mmscale.data import TrainLoader
    from mmscale.training.reshard import merge_trainer_states

    stop = 3 if old == 2 else 5
    olds = [run(TrainLoader(data_cfg(num_workers=1), sp_tokenizer, MICRO, r, old, seed=5, shards=str(shapes_shards)),
                stop) for r in range(old)]
    seen = collections.Counter(k for batches, _ in olds for k in keys(batches))
    states = [_trainer_state(r, st[-1]) for r, (_, st) in enumerate(olds)]
    steps = []
    for rank in range(new):
        merged, problems = merge_trainer_states(states, rank, new, seed=5, global_callbacks=set())
        assert problems == [] and merged["resharded_from"] == old
        loader = TrainLoader(data_cfg(num_workers=1), sp_tokenizer, MICRO, rank, new, seed=5, shards=str(shapes_shards))
        loader.load_state_dict(merged["data"], all_ranks=merged["data_all_ranks"])
        got, after = run(loader, loader.steps_per_epoch - loader.batch_in_epoch)
        assert after[-1]["epoch"] == 1 and after[-1]["batch_in_epoch"] == 0
        steps.append(len(got))
        seen.update(keys(got))
    assert len(set(steps)) == 1  # every rank steps as often
    all_keys = set().union(*shard_keys(shapes_shards).values())
    assert set(seen) == all_keys  # nothing lost
    assert sum(seen.values()) - len(all_keys) == repeats, seen.most_common(6)


def test_merged_trainer_state_counts_seeds_and_callbacks():
    """Counters kept once (their sums on rank 0), RNG seeded per (seed, step, rank), callbacks moved or named."""
    import random

    from mmscale.training.reshard import merge_trainer_states
    from mmscale.training.trainer import set_rng_state

    states = [_trainer_state(r, {"rank": r}, callbacks={"0:lora": {}, "1:early_stopping": {"best": 2.0},
                                                         "2:replay": {"buffer": {"rank": r}}}) for r in range(2)]
    merged = [merge_trainer_states(states, r, 3, seed=7, global_callbacks={"1:early_stopping"}) for r in range(3)]
    (m0, problems), (m1, _), (m2, _) = merged
    assert [m["data_skipped"] for m, _ in merged] == [3, 0, 0]
    assert [m["data_skipped_by_kind"]["corrupt"] for m, _ in merged] == [3, 0, 0]
    assert [m["data"]["rank"] for m, _ in merged] == [0, 1, 0] and m2["data_all_ranks"] == [{"rank": 0}, {"rank": 1}]
    assert m0["step"] == m2["step"] == 5 and m1["callbacks"]["1:early_stopping"] == {"best": 2.0}
    assert len(problems) == 1 and "callback 'replay' (callbacks[2]) keeps state per rank" in problems[0]
    draws = []
    for m in (m0, m1, merge_trainer_states(states, 0, 3, seed=7, global_callbacks=set())[0]):
        set_rng_state(m["rng"])
        draws.append((random.random(), float(torch.rand(()))))
    assert draws[0] != draws[1] and draws[0] == draws[2]  # per rank, and the same again for the same rank


def test_trainer_refuses_what_cannot_move(tmp_path):
    """Another world size is refused, with the reason, for ZeRO stages other than 3, for data that cannot spread its
    position (a task sequence) and for a callback with state per rank (named)."""
    from types import SimpleNamespace

    from mmscale.training import checkpoint
    from mmscale.training.trainer import Trainer

    class Sequence:  # like mmscale.continual.sequence.TaskSequence
        def load_state_dict(self, sd):
            pass

    class Replay:
        name = "replay"

    for r in range(2):
        torch.save(_trainer_state(r, {"rank": r}, callbacks={"0:replay": {"buffer": {"rank": r}}}),
                   tmp_path / checkpoint.state_file(r))
    me = SimpleNamespace(cfg=SimpleNamespace(deepspeed=SimpleNamespace(zero_stage=2), train=SimpleNamespace(seed=0)),
                         callbacks=[Replay()], rank=0, world_size=1, train_data=Sequence())
    _, problems = Trainer._state_from_other_world(me, tmp_path, 2)
    text = "\n".join(problems)
    assert len(problems) == 3 and all(p.startswith(f"{tmp_path.name} was saved by 2 ranks, this run has 1: ")
                                      for p in problems)
    assert "callback 'replay'" in text and "deepspeed.zero_stage=2" in text and "Sequence" in text
    assert text.count("resume with 2 rank(s)") == 3


if __name__ == "__main__":
    sys.exit(main())
