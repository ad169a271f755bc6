"""The `replay` and `distill` callbacks in real training: 2 DeepSpeed ranks under ZeRO-3 on real handwritten digits,
the buffer's share per rank, equal micro batches per rank, a resume that continues the same buffer, and the KL terms
against hand computations."""

from __future__ import annotations

import base64
import json
import math

import pytest
import torch
import torch.nn.functional as F

from mmscale.callbacks.continual import class_distill_loss, topk_distill_loss
from mmscale.config import ConfigError
from mmscale.job.preflight import load_config
from mmscale.continual.replay_buffer import ReservoirBuffer
from test_classification import two_digit_tasks
from test_training import ROOT, RUN_TINY, launch, tiny_data  # noqa: F401  (tiny_data is a fixture)


def test_replay_and_distill_arguments_and_config_are_checked():
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/tiny.yaml", ["callbacks=[{name: distill}, {name: replay, args: {capacity: 0}}]"],
                    check_paths=False)
    assert "capacity=0: the buffer's size over all ranks, an integer >= 1" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/tiny.yaml", ["callbacks=[{name: distill, args: {target: class}}]",
                                                 "train.micro_batch_size=4"], check_paths=False)
    text = str(e.value)
    assert "distill stores its logits with the replayed samples: add a replay callback" in text
    assert "target: 'class' distills the classification head's logits; add the classification objective" in text
    with pytest.raises(ConfigError, match=r"ratio 0.1 x train.micro_batch_size 4 rounds to no replayed sample"):
        load_config(ROOT / "configs/tiny.yaml", ["callbacks=[{name: replay, args: {capacity: 8, ratio: 0.1}}]"],
                    check_paths=False)
    with pytest.raises(ConfigError, match=r"balance: 'task' needs a task sequence"):
        load_config(ROOT / "configs/tiny.yaml", ["callbacks=[{name: replay, args: {capacity: 8, balance: task}}]"],
                    check_paths=False)


def test_class_distill_loss_is_kl_over_the_teachers_active_classes():
    torch.manual_seed(0)
    lowest = torch.finfo(torch.float32).min
    teacher = torch.randn(3, 6)
    teacher[:, 4:] = lowest  # classes 4, 5 were not active when the logits were stored
    student = torch.randn(3, 6, requires_grad=True)
    T = 2.0
    got = class_distill_loss(student, teacher, T)
    p = torch.softmax(teacher[:, :4] / T, -1)
    want = (p * (p.log() - torch.log_softmax(student[:, :4] / T, -1))).sum(-1) * T * T
    assert torch.allclose(got, want, atol=1e-6)
    got.sum().backward()
    assert torch.isfinite(student.grad).all() and (student.grad[:, 4:] == 0).all()  # no pull on new classes
    same = class_distill_loss(teacher[:, :4].clone(), teacher[:, :4], T)
    assert same.abs().max() < 1e-6  # zero when the model still says what it said


def test_topk_distill_loss_matches_a_hand_computation():
    torch.manual_seed(1)
    V, k, T = 10, 3, 1.5
    student = torch.randn(2, 4, V)
    teacher_full = torch.randn(2, 4, V)
    values, index = teacher_full.topk(k, dim=-1)
    index[1, 2:] = -1  # no token due at the last positions of row 1
    got = topk_distill_loss(student, values, index, T)
    for r in range(2):
        terms = []
        for pos in range(4):
            if index[r, pos, 0] < 0:
                continue
            p = torch.softmax(values[r, pos] / T, -1)
            logq = torch.log_softmax(student[r, pos] / T, -1)[index[r, pos]]
            terms.append(float((p * (p.log() - logq)).sum()) * T * T)
        assert math.isclose(float(got[r]), sum(terms) / len(terms), rel_tol=1e-5)


