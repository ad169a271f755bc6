"""Issue 18 (Build): fault injection. EIO and ENOSPC raised from the checkpoint writer (DeepSpeed's shards through
`Engine.save`, the trainer state, the fsyncs, the manifest, the publishing rename, `latest`), the metrics writer and
the replay buffer's writer, and a rank killed while `--resume` loads. For each fault:

(a) no checkpoint is lost or set aside wrongly: the previous complete checkpoint verifies, `latest` names it, and
    nothing is renamed `.corrupt`;
(b) the run stops with an OSError that carries the errno (`errno`, its text in the message) and names the file
    that failed, not an unrelated exception (torch's own writer loses the errno: `RuntimeError: [enforce fail at
    inline_container.cc:672] . unexpected pos 64 vs 0`);
(c) the next `--resume`, without the fault, continues and ends with the losses of an uninterrupted run, each step
    once in metrics.jsonl.

The fast tier drives one-process runs in this process (`build_trainer` + `Trainer.train`, configs/tiny.yaml, one
checkpoint per step), so that the faults are injected by monkeypatching `open`, `os.fsync`, `os.replace` and
`torch.save` for one path pattern. An uninterrupted 2-step run gives the losses; a copy of it without its step-2
checkpoint (a run that died after logging step 2) is resumed with the fault armed, fails in step 2 or its checkpoint,
then resumes again without it. A write fails as on a failing disk: half the data stored, then the OSError (which, like
the kernel's for a buffered write or an fsync, names no file); `torch.save` to a path gets `/dev/full` for its own
file writer (its error is whatever torch makes of ENOSPC), a Python file the OSError. ~45 s for the 6 fast faults.

The slow tier kills rank 1 of a 2-rank job with SIGKILL while `--resume` loads its checkpoint: rank 0 must stop within
`deepspeed.collective_timeout_s`, naming rank 1 (exit 4), and the next `--resume` continues.
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mmscale.training import checkpoint
from test_training import ROOT, _port, tiny_data  # noqa: F401  (tiny_data is a fixture)

CONFIG = ROOT / "configs/tiny.yaml"
COMMON = ["data.num_workers=0", "train.checkpoint_every=1", "train.keep_checkpoints=3", "train.global_batch_size=4"]
REPLAY = ["callbacks=[{name: replay, args: {capacity: 32, ratio: 0.5}}]"]
STEP_1, STEP_2 = checkpoint.tag_for(1), checkpoint.tag_for(2)


# ----------------------------------------------------------------------------------------------- injecting faults


def _oserror(code: int, path: object = None) -> OSError:
    return OSError(code, os.strerror(code), *([os.fsdecode(path)] if path is not None else []))


class _FailingFile:
    """A file on a failing disk: a write stores the first half of its data, then raises (a torn write: what a full
    disk leaves); flush, fsync and close work on what was stored."""

    def __init__(self, f, code: int):
        self._f, self._code = f, code

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise _oserror(self._code)  # (a buffered write's error names no file)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)


class _FailingSink:
    """What torch.save writes into when it is given a Python file on a failing disk."""

    def __init__(self, code: int):
        self.code = code

    def write(self, data):
        raise _oserror(self.code)

    def flush(self):
        pass


@dataclass(frozen=True)
class Fault:
    """`call` raises OSError(`code`) for every path matching `pattern` (fnmatch, on the absolute path)."""

    name: str
    call: str  # "open" (a write to a file opened for writing), "fsync", "replace", "torch.save"
    pattern: str
    code: int
    replay: bool = False  # a run with the replay callback
    skip: int = 0  # matching calls let through before the fault (the first `skip` writes succeed)
    logged: tuple[int, ...] = (2,)  # the steps the faulty run logged: 2 (it stopped in step 2's checkpoint or log)
    published: bool = False  # step 2's checkpoint was published before the fault (only `latest` failed)

    def __str__(self) -> str:
        return self.name


SLOW = pytest.mark.slow  # (~5 s each: the fast tier keeps one fault per writer and errno, the others are slow)
FAULTS = [
    # the checkpoint writer: DeepSpeed's shards (Engine.save), the trainer state, the fsyncs, manifest, rename, latest
    Fault("ckpt-deepspeed-shard-ENOSPC", "torch.save", f"*/{STEP_2}.partial/*optim_states.pt", errno.ENOSPC),
    Fault("ckpt-fsync-EIO", "fsync", f"*/{STEP_2}.partial/*model_states.pt", errno.EIO),
    pytest.param(Fault("ckpt-trainer-state-EIO", "torch.save", f"*/{STEP_2}.partial/trainer_state_rank0.pt",
                       errno.EIO), marks=SLOW),
    pytest.param(Fault("ckpt-manifest-ENOSPC", "open", f"*/{STEP_2}.partial/manifest.json.tmp", errno.ENOSPC),
                 marks=SLOW),
    pytest.param(Fault("ckpt-publish-EIO", "replace", f"*/{STEP_2}.partial", errno.EIO), marks=SLOW),
    pytest.param(Fault("ckpt-latest-ENOSPC", "open", "*/checkpoints/latest.tmp", errno.ENOSPC, published=True),
                 marks=SLOW),
    # the metrics writer: a torn append (full disk), a record whose fsync fails
    Fault("metrics-ENOSPC", "open", "*/metrics.jsonl", errno.ENOSPC),
    Fault("metrics-EIO", "fsync", "*/metrics.jsonl", errno.EIO),
    # the replay buffer's writer: a sample appended to its shard (in step 2), its state committed (step 2's save;
    # the first state written, the one the resume restores in on_train_start, is let through)
    Fault("replay-shard-ENOSPC", "open", "*/replay/rank0/replay-*.tar.tmp", errno.ENOSPC, replay=True, logged=()),
    Fault("replay-commit-EIO", "fsync", "*/replay/rank0/state.json.tmp", errno.EIO, replay=True, skip=1),
]


def _inject(monkeypatch: pytest.MonkeyPatch, fault: Fault, hits: list[str]) -> None:
    """Arm `fault` until `monkeypatch` is undone; every call it fails is appended to `hits`."""

    seen = [0]

    def matches(path: object) -> bool:
        try:
            p = os.path.abspath(os.fsdecode(path))
        except TypeError:  # a file descriptor or a file object
            return False
        if not fnmatch.fnmatch(p, fault.pattern):
            return False
        seen[0] += 1
        return seen[0] > fault.skip

    if fault.call == "open":
        real_open = builtins.open

        def fault_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if any(c in mode for c in "wax+") and matches(file):
                hits.append(os.fsdecode(file))
                return _FailingFile(f, fault.code)
            return f

        monkeypatch.setattr(builtins, "open", fault_open)
        monkeypatch.setattr(io, "open", fault_open)  # (pathlib's Path.open calls io.open)
    elif fault.call == "fsync":
        real_fsync = os.fsync

        def fault_fsync(fd):
            fd = fd if isinstance(fd, int) else fd.fileno()
            path = os.readlink(f"/proc/self/fd/{fd}")
            if matches(path):
                hits.append(path)
                raise _oserror(fault.code)  # (fsync's error names no file)
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fault_fsync)
    elif fault.call == "replace":
        real_replace = os.replace

        def fault_replace(src, dst, **kwargs):
            if matches(src) or matches(dst):
                hits.append(os.fsdecode(src))
                raise _oserror(fault.code, src)
            return real_replace(src, dst, **kwargs)

        monkeypatch.setattr(os, "replace", fault_replace)
    elif fault.call == "torch.save":
        real_save = torch.save

        def fault_save(obj, f, *args, **kwargs):
            name = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", None)
            if name is None or not matches(name):
                return real_save(obj, f, *args, **kwargs)
            hits.append(os.fsdecode(name))
            if isinstance(f, (str, os.PathLike)):  # torch's own file writer, on a disk that takes no more bytes
                Path(f).touch()
                return real_save(obj, "/dev/full", *args, **kwargs)
            return real_save(obj, _FailingSink(fault.code), *args, **kwargs)

        monkeypatch.setattr(torch, "save", fault_save)
    else:
        raise ValueError(fault.call)


# ----------------------------------------------------------------------------------------------- in-process runs


@pytest.fixture(scope="module")
def in_process():
    """A world of one in this process (the variables init_distributed would set, on a free port); the process group
    is destroyed and the variables restored after the module."""
    from mmscale.job.build import close

    with pytest.MonkeyPatch.context() as mp:
        for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(_port())).items():
            mp.setenv(k, v)
        try:
            yield
        finally:
            close()


def _train(out: Path, data: list[str], max_steps: int, replay: bool, resume: bool = False):
    """One in-process run; returns (the trainer's logged records, the exception that stopped it or None)."""
    from mmscale.job.preflight import load_config
    from mmscale.job.build import build_trainer

    cfg = load_config(CONFIG, [*data, *COMMON, *(REPLAY if replay else []), f"output_dir={out}",
                               f"train.max_steps={max_steps}"])
    trainer = None
    try:
        trainer = build_trainer(cfg, resume="required" if resume else None)
        return trainer.train(), None
    except Exception as e:  # noqa: BLE001  (what the fault made the run raise: judged by the test)
        return (trainer.history if trainer is not None else []), e


@pytest.fixture(scope="module")
def saved(tiny_data, in_process, tmp_path_factory):  # noqa: F811  (the imported fixture)
    """Per kind of run (plain, replay): the uninterrupted run's losses (2 steps) and a run to resume from step 1
    (read-only: tests copy it). Made on first use."""
    made: dict[bool, tuple[dict[int, float], Path]] = {}

    def get(replay: bool) -> tuple[dict[int, float], Path]:
        if replay not in made:
            root = tmp_path_factory.mktemp("replay" if replay else "plain")
            history, e = _train(root / "full", tiny_data, 2, replay)
            assert e is None, e
            # the run as if it had died after logging step 2, before step 2's checkpoint was published
            shutil.copytree(root / "full", root / "base")
            shutil.rmtree(root / "base/checkpoints" / STEP_2)
            (root / "base/checkpoints/latest").write_text(STEP_1)
            made[replay] = (_losses(root / "full"), root / "base")
        return made[replay]

    return get


def _losses(run: Path) -> dict[int, float]:
    return {json.loads(line)["step"]: json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text()
            .splitlines() if "loss" in json.loads(line)}


def _metrics_steps(run: Path) -> list[int]:
    """The training records' steps in metrics.jsonl, in file order (no de-duplication; torn lines left out)."""
    from mmscale.training.metrics import parse_records

    path = run / "metrics.jsonl"
    return [r["step"] for _, _, r in parse_records(path.read_text(), path) if "loss" in r]


def _assert_checkpoints_kept(root: Path, fault: Fault) -> None:
    """(a): step 1 complete and verified, `latest` naming it (or the step 2 published before the fault), nothing
    set aside, and no half-written step 2 taken for a checkpoint."""
    names = sorted(p.name for p in root.iterdir())
    assert not [n for n in names if checkpoint.CORRUPT in n or n.endswith(".tmp")], names
    assert checkpoint.verify(root / STEP_1) == [], names
    published = [c.name for c in checkpoint.complete_checkpoints(root)]
    assert published == ([STEP_1, STEP_2] if fault.published else [STEP_1]), names
    if fault.published:
        assert checkpoint.verify(root / STEP_2) == [], names
    assert (root / "latest").read_text().strip() == STEP_1, names


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: str(f))
def test_a_write_fault_stops_the_run_naming_the_errno_and_the_resume_continues(fault, saved, tiny_data, tmp_path,
                                                                                caplog):  # noqa: F811
    full, base = saved(fault.replay)
    run = tmp_path / "run"
    shutil.copytree(base, run)
    hits: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        _inject(mp, fault, hits)
        history, e = _train(run, tiny_data, 2, fault.replay, resume=True)
    assert hits, f"{fault}: the fault was never injected ({fault.call} of {fault.pattern})"
    # (b) the run stopped, with the errno
    assert e is not None, f"{fault}: the run went on after the fault at {hits[0]}"
    assert isinstance(e, OSError) and e.errno == fault.code, f"{fault}: {type(e).__name__}: {e}"
    assert os.strerror(fault.code) in str(e), f"{fault}: {e}"
    assert e.filename and fnmatch.fnmatch(os.path.abspath(e.filename), fault.pattern), f"{fault}: names no file: {e}"
    steps = [r["step"] for r in history if "loss" in r]
    assert steps == list(fault.logged), (fault, steps)
    # (a) nothing lost, nothing set aside
    root = run / "checkpoints"
    _assert_checkpoints_kept(root, fault)
    # (c) the next --resume continues from step 1 and ends as the uninterrupted run did
    caplog.clear()
    caplog.set_level(logging.INFO, logger="mmscale")
    history, e = _train(run, tiny_data, 2, fault.replay, resume=True)
    assert e is None, f"{fault}: the resume after the fault failed: {type(e).__name__}: {e}"
    assert f"resumed from {root / STEP_1} at step 1" in caplog.text
    assert [r["step"] for r in history if "loss" in r] == [2]
    assert _losses(run) == pytest.approx(full, rel=1e-6), (fault, _losses(run), full)
    assert _metrics_steps(run) == [1, 2], fault
    assert not [p.name for p in root.iterdir() if checkpoint.CORRUPT in p.name or p.name.endswith(".partial")]
    assert checkpoint.verify(root / STEP_2) == [] and (root / "latest").read_text().strip() == STEP_2


