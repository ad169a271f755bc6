"""Training on real DeepSpeed engines: 2 CPU ranks over gloo (ZeRO-3) against 1 process; resume; the launcher."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmscale.training import checkpoint
from procgroup import run_group

ROOT = Path(__file__).resolve().parents[1]
RUN_TINY = ROOT / "tests/dist/run_tiny.py"
RANKS = ROOT / "tests/dist/ranks.py"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, args: list[str], nprocs: int, timeout: int = 600, check: bool = True,
           env: dict[str, str] | None = None, launcher: str = "ranks") -> subprocess.CompletedProcess:
    """N real ranks over gloo, or, for one process, plain `python script args`.

    `launcher="ranks"` starts them as `deepspeed --num_gpus N` does, without its two DeepSpeed-importing launcher
    processes (tests/dist/ranks.py: about 8 s less per job); `launcher="deepspeed"` runs the real
    `deepspeed --num_gpus N script args`, as the README does.

    The job runs in its own process group, and that whole group is SIGKILLed however this call ends (timeout,
    failure, Ctrl-C): no launcher or rank outlives the test that started it."""
    port = _port()
    if nprocs == 1:
        cmd = [sys.executable, str(script), *args]
    elif launcher == "deepspeed":
        cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(nprocs), "--master_port", str(port),
               str(script), *args]
    else:
        cmd = [sys.executable, str(RANKS), str(nprocs), str(port), str(script), *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **({"MASTER_PORT": str(port)} if nprocs == 1 else {}), **(env or {})}
    try:
        r = run_group(cmd, cwd=ROOT, env=env, timeout=timeout)
    finally:
        # DeepSpeed's CPU comm op leaves 66 MB per rank in /dev/shm unless mmscale unlinks it (engine.py): a run
        # that left one fails, and whatever is left is removed so that it cannot fill this machine's memory
        left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
        for f in left:
            f.unlink(missing_ok=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    if check and left:
        raise AssertionError(f"the job left {[f.name for f in left]} in /dev/shm")
    return r


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Tiny shapes shards (4 even shards of 64) and a sentencepiece tokenizer trained on their captions."""
    from mmscale.data import make_shapes_dataset, train_sentencepiece
    from mmscale.data.tokenizer import captions_from_shards

    root = tmp_path_factory.mktemp("tiny_data")
    make_shapes_dataset(root / "train", 256, samples_per_shard=64, image_size=32, seed=7, prefix="train")
    tok = train_sentencepiece(captions_from_shards(str(root / "train")), root / "tok", vocab_size=64)
    return [f"data.train_shards={root / 'train'}", f"data.tokenizer={tok}"]


def losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in json.loads(path.read_text())["history"] if "loss" in r}


@pytest.mark.slow
def test_two_rank_zero3_matches_single_process(tiny_data, tmp_path):
    """Same global batches: 2 ranks x micro 4 (ZeRO-3) against 1 rank x micro 4 x 2 accumulation steps."""
    common = [*tiny_data, "train.max_steps=6", "train.checkpoint_every=0", "train.global_batch_size=8",
              "train.micro_batch_size=4", "deepspeed.zero_stage=3", "--same-global-batches"]
    launch(RUN_TINY, [str(tmp_path / "two.json"), f"output_dir={tmp_path / 'two'}", *common], nprocs=2)
    launch(RUN_TINY, [str(tmp_path / "one.json"), f"output_dir={tmp_path / 'one'}", *common], nprocs=1)
    two, one = losses(tmp_path / "two.json"), losses(tmp_path / "one.json")
    assert sorted(two) == sorted(one) == list(range(1, 7))
    # Tolerance: fp32 with a different reduction order (gloo all-reduce / reduce-scatter vs local accumulation)
    # gives ~1e-7 relative per step; 6 Adam steps amplify it, stated bound 1e-4.
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), (step, two, one)
    assert one[6] < one[1]  # and it trains


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tiny_data, tmp_path):
    """2 ranks, each on its own shards: stop after step 3, resume, and steps 4-6 equal an uninterrupted run's."""
    common = [*tiny_data, "train.max_steps=6", "train.checkpoint_every=3", "deepspeed.zero_stage=3"]
    launch(RUN_TINY, [str(tmp_path / "full.json"), f"output_dir={tmp_path / 'full'}", *common], nprocs=2)
    launch(RUN_TINY, [str(tmp_path / "a.json"), f"output_dir={tmp_path / 'cut'}", "--stop-at", "3", *common], nprocs=2)
    first = losses(tmp_path / "a.json")
    assert sorted(first) == [1, 2, 3]
    ckpt = checkpoint.latest_checkpoint(tmp_path / "cut/checkpoints")
    assert ckpt is not None and ckpt.name == "step_00000003"
    launch(RUN_TINY, [str(tmp_path / "b.json"), f"output_dir={tmp_path / 'cut'}", "--resume", *common], nprocs=2)
    full, resumed = losses(tmp_path / "full.json"), losses(tmp_path / "b.json")
    assert sorted(resumed) == [4, 5, 6]
    for step in (1, 2, 3):
        assert first[step] == pytest.approx(full[step], rel=1e-6)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6), (step, resumed, full)


