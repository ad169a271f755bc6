"""No run is lost or mixed up: kill -9 at any point, damaged checkpoints, non-finite steps, resumes that must refuse.

Every run here is a real 2-rank DeepSpeed job (ZeRO-3 over gloo) on the tiny config, compared step by step with one
uninterrupted reference run of the same job.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mmscale.training import checkpoint
from test_training import ROOT, RUN_TINY, launch, losses, tiny_data  # noqa: F401  (tiny_data is a fixture)

STEPS = 8
COMMON = ["train.max_steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=10", "deepspeed.zero_stage=3",
          "train.warmup_steps=2"]


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):  # noqa: F811
    """The uninterrupted run: 8 steps, a checkpoint every 2 (all kept)."""
    tmp = tmp_path_factory.mktemp("reference")
    launch(RUN_TINY, [str(tmp / "full.json"), f"output_dir={tmp / 'run'}", *tiny_data, *COMMON], nprocs=2)
    full = losses(tmp / "full.json")
    assert sorted(full) == list(range(1, STEPS + 1))
    return tmp / "run", full


def _assert_same_trajectory(resumed: dict[int, float], full: dict[int, float], steps: range) -> None:
    assert sorted(resumed) == list(steps), resumed
    for step in steps:
        assert resumed[step] == pytest.approx(full[step], rel=1e-6), (step, resumed, full)


def _metrics_steps(run: Path) -> list[int]:
    """Steps of the raw metrics.jsonl training records, in file order (no de-duplication)."""
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@pytest.mark.slow
def test_kill9_one_rank_between_checkpoints(tiny_data, reference, tmp_path):  # noqa: F811
    """SIGKILL of rank 1 after step 5 (checkpoints at 2 and 4): the job dies; --resume continues from step 4 and
    steps 5-8 equal the uninterrupted run's; metrics.jsonl holds each step once."""
    _, full = reference
    run = tmp_path / "run"
    r = launch(RUN_TINY, [str(tmp_path / "a.json"), f"output_dir={run}", "--kill-after-step", "5", "--kill-rank",
                          "1", *tiny_data, *COMMON], nprocs=2, check=False, launcher="deepspeed")
    assert r.returncode != 0  # through the real `deepspeed` launcher: a rank's death ends the job
    assert checkpoint.latest_checkpoint(run / "checkpoints").name == "step_00000004"
    launch(RUN_TINY, [str(tmp_path / "b.json"), f"output_dir={run}", "--resume", *tiny_data, *COMMON], nprocs=2)
    _assert_same_trajectory(losses(tmp_path / "b.json"), full, range(5, STEPS + 1))
    assert _metrics_steps(run) == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_kill9_all_ranks_during_checkpoint_write(tiny_data, reference, tmp_path):  # noqa: F811
    """SIGKILL of every rank in the middle of step 6's checkpoint (shards written, state and manifest not): the
    half-written checkpoint is never loaded, the resume starts from step 4 and equals the uninterrupted run."""
    _, full = reference
    run = tmp_path / "run"
    r = launch(RUN_TINY, [str(tmp_path / "a.json"), f"output_dir={run}", "--kill-in-save", "6", *tiny_data,
                          *COMMON], nprocs=2, check=False)
    assert r.returncode != 0
    root = run / "checkpoints"
    assert (root / "step_00000006.partial").is_dir()
    assert checkpoint.latest_checkpoint(root).name == "step_00000004"
    launch(RUN_TINY, [str(tmp_path / "b.json"), f"output_dir={run}", "--resume", *tiny_data, *COMMON], nprocs=2)
    _assert_same_trajectory(losses(tmp_path / "b.json"), full, range(5, STEPS + 1))
    assert not (root / "step_00000006.partial").exists()
    assert checkpoint.verify(root / "step_00000008") == []


