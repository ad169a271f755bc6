"""The `ewc` callback: arguments and config checked; in real DeepSpeed jobs on a class-incremental digits sequence
({0, 1} then {2, 3}), the penalty taken on each rank's ZeRO-3 partitions equals the one-process penalty, lam=0
leaves training exactly as it is without the callback (the Fisher pass leaves DeepSpeed's state alone), the ZeRO 0-2
path (penalty in the loss) matches too, and a run resumed in the middle of task 2 continues as if never stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_classification import two_digit_tasks
from test_training import ROOT, RUN_TINY, launch, tiny_data  # noqa: F401  (tiny_data is a fixture)

STEPS = 6  # per task: steps 1-6 task a, 7-12 task b; the Fisher of task a is taken after step 6
LAM = 100.0


def _ewc(lam: float) -> str:
    return f"callbacks=[{{name: ewc, args: {{lam: {lam}, fisher_batches: 4}}}}]"


@pytest.fixture(scope="module")
def digits(tiny_data, tmp_path_factory):  # noqa: F811
    """Two class-incremental tasks of real digits and the overrides every run here shares (global batch 16, two
    accumulation steps at every world size: micro batch 8 x 1 rank or 4 x 2 ranks)."""
    root = tmp_path_factory.mktemp("ewc_digits")
    tokenizer = next(a for a in tiny_data if a.startswith("data.tokenizer="))
    common = [tokenizer, *two_digit_tasks(root, STEPS), "train.lr=1e-2", "train.warmup_steps=1",
              "train.checkpoint_every=0", "train.global_batch_size=16", "train.eval_batches=2", "data.num_workers=0",
              "deepspeed.stage3_param_persistence_threshold=0", "--same-global-batches"]
    return root, common


def _run(out: Path, common: list[str], nprocs: int, *extra: str) -> dict:
    """A run_tiny job; returns its record with `loss` (classification loss) and `penalty` per step."""
    micro = 8 // nprocs
    launch(RUN_TINY, [str(out.with_suffix(".json")), f"output_dir={out}", *common,
                      f"train.micro_batch_size={micro}", *extra], nprocs=nprocs)
    r = json.loads(out.with_suffix(".json").read_text())
    r["loss"] = {h["step"]: h["cls_loss"] for h in r["history"] if "cls_loss" in h}
    r["grad_norm"] = {h["step"]: h["grad_norm"] for h in r["history"] if "grad_norm" in h}
    r["penalty"] = {m["step"]: m["ewc_penalty"] for m in r["step_metrics"] if "ewc_penalty" in m}
    return r


@pytest.fixture(scope="module")
def two_ranks(digits, tmp_path_factory):
    """2 ranks under ZeRO-3 with ewc (lam=LAM): the reference the slow tests below compare against."""
    root, common = digits
    return _run(tmp_path_factory.mktemp("ewc_runs") / "two", common, 2, "deepspeed.zero_stage=3", _ewc(LAM))


# ----------------------------------------------------------------------------------------------- fast


def test_ewc_arguments_and_config_are_checked():
    from mmscale.callbacks import CALLBACKS
    from mmscale.config import ConfigError
    from mmscale.job.preflight import load_config

    ewc = CALLBACKS["ewc"]
    cb = ewc(lam=5, mode="online", gamma=0.9, fisher_batches=2)
    assert (cb.lam, cb.mode, cb.gamma, cb.fisher_batches) == (5.0, "online", 0.9, 2)
    for args, message in (({}, "lam: missing"),
                          ({"lam": -1.0}, "lam=-1.0: the EWC strength must be a finite number >= 0"),
                          ({"lam": "big"}, "lam='big'"),
                          ({"lam": 1, "mode": "offline"}, "mode='offline': must be one of separate, online"),
                          ({"lam": 1, "gamma": 0.5}, "gamma=0.5 with mode='separate'"),
                          ({"lam": 1, "mode": "online", "gamma": 1.5}, "gamma=1.5: must be a number in [0, 1]"),
                          ({"lam": 1, "fisher_batches": 0}, "fisher_batches=0: must be an integer >= 1"),
                          ({"lam": 1, "fisher_batches": True}, "fisher_batches=True"),
                          ({"lam": 1, "fisher_batches": 2.5}, "fisher_batches=2.5")):
        with pytest.raises(ValueError) as e:
            ewc(**args)
        assert message in str(e.value), (args, str(e.value))
    # in a job config: the arguments, and a task sequence to work on
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/tiny.yaml", ["callbacks=[{name: ewc, args: {lam: 1}}, "
                                                 "{name: ewc, args: {lam: -2}}]"], check_paths=False)
    text = "\n".join(e.value.problems)
    assert "callbacks[0] (ewc): continual.tasks: empty; ewc keeps what each task of a task sequence learned" in text
    assert "callbacks[1].args (ewc): {'lam': -2}: lam=-2" in text
    tasks = "continual.tasks=[{name: a, train_shards: x, val_shards: y, max_steps: 10}]"
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/tiny.yaml", [tasks, "data.tokenizer=t", "callbacks=[{name: ewc, args: {lam: 1}}]"],
                    check_paths=False)
    assert "callbacks[0] (ewc): continual.tasks: 1 task (a); ewc acts from the second task on" in \
        "\n".join(e.value.problems)
    two = "continual.tasks=[{name: a, train_shards: x, val_shards: y, max_steps: 5}, " \
          "{name: b, train_shards: x, val_shards: y, max_steps: 5}]"
    load_config(ROOT / "configs/tiny.yaml", [two, "data.tokenizer=t", "callbacks=[{name: ewc, args: {lam: 1}}]"],
                check_paths=False)  # a task sequence: accepted


def test_ewc_state_round_trips_and_refuses_another_world_size(tmp_path):
    """The callback's state holds tensors and plain values (loads with weights_only=True), with its rank and world
    size; a state saved by another world size or rank is refused, a restored one gives the same penalty."""
    from mmscale.callbacks import CALLBACKS
    from mmscale.continual.ewc import FisherAccumulator

    cb = CALLBACKS["ewc"](lam=2.0)
    slots = [torch.randn(3, 2), torch.randn(5)]
    acc = FisherAccumulator(slots)
    acc.add([torch.randn(3, 2), torch.randn(5)], batch_size=4)
    cb.state.consolidate(slots, acc.result())
    torch.save(cb.state_dict(), tmp_path / "s.pt")
    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    assert (saved["rank"], saved["world_size"]) == (0, 1)  # no process group here: rank 0 of 1
    moved = [s + 0.1 for s in slots]
    back = CALLBACKS["ewc"](lam=2.0)
    back.load_state_dict(saved)
    assert float(back.state.penalty(moved)) == pytest.approx(float(cb.state.penalty(moved)), rel=1e-12)
    assert float(back.state.penalty(moved)) > 0
    with pytest.raises(ValueError, match="saved by 2 ranks, this run has 1: .* resume with 2 ranks"):
        CALLBACKS["ewc"](lam=2.0).load_state_dict({**saved, "world_size": 2})
    with pytest.raises(ValueError, match="rank 0 was given the state of rank 1"):
        CALLBACKS["ewc"](lam=2.0).load_state_dict({**saved, "rank": 1})
    with pytest.raises(ValueError, match="resume with mode='separate'"):
        CALLBACKS["ewc"](lam=2.0, mode="online").load_state_dict(saved)


# ----------------------------------------------------------------------------------------------- DeepSpeed jobs


@pytest.mark.slow
def test_ewc_on_zero3_partitions_matches_one_process(two_ranks, digits, tmp_path):
    """The same global batches, Fisher batches included: 2 ranks under ZeRO-3 (each adding the penalty gradient
    to its own gradient partitions, nothing gathered) against 1 process, where a partition is the whole parameter.
    The losses and the logged penalty (the ranks' shares summed) agree; the penalty is 0 while task a trains and at
    task b's first step (the weights are the anchor), and > 0 after."""
    root, common = digits
    one = _run(tmp_path / "one", common, 1, "deepspeed.zero_stage=3", _ewc(LAM))
    steps = list(range(1, 2 * STEPS + 1))
    assert sorted(two_ranks["loss"]) == sorted(one["loss"]) == sorted(two_ranks["penalty"]) == steps
    # tolerance: fp32 with another reduction order, as in test_two_rank_zero3_matches_single_process
    assert [two_ranks["loss"][s] for s in steps] == pytest.approx([one["loss"][s] for s in steps], rel=1e-4)
    assert [two_ranks["penalty"][s] for s in steps] == pytest.approx([one["penalty"][s] for s in steps], rel=1e-4)
    assert all(two_ranks["penalty"][s] == 0.0 for s in range(1, STEPS + 2)), two_ranks["penalty"]
    assert all(two_ranks["penalty"][s] > 0.01 for s in range(STEPS + 2, 2 * STEPS + 1)), str(two_ranks["penalty"])
    rows = [h["R_row_val_acc"] for h in two_ranks["history"] if "R_row_val_acc" in h]
    assert len(rows) == 2 and rows[0][1] == 0.0  # the sequence ran: task b's classes masked while task a trained


@pytest.mark.slow
def test_ewc_lam0_trains_exactly_as_without_it(two_ranks, digits, tmp_path):
    """lam=0 on 2 ranks under ZeRO-3, two accumulation steps: the Fisher pass after task a (forward and backward at
    a forced accumulation boundary, gradients cleared, no optimizer step) and the zero penalty gradient added to
    every step of task b leave every loss and gradient norm bit for bit as in a run without the callback. And the
    penalty does act: with lam=LAM task b's losses move far beyond the tolerance the test above compares with."""
    root, common = digits
    zero = _run(tmp_path / "zero", common, 2, "deepspeed.zero_stage=3", _ewc(0.0))
    none = _run(tmp_path / "none", common, 2, "deepspeed.zero_stage=3")
    steps = list(range(1, 2 * STEPS + 1))
    assert sorted(zero["loss"]) == sorted(none["loss"]) == steps
    assert [zero["loss"][s] for s in steps] == [none["loss"][s] for s in steps]
    assert [zero["grad_norm"][s] for s in steps] == [none["grad_norm"][s] for s in steps]
    assert all(zero["penalty"][s] == 0.0 for s in steps) and "ewc_penalty" not in none["step_metrics"][0]
    first = range(1, STEPS + 2)  # up to task b's first step, lam does not matter
    assert [two_ranks["loss"][s] for s in first] == [zero["loss"][s] for s in first]
    moved = [abs(two_ranks["loss"][s] / zero["loss"][s] - 1) for s in range(STEPS + 2, 2 * STEPS + 1)]
    assert max(moved) > 1e-2, moved


@pytest.mark.slow
def test_ewc_whole_weights_zero2_matches_one_process(digits, tmp_path):
    """ZeRO 0-2 (every rank holds the weights): the penalty goes into each micro batch's loss and the Fisher pass
    differentiates the module directly. 2 ranks under ZeRO-2 against 1 process at stage 0, the same batches."""
    root, common = digits
    two = _run(tmp_path / "two", common, 2, "deepspeed.zero_stage=2", _ewc(LAM))
    one = _run(tmp_path / "one", common, 1, "deepspeed.zero_stage=0", _ewc(LAM))
    steps = list(range(1, 2 * STEPS + 1))
    assert sorted(two["loss"]) == sorted(one["loss"]) == sorted(two["penalty"]) == steps
    assert [two["loss"][s] for s in steps] == pytest.approx([one["loss"][s] for s in steps], rel=1e-4)
    assert [two["penalty"][s] for s in steps] == pytest.approx([one["penalty"][s] for s in steps], rel=1e-4)
    assert all(two["penalty"][s] == 0.0 for s in range(1, STEPS + 2))
    assert all(two["penalty"][s] > 0.01 for s in range(STEPS + 2, 2 * STEPS + 1)), two["penalty"]


@pytest.mark.slow
def test_ewc_resumed_mid_task_b_continues_as_uninterrupted(two_ranks, digits, tmp_path):
    """2 ranks under ZeRO-3, stopped after step 9 (task b's third step, the Fisher of task a taken) and resumed:
    the EWC state comes back from each rank's checkpoint file, and steps 10-12 (losses, penalty) and the final R
    equal the uninterrupted run's."""
    from mmscale.training import checkpoint

    root, common = digits
    cut = tmp_path / "cut"
    first = _run(cut, common, 2, "deepspeed.zero_stage=3", _ewc(LAM), "--stop-at", str(STEPS + 3))
    assert sorted(first["loss"]) == list(range(1, STEPS + 4))
    ckpt = checkpoint.latest_checkpoint(cut / "checkpoints")
    assert ckpt is not None and ckpt.name == checkpoint.tag_for(STEPS + 3)
    for rank in (0, 1):  # each rank's own partitions' anchors and Fisher, with its rank and world size
        state = torch.load(ckpt / checkpoint.state_file(rank), map_location="cpu", weights_only=True)
        ewc = state["callbacks"]["0:ewc"]
        assert (ewc["rank"], ewc["world_size"], ewc["ewc"]["num_consolidated"]) == (rank, 2, 1)
        assert len(ewc["ewc"]["fishers"]) == 1 and sum(f.numel() for f in ewc["ewc"]["fishers"][0]) > 0
    resumed = _run(cut, common, 2, "deepspeed.zero_stage=3", _ewc(LAM), "--resume")
    rest = list(range(STEPS + 4, 2 * STEPS + 1))
    assert sorted(resumed["loss"]) == rest
    assert [resumed["loss"][s] for s in rest] == pytest.approx([two_ranks["loss"][s] for s in rest], abs=1e-9)
    assert [resumed["penalty"][s] for s in rest] == pytest.approx([two_ranks["penalty"][s] for s in rest], abs=1e-9)
    assert all(resumed["penalty"][s] > 0.01 for s in rest)  # the restored state acts
    full = [h["R_row_val_acc"] for h in two_ranks["history"] if "R_row_val_acc" in h]
    again = [h["R_row_val_acc"] for h in first["history"] + resumed["history"] if "R_row_val_acc" in h]
    assert again == full, (again, full)