@pytest.mark.slow
def test_launcher_two_ranks_metrics_checkpoints_resume(tmp_path):
    """The real entry point on embedded defaults (it generates its own data): metrics, checkpoints, --resume."""
    out = tmp_path / "run"
    args = ["--config", "configs/tiny.yaml", f"output_dir={out}", "train.max_steps=4", "train.checkpoint_every=2",
            "logging.tensorboard=true", "logging.plot=true", "train.eval_every=2"]
    launch(ROOT / "launchers/train.py", args, nprocs=2)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["loss"] > 0 for r in train)
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert (out / "loss.png").stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())
    assert (out / "config.yaml").is_file()
    ckpts = [p.name for p in checkpoint.complete_checkpoints(out / "checkpoints")]
    assert ckpts == ["step_00000002", "step_00000004"]
    assert (out / "checkpoints/latest").read_text() == "step_00000004"
    for rank in (0, 1):
        assert (out / "checkpoints/step_00000004" / checkpoint.state_file(rank)).is_file()

    launch(ROOT / "launchers/train.py", [*args[:-3], "train.max_steps=6", "--resume"], nprocs=2)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert (out / "checkpoints/latest").read_text() == "step_00000006"


def test_crash_mid_checkpoint_keeps_previous(tmp_path):
    """A save that dies before its commit leaves `latest` and the previous checkpoint as they were."""
    root = tmp_path / "checkpoints"
    for step in (100, 200):
        tag = checkpoint.begin(root, step)
        (root / tag).mkdir()
        (root / tag / "weights").write_text(str(step))
        checkpoint.commit(root, step, keep=2)
    tag = checkpoint.begin(root, 300)  # the crash: files half written, never committed
    (root / tag).mkdir()
    (root / tag / "weights").write_text("half")
    assert checkpoint.latest_checkpoint(root).name == "step_00000200"
    (root / "latest").unlink()  # even without the pointer, a partial directory is never picked
    assert checkpoint.latest_checkpoint(root).name == "step_00000200"
    # the next save of step 300 clears the stale partial; keep=2 prunes step 100 only after 300 is complete
    tag = checkpoint.begin(root, 300)
    assert not (root / tag).exists()
    (root / tag).mkdir()
    (root / tag / "weights").write_text("300")
    assert (root / "step_00000100").exists()
    checkpoint.commit(root, 300, keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step_00000200", "step_00000300"]
    assert (root / "latest").read_text() == "step_00000300"


def test_generated_validation_split_is_spread_over_ranks(tmp_path):
    """The demo's val split is cut into 16 equal shards whatever samples_per_shard says (one process, no launch)."""
    from mmscale.job.preflight import load_config
    from mmscale.data.shards import read_sizes, resolve_shards
    from mmscale.job.build import prepare_data

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"output_dir={tmp_path}", "data.synthetic_train_samples=32",
                                                      "data.synthetic_val_samples=64", "data.samples_per_shard=500"])
    train, val, tok = prepare_data(cfg, rank=0)
    assert sorted(read_sizes(resolve_shards(val)).values()) == [4] * 16
    assert list(read_sizes(resolve_shards(train)).values()) == [32] and Path(tok).is_file()