@pytest.mark.slow
def test_damaged_checkpoint_is_skipped_for_the_one_before(tiny_data, reference, tmp_path):  # noqa: F811
    """One flipped byte in the newest checkpoint, in a file only rank 1 hashes: both ranks skip it (a vote), it is
    set aside, and the resume from step 6 reproduces steps 7-8."""
    ref_run, full = reference
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    newest = run / "checkpoints/step_00000008"
    names = checkpoint.files_of(newest)
    victim = newest / names[1]  # rank 1's share: names[1::2]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert checkpoint.verify(newest, rank=0, world_size=2) == []  # rank 0 alone would not notice
    assert checkpoint.verify(newest, rank=1, world_size=2)
    r = launch(RUN_TINY, [str(tmp_path / "b.json"), f"output_dir={run}", "--resume", *tiny_data, *COMMON],
               nprocs=2)
    assert "damaged" in r.stderr + r.stdout
    assert (run / "checkpoints/step_00000008.corrupt").is_dir()
    _assert_same_trajectory(losses(tmp_path / "b.json"), full, range(7, STEPS + 1))


@pytest.mark.slow
def test_resume_refuses_a_changed_seed_and_a_missing_checkpoint(tiny_data, reference, tmp_path):  # noqa: F811
    ref_run, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    r = launch(ROOT / "launchers/train.py", ["--config", "configs/tiny.yaml", f"output_dir={run}", *tiny_data,
                                             *COMMON, "train.seed=99", "--resume"], nprocs=2, check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "train.seed: 1234 at the checkpoint, 99 now" in r.stderr
    # nothing to resume: an error with `--resume`, a fresh start with `--resume auto`
    empty = tmp_path / "empty"
    args = ["--config", "configs/tiny.yaml", f"output_dir={empty}", *tiny_data, "train.max_steps=2",
            "train.checkpoint_every=0"]
    r = launch(ROOT / "launchers/train.py", [*args, "--resume"], nprocs=1, check=False)
    assert r.returncode == 2 and "no complete checkpoint" in r.stderr, r.stderr[-3000:]
    launch(ROOT / "launchers/train.py", [*args, "--resume", "auto"], nprocs=1)
    assert _metrics_steps(empty) == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3, 0])
def test_nonfinite_steps_are_skipped_counted_and_rolled_back(tiny_data, tmp_path, stage):  # noqa: F811
    """Rank 1's loss is NaN in attempts 3 and 6-8: attempt 3 is skipped on both ranks, and the three in a row roll
    back to the step-6 checkpoint at half the learning rate; the run then finishes finitely. ZeRO-3 skips through
    DeepSpeed's own check of the gradient norm, stage 0 (fp32) through mmscale's optimizer."""
    from mmscale.job.preflight import load_config
    from mmscale.training.engine import lr_lambda

    run = tmp_path / "run"
    overrides = [*tiny_data, *COMMON, "train.max_steps=10", f"deepspeed.zero_stage={stage}"]
    r = launch(RUN_TINY, [str(tmp_path / "nan.json"), f"output_dir={run}", "--nan-at-steps", "3,6,7,8", *overrides],
               nprocs=2)
    assert "rolled back to step_00000006" in r.stderr + r.stdout
    views = [json.loads((tmp_path / name).read_text()) for name in ("nan.json", "nan.rank1.json")]
    for v in views:  # every rank counted the same
        assert v["nonfinite_steps"] == 4 and v["rollbacks"] == 1 and v["lr_scale"] == 0.5
    train = [h for h in views[0]["history"] if "samples_per_s" in h]  # training records (log_every=1)
    assert train[-1]["step"] == 10
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in train if "loss" in h)
    # the skipped step logs no loss, is counted from then on, and did not advance the schedule (no optimizer step)
    third = train[2]
    assert third["step"] == 3 and "loss" not in third and third["nonfinite_steps"] == 1
    assert train[1]["nonfinite_steps"] == 0 and "loss" in train[3]
    assert third["lr"] == train[1]["lr"]
    # the engine's learning rate, against the schedule: steps 1, 2, 4, 5 applied (4 schedule steps) before the
    # checkpoint at 6; after the rollback, step 7 is the 5th applied step, at half the rate
    cfg = load_config(ROOT / "configs/tiny.yaml", overrides)
    f = lr_lambda(cfg)
    step5 = next(h for h in train if h["step"] == 5 and h["rollbacks"] == 0)
    step7 = next(h for h in train if h["step"] == 7 and h["rollbacks"] == 1)
    assert step5["lr"] == pytest.approx(cfg.train.lr * f(4), rel=1e-9)
    assert step7["lr"] == pytest.approx(0.5 * cfg.train.lr * f(5), rel=1e-9)
