"""Issue 18, findings 1, 4 and 13: what a checkpoint survives besides a crash.

1. A DeepSpeed file that runs code when unpickled is refused on `--resume` (and a rollback, the same `Engine.load`),
   and none of it runs.
4. A torn last line of `metrics.jsonl` (a crash mid-append) is dropped with a warning, not a crash of every resume.
13. Every file and directory of a new checkpoint, and `latest` and the metrics, are fsynced before anything older
    is deleted; saving a step again leaves a complete checkpoint of it whatever point a crash stops it at.

The DeepSpeed runs here are single processes (`python tests/dist/run_tiny.py`, gloo, ~15 s each), in the fast tier.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmscale.training import checkpoint
from mmscale.training.metrics import MetricsWriter, read_metrics
from test_training import ROOT, RUN_TINY, launch, tiny_data  # noqa: F401  (tiny_data is a fixture)

TINY = ["train.checkpoint_every=2", "deepspeed.zero_stage=3", "data.num_workers=0"]


# ----------------------------------------------------------------------------------------------- 1: no unpickling


class _RunsCode:
    """Unpickling this calls `os.mkdir(marker)`: what a crafted checkpoint file could do with any other call."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture(scope="module")
def saved_run(tiny_data, tmp_path_factory):  # noqa: F811  (the imported fixture)
    """A 1-process ZeRO-3 run with its checkpoint at step 2 (read-only: tests copy it)."""
    out = tmp_path_factory.mktemp("saved")
    launch(RUN_TINY, [str(out / "run.json"), *tiny_data, *TINY, f"output_dir={out / 'run'}", "train.max_steps=2"],
           nprocs=1, timeout=300)
    return out / "run"


def _copy_run(saved_run: Path, dest: Path) -> Path:
    shutil.copytree(saved_run, dest)
    return dest


def _resume(run: Path, tiny_data: list[str], out_json: Path, max_steps: int = 3):
    return launch(RUN_TINY, [str(out_json), *tiny_data, *TINY, f"output_dir={run}", f"train.max_steps={max_steps}",
                             "--resume"], nprocs=1, timeout=300, check=False)