# ----------------------------------------------------------------------------------------------- a killed rank

# launchers/train.py, with rank 1 SIGKILLing itself as DeepSpeed starts loading its checkpoint (the weights, after
# the vote): rank 0 is then in the same collective load, or reaches the next collective alone. Test scaffolding.
_KILL_RANK1_IN_LOAD = textwrap.dedent(f"""
    import os, runpy, signal, sys, time
    from mmscale.training import engine

    real_load = engine.Engine.load

    def load(self, *args, **kwargs):
        if self.rank == 1:
            with open(os.environ["KILLED_AT"], "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        return real_load(self, *args, **kwargs)

    engine.Engine.load = load
    sys.argv = [{str(ROOT / "launchers/train.py")!r}, *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")

TWO_RANKS = ["data.num_workers=0", "train.checkpoint_every=1", "train.keep_checkpoints=5", "train.max_steps=3",
             "deepspeed.collective_timeout_s=60"]


def _two_ranks(script: Path, args: list[str], env: dict[str, str] | None = None, timeout: float = 240):
    """Rank 0 and rank 1 as two plain processes (no launcher that would kill the survivor when a rank dies): returns
    (rank 0's CompletedProcess, when rank 0 ended). Both process groups are SIGKILLed however it ends."""
    port = str(_port())
    procs = []
    for rank in (0, 1):
        e = {**os.environ, "PYTHONWARNINGS": "ignore", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **(env or {})}
        procs.append(subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT if rank else subprocess.PIPE, text=True, env=e,
                                      start_new_session=True))
    try:
        out, err = procs[0].communicate(timeout=timeout)
        ended = time.time()
        rest, _ = procs[1].communicate(timeout=timeout)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            f.unlink(missing_ok=True)
    return subprocess.CompletedProcess(procs[0].args, procs[0].returncode, out, err + "\n[rank 1]\n" + rest), \
        procs[1].returncode, ended


@pytest.mark.slow
def test_a_rank_killed_while_resume_loads_stops_the_others_naming_it(tiny_data, tmp_path):  # noqa: F811
    """2 ranks: an uninterrupted run to step 3 (checkpoints at 1, 2, 3) gives the losses; a copy without step 3's
    checkpoint (a run that died after logging step 3) is resumed, and rank 1 is SIGKILLed as it starts loading
    step 2. Rank 0 stops (exit 4) within collective_timeout_s naming rank 1; nothing is set aside; the next
    --resume continues and step 3's loss is the uninterrupted run's, each step once in metrics.jsonl."""
    launcher = ROOT / "launchers/train.py"
    full = tmp_path / "full"
    args = [f"--config={CONFIG}", *tiny_data, *TWO_RANKS]
    r, rc1, _ = _two_ranks(launcher, [*args, f"output_dir={full}"])
    assert r.returncode == 0 and rc1 == 0, r.stderr[-4000:]
    reference = _losses(full)
    assert sorted(reference) == [1, 2, 3]

    run = tmp_path / "run"
    shutil.copytree(full, run)
    root = run / "checkpoints"
    shutil.rmtree(root / checkpoint.tag_for(3))
    (root / "latest").write_text(STEP_2)

    script = tmp_path / "kill_rank1_in_load.py"
    script.write_text(_KILL_RANK1_IN_LOAD)
    killed_at = tmp_path / "killed_at"
    r, rc1, ended = _two_ranks(script, [*args, f"output_dir={run}", "--resume"], env={"KILLED_AT": str(killed_at)})
    (tmp_path / "killed_run.log").write_text(r.stderr)  # (what rank 0, then rank 1, said)
    assert rc1 == -signal.SIGKILL, (rc1, r.stderr[-3000:])
    assert killed_at.is_file(), "rank 1 never reached the load"
    elapsed = ended - float(killed_at.read_text())
    assert r.returncode == 4, (r.returncode, r.stderr[-4000:])
    assert elapsed < 60, (elapsed, r.stderr[-3000:])  # deepspeed.collective_timeout_s
    assert "rank(s) 1 " in r.stderr, r.stderr[-4000:]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == [STEP_1, STEP_2]
    assert checkpoint.verify(root / STEP_2) == [] and (root / "latest").read_text().strip() == STEP_2

    r, rc1, _ = _two_ranks(launcher, [*args, f"output_dir={run}", "--resume"])
    assert r.returncode == 0 and rc1 == 0, r.stderr[-4000:]
    assert f"resumed from {root / STEP_2} at step 2" in r.stderr, r.stderr[-3000:]
    assert _losses(run) == pytest.approx(reference, rel=1e-6), (_losses(run), reference)
    assert _metrics_steps(run) == [1, 2, 3]