@pytest.mark.slow
def test_replay_two_ranks_share_the_buffer_and_resume_exactly(tiny_data, tmp_path):  # noqa: F811
    """Class-incremental digits {0,1} then {2,3}, 2 ranks under ZeRO-3, replay (capacity 37: 19 + 18 slots) with
    distillation. After the run: the ranks' buffers hold 37 samples in all, balanced over the two tasks; both ranks
    took the same number of micro batches and replayed the same number of samples (4 per micro batch from the
    second on); and a run stopped between the tasks (after task a's evaluation and checkpoint) and resumed ends with
    the same buffer, bit for bit, and the same R matrix as the uninterrupted run (mid-task: test_classification)."""
    steps, micro, k = 20, 8, 4
    tokenizer = next(a for a in tiny_data if a.startswith("data.tokenizer="))
    common = [tokenizer, *two_digit_tasks(tmp_path, steps, train_per_shard=40), "train.lr=3e-3",
              "train.warmup_steps=1", "train.checkpoint_every=5",
              "train.global_batch_size=16", f"train.micro_batch_size={micro}", "train.eval_batches=2",
              "data.num_workers=0", "deepspeed.stage3_param_persistence_threshold=0",
              "callbacks=[{name: replay, args: {capacity: 37, ratio: 0.5, balance: task}}, "
              "{name: distill, args: {weight: 1.0, temperature: 2.0}}]"]
    launch(RUN_TINY, [str(tmp_path / "full.json"), f"output_dir={tmp_path / 'full'}", *common], nprocs=2)
    launch(RUN_TINY, [str(tmp_path / "a.json"), f"output_dir={tmp_path / 'cut'}", "--stop-at", "20", *common],
           nprocs=2)
    launch(RUN_TINY, [str(tmp_path / "b.json"), f"output_dir={tmp_path / 'cut'}", "--resume", *common], nprocs=2)

    states = {}
    for run in ("full", "cut"):
        final = tmp_path / run / "checkpoints" / f"step_{2 * steps:08d}"
        assert final.is_dir(), sorted(p.name for p in (tmp_path / run / "checkpoints").iterdir())
        states[run] = [torch.load(final / f"trainer_state_rank{r}.pt", weights_only=True) for r in (0, 1)]
    full = states["full"]
    replay = [s["callbacks"]["0:replay"] for s in full]
    slots = [r["buffer"]["slots"] for r in replay]
    assert slots == [19, 18], slots  # each rank its share of 37
    micro_batches = 2 * steps  # per rank: grad_accum 1, 12 steps per task
    assert [s["samples_seen"] for s in full] == [16 * 2 * steps] * 2
    assert [r["buffer"]["seen"] for r in replay] == [micro * micro_batches] * 2  # every new sample was offered
    assert [r["replayed"] for r in replay] == [k * (micro_batches - 1)] * 2  # equal on both ranks
    groups = [{key: len(base64.b64decode(m)) // 8 for key, m in zip(r["buffer"]["groups"]["keys"],
                                                                      r["buffer"]["groups"]["members"])}
              for r in replay]
    assert all(abs(g["0"] - g["1"]) <= 1 for g in groups), groups  # balanced over the tasks
    for r in (0, 1):  # the resumed run's buffer is the uninterrupted one's: state, and every stored byte
        cut = states["cut"][r]["callbacks"]["0:replay"]["buffer"]
        for key in ("seen", "slots", "rng", "draw_rng", "groups"):  # (the index says where bytes lie: commits
            assert cut[key] == replay[r]["buffer"][key], (r, key)       # at other steps put them elsewhere)
        held = [list(ReservoirBuffer(tmp_path / run / "replay", 37, r, 2, seed=1234, balance="task").iter_all())
                for run in ("full", "cut")]
        assert len(held[0]) == [19, 18][r] and held[0] == held[1]
        assert all({"png", "cls", "task", "logits", "src_key"} <= set(s) for s in held[0])  # raw bytes + logits
    on_disk = [json.loads((tmp_path / "full" / "replay" / f"rank{r}" / "state.json").read_text()) for r in (0, 1)]
    assert [s["slots"] for s in on_disk] == [19, 18]
    R = {run: json.loads((tmp_path / run / "continual.json").read_text())["matrix"] for run in ("full", "cut")}
    assert sum(R["cut"], []) == pytest.approx(sum(R["full"], []), abs=1e-9), R
    assert R["full"][0][0] > 0.6, R  # task a was learned (what replay does to forgetting: the benchmark)