@pytest.mark.parametrize("kind", ["model_states", "optim_states"])
def test_resume_refuses_a_deepspeed_file_that_runs_code(saved_run, tiny_data, tmp_path, kind):  # noqa: F811
    """Finding 1: DeepSpeed's checkpoint engine read `*model_states.pt` / `*optim_states.pt` with
    `torch.load(weights_only=False)`, so a crafted file ran its code on `--resume` (and on a rollback). The file's
    manifest entry is rewritten too, as anyone who can write the run directory could: the manifest is no defence,
    the unpickling itself must be. The resume stops with an error naming the file; the code never runs."""
    run = _copy_run(saved_run, tmp_path / "run")
    ckpt = run / "checkpoints" / checkpoint.tag_for(2)
    (target,) = ckpt.glob(f"*{kind}.pt")
    marker = tmp_path / "code_ran"
    evil = _RunsCode(marker)  # one object in both places: unpickled once
    torch.save({"module": evil, "optimizer_state_dict": evil}, target)
    torch.load(target, weights_only=False)  # the file does run code when unpickled the way DeepSpeed did
    assert marker.exists()
    marker.rmdir()
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    manifest["files"][target.name] = {"size": target.stat().st_size, "sha256": checkpoint.sha256_file(target)}
    (ckpt / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    assert checkpoint.verify(ckpt) == []

    r = _resume(run, tiny_data, tmp_path / "resumed.json")
    assert not marker.exists(), "resuming ran the code of a crafted checkpoint file"
    assert r.returncode != 0, f"the resume went on from a crafted file:\n{r.stderr[-3000:]}"
    assert "refusing to load" in r.stderr and target.name in r.stderr, r.stderr[-3000:]
    assert ckpt.is_dir(), "a tampered checkpoint is refused, not set aside as damage"


def test_resume_loads_deepspeed_files_with_weights_only(saved_run, tiny_data, tmp_path):  # noqa: F811
    """Finding 1: the normal resume works with every DeepSpeed load made `weights_only=True` (the allow-list holds
    every non-tensor type DeepSpeed's ZeRO-3 files hold), and goes on training."""
    run = _copy_run(saved_run, tmp_path / "run")
    _resume(run, tiny_data, tmp_path / "resumed.json")
    history = json.loads((tmp_path / "resumed.json").read_text())["history"]
    assert [r["step"] for r in history if "loss" in r] == [3]


@pytest.mark.slow  # one process, but ~30 s per variant
@pytest.mark.parametrize("stage,precision", [(0, "bf16"), (1, "fp32"), (2, "bf16")])
def test_every_zero_stage_resumes_with_weights_only(tiny_data, tmp_path, stage, precision):  # noqa: F811
    """Finding 1: DeepSpeed's files of the other layouts (the bf16 optimizer's under ZeRO-0, ZeRO-1/2's fragment
    addresses and loss scalers) load with `weights_only=True` too, and the run goes on from them."""
    run, overrides = tmp_path / "run", [*tiny_data, "train.checkpoint_every=1", f"deepspeed.zero_stage={stage}",
                                        f"train.precision={precision}", "data.num_workers=0"]
    launch(RUN_TINY, [str(tmp_path / "a.json"), *overrides, f"output_dir={run}", "train.max_steps=1"], nprocs=1,
           timeout=300)
    launch(RUN_TINY, [str(tmp_path / "b.json"), *overrides, f"output_dir={run}", "train.max_steps=2", "--resume"],
           nprocs=1, timeout=300)
    history = json.loads((tmp_path / "b.json").read_text())["history"]
    assert [r["step"] for r in history if "loss" in r] == [2]


def test_the_checkpoint_engine_of_a_built_engine_loads_safely(tmp_path):
    """Finding 1: `make_loads_safe` turns a DeepSpeed checkpoint engine's `load` into `weights_only=True` (here on
    DeepSpeed's own TorchCheckpointEngine, without building a model)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    from mmscale.training.engine import make_loads_safe
    from mmscale.training.zero_checkpoint import UnsafeCheckpointError

    class FakeEngine:
        checkpoint_engine = TorchCheckpointEngine()

    ds = FakeEngine()
    make_loads_safe(ds)
    good, bad, marker = tmp_path / "good.pt", tmp_path / "bad.pt", tmp_path / "code_ran"
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19.8"}, good)
    torch.save({"module": _RunsCode(marker)}, bad)
    assert torch.equal(ds.checkpoint_engine.load(str(good), map_location="cpu")["module"]["w"], torch.ones(2))
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*bad.pt"):
        ds.checkpoint_engine.load(str(bad), map_location="cpu")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------- 4: torn metrics


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    """Finding 4: a crash in the middle of an append left `{"step": 6, "lo` at the end of metrics.jsonl;
    `truncate_after` (rank 0, inside resume) raised JSONDecodeError, on every requeue. Now the torn line is
    dropped with a warning, the file is rewritten whole, and the next record starts on its own line."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    w = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    with caplog.at_level(logging.WARNING, logger="mmscale.metrics"):
        assert w.truncate_after(4) == 1
    assert "torn last line 6" in caplog.text
    assert [r["step"] for r in _records(path)] == [1, 2, 3, 4]
    w.write(5, {"loss": 0.5})
    assert [r["step"] for r in _records(path)] == [1, 2, 3, 4, 5]


def test_a_torn_line_never_swallows_the_next_record(tmp_path, caplog):
    """Finding 4: without a resume's rewrite (a writer that appends to a torn file), the torn fragment stays on a
    line of its own, and readers drop it with a warning instead of raising."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + '\n{"step": 2, "loss": 1.')
    w = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    w.write(3, {"loss": 1.5})
    with caplog.at_level(logging.WARNING, logger="mmscale.metrics"):
        assert [r["step"] for r in read_metrics(path)] == [1, 3]
    assert "dropped line 2" in caplog.text


def test_a_bad_line_in_the_middle_is_dropped_with_its_line_number(tmp_path, caplog):
    """Finding 4: a line that is not a record anywhere else (not JSON, not an object with an integer step) is
    dropped with a warning naming its line number, never a crash; the records after it are kept."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\nnot json\n[1, 2]\n{"step": 2, "loss": 1.0}\n{"step": 3, "loss": 0.5}\n')
    w = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    with caplog.at_level(logging.WARNING, logger="mmscale.metrics"):
        assert w.truncate_after(2) == 1
    assert "dropped line 2" in caplog.text and "dropped line 3" in caplog.text
    assert [r["step"] for r in _records(path)] == [1, 2]


# ----------------------------------------------------------------------------------------------- 13: durability

_RECORDER = textwrap.dedent('''
    """Runs tests/dist/run_tiny.py in this process, recording fsync (by the path its descriptor names), rename and
    rmtree calls in order; writes them to EVENTS_JSON."""
    import importlib.util, json, os, shutil, sys

    events_json, run_tiny, *args = sys.argv[1:]
    events = []
    real_fsync, real_replace, real_rename, real_rmtree = os.fsync, os.replace, os.rename, shutil.rmtree

    def fsync(fd):
        events.append(["fsync", os.readlink(f"/proc/self/fd/{fd}")])
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(["replace", os.path.realpath(src), os.path.realpath(dst)])
        return real_replace(src, dst, *a, **k)

    def rename(src, dst, *a, **k):
        events.append(["replace", os.path.realpath(src), os.path.realpath(dst)])
        return real_rename(src, dst, *a, **k)

    def rmtree(path, *a, **k):
        events.append(["rmtree", os.path.realpath(path)])
        return real_rmtree(path, *a, **k)

    os.fsync, os.replace, os.rename, shutil.rmtree = fsync, replace, rename, rmtree
    spec = importlib.util.spec_from_file_location("run_tiny", run_tiny)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.argv = [run_tiny, *args]
    rc = mod.main()
    with open(events_json, "w") as f:
        json.dump(events, f)
    sys.stdout.flush()
    os._exit(rc)
''')


def test_a_checkpoint_is_durable_before_the_older_one_is_deleted(tiny_data, tmp_path):  # noqa: F811
    """Finding 13: only the manifest was fsynced; DeepSpeed's shards, the trainer state, the directories, `latest`
    and the metrics were not, and pruning deleted the older checkpoint right after the rename: with
    keep_checkpoints=1 a power loss could leave no checkpoint at all. A real 1-process run (keep 1, a checkpoint
    every step) records every fsync, rename and rmtree in order: before step 1's checkpoint is deleted, every file
    of step 2's and its directory were fsynced, then it was renamed and `checkpoints/` fsynced, then `latest` was
    written through a fsynced temporary file, renamed and `checkpoints/` fsynced again, and the metrics record of
    step 2 was fsynced."""
    recorder = tmp_path / "record_fsync.py"
    recorder.write_text(_RECORDER)
    run, events_json = tmp_path / "run", tmp_path / "events.json"
    launch(recorder, [str(events_json), str(RUN_TINY), str(tmp_path / "out.json"), *tiny_data, *TINY,
                      f"output_dir={run}", "train.max_steps=2", "train.checkpoint_every=1",
                      "train.keep_checkpoints=1"], nprocs=1, timeout=300)
    events = json.loads(events_json.read_text())
    root = (run / "checkpoints").resolve()
    old, new = root / checkpoint.tag_for(1), root / checkpoint.tag_for(2)
    partial = root / (new.name + checkpoint.PARTIAL)
    deleted = [i for i, e in enumerate(events) if e[0] == "rmtree" and e[1] == str(old)]
    assert deleted, f"step 1's checkpoint was never pruned: {[e for e in events if e[0] == 'rmtree']}"
    before = events[:deleted[0]]
    fsynced = [e[1] for e in before if e[0] == "fsync"]

    files = sorted(p.name for p in new.iterdir())
    assert checkpoint.MANIFEST in files and any(f.endswith("model_states.pt") for f in files)
    # each file under the name it had when fsynced: in the partial directory (the manifest as its temporary file)
    not_synced = [f for f in files if not {str(partial / f), str(partial / (f + ".tmp"))} & set(fsynced)]
    assert not not_synced, f"files of {new.name} not fsynced before {old.name} was deleted: {not_synced}"

    def index(event: list[str], after: int = -1) -> int:
        for i in range(after + 1, len(before)):
            if before[i] == event:
                return i
        raise AssertionError(f"{event} not found before {old.name} was deleted (after event {after})")

    i_dir = index(["fsync", str(partial)])
    i_publish = index(["replace", str(partial), str(new)], i_dir)
    i_root = index(["fsync", str(root)], i_publish)
    i_latest_tmp = index(["fsync", str(root / "latest.tmp")], i_root)
    i_latest = index(["replace", str(root / "latest.tmp"), str(root / "latest")], i_latest_tmp)
    index(["fsync", str(root)], i_latest)
    metrics = str((run / "metrics.jsonl").resolve())
    steps_logged = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    assert steps_logged[:2] == [1, 2]
    assert fsynced.count(metrics) >= 2, f"metrics.jsonl fsynced {fsynced.count(metrics)} time(s) before the prune"
    assert (root / "latest").read_text() == new.name
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == [new.name]


class _Crash(BaseException):
    """A power loss at this point: nothing after it runs."""


def _save(root: Path, step: int, content: bytes, keep: int = 1) -> Path:
    """A save as the trainer does it (one rank): files into the partial directory, hashed, the manifest, commit."""
    tag = checkpoint.begin(root, step)
    (root / tag).mkdir()
    (root / tag / "model_states.pt").write_bytes(content)
    (root / tag / "trainer_state_rank0.pt").write_bytes(content[::-1])
    files = checkpoint.hash_share(root / tag, checkpoint.files_of(root / tag), 0, 1)
    checkpoint.write_manifest(root / tag, step, files, {"world_size": 1, "metrics": {}})
    return checkpoint.commit(root, step, keep=keep)


def _usable(root: Path) -> list[tuple[str, bytes]]:
    """What a resume would find: (name, weights) of each candidate that verifies, best first."""
    return [(c.name, (c / "model_states.pt").read_bytes()) for c in checkpoint.candidates(root)
            if not checkpoint.verify(c)]


def test_saving_a_step_again_leaves_a_complete_checkpoint_at_every_crash_point(tmp_path, monkeypatch):
    """Finding 13: saving step N again (after a resume or a rollback) ran `rmtree(step_N)` before renaming the new
    one into place: a crash between the two left no checkpoint of step N, and with keep_checkpoints=1 none at all.
    A crash is injected before each rename and delete of the re-save in turn; each time a resume still finds a
    complete, verifying checkpoint of step N (the old one or the new one), and a later save cleans up."""
    real_replace, real_rmtree = os.replace, shutil.rmtree
    crash_points = 0
    while True:
        root = tmp_path / f"crash_{crash_points}" / "checkpoints"
        _save(root, 5, b"old weights")
        calls = 0

        def counted(real):
            def call(*a, **k):
                nonlocal calls
                calls += 1
                if calls > crash_points:
                    raise _Crash()
                return real(*a, **k)
            return call

        monkeypatch.setattr(checkpoint.os, "replace", counted(real_replace))
        monkeypatch.setattr(checkpoint.shutil, "rmtree", counted(real_rmtree))
        try:
            _save(root, 5, b"new weights")
            finished = True
        except _Crash:
            finished = False
        monkeypatch.setattr(checkpoint.os, "replace", real_replace)
        monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)

        usable = _usable(root)
        assert usable, f"a crash after {crash_points} rename/delete call(s) of a re-save left no complete " \
                       f"checkpoint: {sorted(p.name for p in root.iterdir())}"
        name, weights = usable[0]
        assert checkpoint.step_of(root / name) == 5 and weights in (b"old weights", b"new weights")
        if finished:
            assert weights == b"new weights"
            assert sorted(p.name for p in root.iterdir()) == ["latest", checkpoint.tag_for(5)]
            break
        # the run resumes from what is there and saves the step again: one clean checkpoint, the newest weights
        _save(root, 5, b"newer weights")
        assert _usable(root) == [(checkpoint.tag_for(5), b"newer weights")]
        assert sorted(p.name for p in root.iterdir()) == ["latest", checkpoint.tag_for(5)]
        crash_points += 1
    assert crash_points >= 3  # the manifest's rename, the old one's, the new one's: each was a crash point


def test_a_later_step_prunes_the_earlier_save_of_a_step_saved_again(tmp_path, monkeypatch):
    """Finding 13: a crash after a re-save published its new checkpoint leaves the old one as `step_N.replaced`:
    never loaded while `step_N` exists, and deleted by the next save."""
    root = tmp_path / "checkpoints"
    _save(root, 5, b"old")
    real_rmtree = shutil.rmtree

    def crash_on_replaced(path, *a, **k):
        if str(path).endswith(checkpoint.REPLACED):
            raise _Crash()
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", crash_on_replaced)
    with pytest.raises(_Crash):
        _save(root, 5, b"new")
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    assert (root / (checkpoint.tag_for(5) + checkpoint.REPLACED)).is_dir()
    assert _usable(root) == [(checkpoint.tag_for(5), b"new")]
    _save(root, 6, b"six", keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", checkpoint.tag_for(6)]