def _fake_checkpoint(root: Path, step: int, keep: int = 2, metrics: dict | None = None, **kw) -> Path:
    tag = checkpoint.begin(root, step)
    (root / tag).mkdir()
    (root / tag / "weights").write_bytes(bytes(range(256)) * step)
    files = checkpoint.hash_share(root / tag, checkpoint.files_of(root / tag), 0, 1)
    checkpoint.write_manifest(root / tag, step, files, {"world_size": 1, "metrics": metrics or {}})
    return checkpoint.commit(root, step, keep=keep, **kw)


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """An older run's step_400 must not outrank a new step_100 (the new one was deleted, `latest` dangled)."""
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 400)
    new = _fake_checkpoint(root, 100, keep=1)
    assert new.is_dir() and (root / "latest").read_text() == "step_00000100"


def test_keep_last_k_and_the_best_by_a_metric(tmp_path):
    root = tmp_path / "checkpoints"
    for step, val in ((1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 2.6)):
        _fake_checkpoint(root, step, keep=2, metrics={"val_loss": val}, best_metric="val_loss")
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step_00000002", "step_00000004",
                                                                       "step_00000005"]
    assert checkpoint.best_checkpoint(checkpoint.complete_checkpoints(root), "val_loss").name == "step_00000002"


def test_a_failed_prune_is_reported(tmp_path, monkeypatch, caplog):
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 1, keep=1)

    def refuse(path, *a, **k):
        raise PermissionError(f"read-only: {path}")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", refuse)
    with caplog.at_level("WARNING", logger="mmscale.checkpoint"):
        _fake_checkpoint(root, 2, keep=1)
    assert "could not delete old checkpoint" in caplog.text and "step_00000001" in caplog.text


def test_manifest_catches_every_kind_of_damage(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt = _fake_checkpoint(root, 3)
    assert checkpoint.verify(ckpt) == []
    weights = ckpt / "weights"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # same size, one bit
    assert "checksum" in checkpoint.verify(ckpt)[0]
    weights.write_bytes(good[:10])
    assert "bytes, the manifest says" in checkpoint.verify(ckpt)[0]
    weights.unlink()
    assert "missing" in checkpoint.verify(ckpt)[0]
    (ckpt / checkpoint.MANIFEST).unlink()
    assert "manifest" in checkpoint.verify(ckpt)[0]


def test_checkpoint_reader_unpickles_no_code(tmp_path):
    """A model_states file whose pickle would run a command is refused (weights_only), and the command never runs."""
    import pickle

    from mmscale.training.checkpoint import consolidated_state_dict

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = tmp_path / "step_00000001"
    ckpt.mkdir()
    with open(ckpt / "mp_rank_00_model_states.pt", "wb") as f:
        pickle.dump({"module": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        consolidated_state_dict(ckpt)
    assert not marker.exists()


def test_trainer_state_loads_with_weights_only(tmp_path):
    """RNG state (numpy's included) round-trips through torch.save / torch.load(weights_only=True)."""
    import random

    import numpy as np

    from mmscale.training.trainer import rng_state, set_rng_state

    torch.save({"rng": rng_state(), "step": 3}, tmp_path / "s.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


@pytest.mark.slow
def test_a_timed_out_launch_leaves_no_process_behind(tmp_path):
    """The launcher and both ranks die with the test that started them (an orphaned job once trained on for 35
    minutes after pytest-timeout failed its test)."""
    import time

    with pytest.raises(subprocess.TimeoutExpired):
        launch(ROOT / "tests/dist/sleep_forever.py", [str(tmp_path)], nprocs=2, timeout=30)
    pids = [int(p.read_text()) for p in tmp_path.glob("pid*")]
    assert len(pids) == 2, "the ranks did not start within the timeout"

    def alive(pid: int) -> bool:  # a zombie (killed, not yet reaped by init) is dead
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in pids), [pid for pid in pids if alive(pid)]


def test_engine_refuses_parameters_in_a_precision_nobody_asked_for():
    """What build_engine checks after the build (DeepSpeed 0.19.8 once turned fp32 into bf16 without a word)."""
    from mmscale.training.engine import check_param_dtypes

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).to(torch.bfloat16))
    check_param_dtypes(model[:1], torch.float32)
    with pytest.raises(RuntimeError, match=r"asks for torch.float32.*2 in torch.bfloat16 \(e.g. 1.weight\)"):
        check_param_dtypes(model, torch.float32)
