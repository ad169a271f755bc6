"""Issue 18, findings 3, 8 and 12: what a resume must not do when the storage, the inputs or rank 0 fail it.

3. A storage hiccup (EIO, ESTALE, EACCES, MemoryError) while a checkpoint is verified is not damage: the read is
   retried, then the run stops on every rank naming the file and the errno, and nothing is set aside. Only proven
   damage (a checksum or size mismatch, a missing listed file, a manifest that does not parse) sets a checkpoint
   aside; a file the manifest does not list (`.nfsXXXX`, zero_to_fp32.py output) is not damage; a file that would
   run code when unpickled stops the run.
8. The tokenizer (its digest, not its path) and the preprocessing (image_size, image_mean/std, max_text_len) are
   fixed on resume, like the model.
12. A failure in work rank 0 does alone (the data, clearing the run, config.yaml, a checkpoint's begin and commit,
   continual.json) reaches every rank within seconds, with rank 0's message, not after the collective timeout.

The resumes here are single processes of `launchers/train.py` (~15 s each, the fast tier); the faults are injected
by a wrapper that makes one file's opens and stats fail (`_FAULTY_LAUNCHER`). Finding 12 needs 2 ranks (slow tier).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mmscale.training import checkpoint
from test_training import ROOT, launch, tiny_data  # noqa: F401  (tiny_data is a fixture)

LAUNCHER = ROOT / "launchers/train.py"
TINY = [f"--config={ROOT / 'configs/tiny.yaml'}", "data.num_workers=0", "train.checkpoint_every=2",
        "train.keep_checkpoints=10"]

# launchers/train.py with the opens and stats of every path containing FAULT_PATH failing with FAULT (an errno
# name, or MemoryError), the first FAULT_TIMES times (0: always). Test scaffolding, not product code.
_FAULTY_LAUNCHER = textwrap.dedent(f"""
    import builtins, errno, io, os, runpy, sys

    target, kind, times = os.environ["FAULT_PATH"], os.environ["FAULT"], int(os.environ.get("FAULT_TIMES", "0"))
    hits = [0]

    def check(path):
        try:
            p = os.fsdecode(os.fspath(path))
        except TypeError:  # a file descriptor
            return
        if target in p:
            hits[0] += 1
            if times == 0 or hits[0] <= times:
                if kind == "MemoryError":
                    raise MemoryError()
                code = getattr(errno, kind)
                raise OSError(code, os.strerror(code), p)

    real_open, real_stat = builtins.open, os.stat

    def fault_open(file, *args, **kwargs):
        check(file)
        return real_open(file, *args, **kwargs)

    def fault_stat(path, *args, **kwargs):
        check(path)
        return real_stat(path, *args, **kwargs)

    builtins.open = io.open = fault_open
    os.stat = fault_stat
    sys.argv = [{str(LAUNCHER)!r}, *sys.argv[1:]]
    runpy.run_path({str(LAUNCHER)!r}, run_name="__main__")
""")


def _train(args: list[str], tmp_path: Path, fault: dict[str, str] | None = None, timeout: int = 300):
    script = LAUNCHER
    if fault:
        script = tmp_path / "faulty_train.py"
        script.write_text(_FAULTY_LAUNCHER)
    return launch(script, args, nprocs=1, timeout=timeout, check=False, env=fault)


@pytest.fixture(scope="module")
def saved_run(tiny_data, tmp_path_factory):  # noqa: F811  (the imported fixture)
    """A 1-process run of 4 steps with checkpoints at steps 2 and 4 (read-only: tests copy it)."""
    out = tmp_path_factory.mktemp("saved")
    r = _train([*TINY, *tiny_data, f"output_dir={out / 'run'}", "train.max_steps=4"], out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "run"


def _copy(saved_run: Path, dest: Path) -> Path:
    shutil.copytree(saved_run, dest)
    return dest


def _set_aside(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if checkpoint.CORRUPT in p.name)


def _steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


# ----------------------------------------------------------------------------------------------- 3: verify, in-process


def _fake_checkpoint(root: Path, step: int = 2) -> Path:
    """A checkpoint directory with a manifest, without DeepSpeed: two files, hashed as a save hashes them."""
    ckpt = root / checkpoint.tag_for(step)
    ckpt.mkdir(parents=True)
    (ckpt / "a_model_states.pt").write_bytes(os.urandom(3000))
    (ckpt / "trainer_state_rank0.pt").write_bytes(os.urandom(500))
    names = checkpoint.files_of(ckpt)
    checkpoint.write_manifest(ckpt, step, checkpoint.hash_share(ckpt, names, 0, 1), {"world_size": 1})
    return ckpt


@pytest.fixture
def faulty_reads(monkeypatch):
    """`fail(name, exc, times)`: the next `times` opens and stats of a checkpoint file named `name` raise `exc`."""
    import pathlib

    monkeypatch.setattr(checkpoint, "READ_BACKOFF_S", 0.01)
    faults: dict[str, list] = {}
    real_open, real_stat = pathlib.Path.open, pathlib.Path.stat

    def check(path):
        fault = faults.get(Path(path).name)
        if fault and fault[1] != 0:
            fault[1] -= 1
            raise fault[0]

    def fault_open(self, *args, **kwargs):
        check(self)
        return real_open(self, *args, **kwargs)

    def fault_stat(self, *args, **kwargs):
        check(self)
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", fault_open)
    monkeypatch.setattr(pathlib.Path, "stat", fault_stat)

    def fail(name: str, exc: BaseException, times: int = -1) -> None:
        faults[name] = [exc, times]

    return fail


@pytest.mark.parametrize("name", [checkpoint.MANIFEST, "a_model_states.pt", "trainer_state_rank0.pt"])
@pytest.mark.parametrize("exc", [OSError(errno.EIO, "Input/output error"), OSError(errno.ESTALE, "Stale file handle"),
                                 OSError(errno.EACCES, "Permission denied"), MemoryError()],
                         ids=["EIO", "ESTALE", "EACCES", "MemoryError"])
def test_verify_raises_on_a_file_it_cannot_read(tmp_path, faulty_reads, name, exc):
    """Finding 3: a read that fails (not ENOENT) is retried, then raised as an OSError naming the file and the
    errno; it is never reported as damage (a list of problems, which sets the checkpoint aside)."""
    ckpt = _fake_checkpoint(tmp_path)
    faulty_reads(name, exc)
    with pytest.raises(OSError) as info:
        checkpoint.verify(ckpt)
    want = exc.errno if isinstance(exc, OSError) else errno.ENOMEM
    assert info.value.errno == want and info.value.filename == str(ckpt / name)
    assert errno.errorcode[want] in str(info.value) and name in str(info.value)


def test_verify_retries_a_passing_hiccup(tmp_path, faulty_reads):
    """Finding 3: two failed reads, then a good one: the checkpoint verifies."""
    ckpt = _fake_checkpoint(tmp_path)
    faulty_reads("a_model_states.pt", OSError(errno.EIO, "Input/output error"), times=2)
    faulty_reads(checkpoint.MANIFEST, OSError(errno.ESTALE, "Stale file handle"), times=2)
    assert checkpoint.verify(ckpt) == []


def test_verify_reports_proven_damage_only(tmp_path):
    """Finding 3: what is proof of damage (a flipped byte, a size, a missing listed file, a manifest that does not
    parse) is still reported; a file the manifest does not list (an NFS `.nfsXXXX` file, zero_to_fp32.py output)
    is not."""
    ckpt = _fake_checkpoint(tmp_path / "a")
    (ckpt / ".nfs000000000123abcd00000001").write_bytes(b"x")
    (ckpt / "pytorch_model.bin").write_bytes(b"weights")
    assert checkpoint.verify(ckpt) == []
    data = bytearray((ckpt / "a_model_states.pt").read_bytes())
    data[7] ^= 1
    (ckpt / "a_model_states.pt").write_bytes(bytes(data))
    assert "checksum" in checkpoint.verify(ckpt)[0]
    (ckpt / "a_model_states.pt").write_bytes(b"short")
    assert "bytes, the manifest says" in checkpoint.verify(ckpt)[0]
    (ckpt / "a_model_states.pt").unlink()
    assert "missing" in checkpoint.verify(ckpt)[0]
    (ckpt / checkpoint.MANIFEST).write_text('{"step": 2, "files": {"a_mod')
    assert "manifest" in checkpoint.verify(ckpt)[0]
    (ckpt / checkpoint.MANIFEST).unlink()
    assert "manifest" in checkpoint.verify(ckpt)[0]


# ----------------------------------------------------------------------------------------------- 3: resume, end to end


def test_resume_auto_stops_when_no_checkpoint_can_be_read(saved_run, tiny_data, tmp_path):  # noqa: F811
    """Finding 3: every checkpoint's manifest reads fail with EIO (the storage, not the checkpoints). `--resume
    auto` set both aside as damaged and started again from step 0; now it stops with exit 2 naming the file and
    the errno, sets nothing aside, and once the storage is back `--resume` continues from step 4."""
    run = _copy(saved_run, tmp_path / "run")
    args = [*TINY, *tiny_data, f"output_dir={run}", "train.max_steps=5"]
    t0 = time.monotonic()
    r = _train([*args, "--resume", "auto"], tmp_path, fault={"FAULT_PATH": checkpoint.MANIFEST, "FAULT": "EIO"})
    assert r.returncode == 2, f"rc {r.returncode}:\n{r.stderr[-3000:]}"
    assert "manifest.json" in r.stderr and "EIO" in r.stderr, r.stderr[-3000:]
    assert _set_aside(run) == [] and checkpoint.latest_checkpoint(run / "checkpoints").name == "step_00000004"
    assert _steps_logged(run) == [1, 2, 3, 4], "the refused resume trained"
    print(f"stopped in {time.monotonic() - t0:.1f} s")
    r = _train([*args, "--resume"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _steps_logged(run) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("fault", [("optim_states.pt", "MemoryError"), ("trainer_state_rank0.pt", "EACCES")])
def test_resume_stops_on_an_unreadable_shard(saved_run, tiny_data, tmp_path, fault):  # noqa: F811
    """Finding 3: step 4's optimizer shard raises MemoryError, or its trainer state EACCES, on every read: the
    resume stops naming it (it used to set step 4 aside and quietly go back to step 2)."""
    run = _copy(saved_run, tmp_path / "run")
    suffix, kind = fault
    (path,) = (run / "checkpoints" / checkpoint.tag_for(4)).glob(f"*{suffix}")
    name = path.name
    r = _train([*TINY, *tiny_data, f"output_dir={run}", "train.max_steps=5", "--resume"], tmp_path,
               fault={"FAULT_PATH": f"{checkpoint.tag_for(4)}/{name}", "FAULT": kind})
    assert r.returncode == 2, f"rc {r.returncode}:\n{r.stderr[-3000:]}"
    want = "ENOMEM" if kind == "MemoryError" else kind
    assert want in r.stderr and name in r.stderr, r.stderr[-3000:]
    assert _set_aside(run) == [] and _steps_logged(run) == [1, 2, 3, 4]


def test_resume_ignores_files_the_manifest_does_not_list(saved_run, tiny_data, tmp_path):  # noqa: F811
    """Finding 3: an NFS `.nfsXXXX` file (a file deleted while open) and zero_to_fp32.py's output in the newest
    checkpoint are not damage: the resume continues from it (it used to set it aside and go back to step 2)."""
    run = _copy(saved_run, tmp_path / "run")
    ckpt = run / "checkpoints" / checkpoint.tag_for(4)
    (ckpt / ".nfs00000000012a3b4c00000002").write_bytes(b"held open by another client")
    (ckpt / "pytorch_model.bin").write_bytes(b"zero_to_fp32 output")
    r = _train([*TINY, *tiny_data, f"output_dir={run}", "train.max_steps=5", "--resume"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _set_aside(run) == [] and _steps_logged(run) == [1, 2, 3, 4, 5]


class _RunsCode:
    """Unpickling this calls `os.mkdir(marker)`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_resume_stops_on_a_trainer_state_that_runs_code(saved_run, tiny_data, tmp_path):  # noqa: F811
    """Finding 3: a trainer state that names code to run when unpickled (its manifest entry rewritten to match)
    stops the run with an error naming it; it is not set aside as damage (the run went back to step 2)."""
    run = _copy(saved_run, tmp_path / "run")
    ckpt = run / "checkpoints" / checkpoint.tag_for(4)
    target = ckpt / checkpoint.state_file(0)
    marker = tmp_path / "code_ran"
    torch.save({"step": 4, "evil": _RunsCode(marker)}, target)
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    manifest["files"][target.name] = {"size": target.stat().st_size, "sha256": checkpoint.sha256_file(target)}
    (ckpt / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    r = _train([*TINY, *tiny_data, f"output_dir={run}", "train.max_steps=5", "--resume"], tmp_path)
    assert not marker.exists()
    assert r.returncode == 2, f"rc {r.returncode}:\n{r.stderr[-3000:]}"
    assert "refusing to load" in r.stderr and target.name in r.stderr, r.stderr[-3000:]
    assert _set_aside(run) == [] and _steps_logged(run) == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------- 8: fixed inputs


def test_preprocessing_is_fixed_on_resume():
    """Finding 8: image_size, image_mean/image_std and max_text_len are refusals, with the value to put back."""
    from mmscale.training.trainer import config_changes

    saved = {"data": {"image_size": 32, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.2, 0.2, 0.2],
                      "max_text_len": 16, "num_workers": 1}}
    now = {"data": {"image_size": 48, "image_mean": [0.4, 0.5, 0.5], "image_std": [0.3, 0.2, 0.2],
                    "max_text_len": 12, "num_workers": 2}}
    refused = config_changes(saved, now)
    assert [line.split(":")[0] for line in refused] == ["data.image_mean", "data.image_size", "data.image_std",
                                                        "data.max_text_len"]
    assert "resume with data.image_size=32" in refused[1]


@pytest.fixture(scope="module")
def other_tokenizer(tiny_data, tmp_path_factory):  # noqa: F811
    """A tokenizer of the same vocabulary size as tiny_data's, with other ids: the rarest caption word repeated
    until it is the most frequent, so that the word model numbers the same words differently."""
    from collections import Counter

    from mmscale.data import load_tokenizer, train_sentencepiece
    from mmscale.data.tokenizer import captions_from_shards

    shards = tiny_data[0].split("=", 1)[1]
    captions = captions_from_shards(shards)
    rare = Counter(w for c in captions for w in c.split()).most_common()[-1][0]
    tok = train_sentencepiece([*captions, *[rare] * 5000], tmp_path_factory.mktemp("tok2") / "tok", vocab_size=64)
    a, b = load_tokenizer(tiny_data[1].split("=", 1)[1]), load_tokenizer(tok)
    assert a.vocab_size == b.vocab_size and a.encode(captions[0]) != b.encode(captions[0])
    return tok


def test_resume_refuses_another_tokenizer(saved_run, tiny_data, other_tokenizer, tmp_path):  # noqa: F811
    """Finding 8: another tokenizer with the same vocabulary size resumed with remapped ids (logged only); now the
    resume is refused, naming the tokenizer the checkpoint was trained with."""
    run = _copy(saved_run, tmp_path / "run")
    given = tiny_data[1].split("=", 1)[1]
    r = _train([*TINY, tiny_data[0], f"data.tokenizer={other_tokenizer}", f"output_dir={run}", "train.max_steps=5",
                "--resume"], tmp_path)
    assert r.returncode == 2, f"rc {r.returncode}:\n{r.stderr[-3000:]}"
    assert "data.tokenizer" in r.stderr and given in r.stderr, r.stderr[-3000:]
    assert _steps_logged(run) == [1, 2, 3, 4]


def test_resume_refuses_changed_preprocessing(saved_run, tiny_data, tmp_path):  # noqa: F811
    """Finding 8: other image normalisation and text length resumed (logged only); now refused, each named."""
    run = _copy(saved_run, tmp_path / "run")
    r = _train([*TINY, *tiny_data, f"output_dir={run}", "train.max_steps=5", "data.image_mean=[0.5,0.5,0.5]",
                "data.max_text_len=12", "--resume"], tmp_path)
    assert r.returncode == 2, f"rc {r.returncode}:\n{r.stderr[-3000:]}"
    assert "data.image_mean" in r.stderr and "data.max_text_len=16" in r.stderr, r.stderr[-3000:]
    assert _steps_logged(run) == [1, 2, 3, 4]


def test_moved_run_and_copied_tokenizer_resume(saved_run, tiny_data, tmp_path):  # noqa: F811
    """Finding 8: the same tokenizer bytes at another path, in a run moved elsewhere, are not a change."""
    run = _copy(saved_run, tmp_path / "moved" / "run")
    tok = tmp_path / "elsewhere" / "tok.model"
    tok.parent.mkdir()
    shutil.copy(tiny_data[1].split("=", 1)[1], tok)
    r = _train([*TINY, tiny_data[0], f"data.tokenizer={tok}", f"output_dir={run}", "train.max_steps=5", "--resume"],
               tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _steps_logged(run) == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------------------------- 12: rank 0 alone


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["config.yaml", "data"])
def test_a_failure_on_rank_0_alone_stops_every_rank_with_its_message(tiny_data, tmp_path, fault):  # noqa: F811
    """Finding 12: rank 0 fails in work it does alone, on a real condition only it meets: `config.yaml` is a
    directory (its write fails after the engine is built), or `data` is a file (the synthetic data cannot be made,
    while rank 1 waits at the barrier after it). Rank 1 used to learn nothing of it (with gloo it saw "rank 0 died"
    once rank 0's process was gone; with NCCL it waited out the collective timeout). Now both ranks stop within
    seconds, rank 1 with rank 0's message; the collective timeout is 120 s, so a pass cannot be that timeout."""
    run = tmp_path / "run"
    run.mkdir()
    if fault == "config.yaml":
        (run / "config.yaml").mkdir()
        data = list(tiny_data)
        want = ("config.yaml", "IsADirectoryError")
    else:
        (run / "data").write_text("not a folder")
        data = []  # the tiny config's synthetic data, made by rank 0 under output_dir/data
        want = ("preparing the data", str(run / "data"))
    t0 = time.monotonic()
    r = launch(LAUNCHER, [*TINY, *data, f"output_dir={run}", "train.max_steps=2", "deepspeed.collective_timeout_s=120"],
               nprocs=2, timeout=400, check=False)
    took = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode != 0
    ours = [line for line in out.splitlines() if "rank 1: stopping: rank 0 failed" in line]
    assert ours and all(w in ours[0] for w in want), out[-4000:]
    assert took < 100, f"{took:.0f} s: the ranks did not stop within seconds of the failure"
    print(f"{fault}: both ranks stopped {took:.0f} s after the launch (startup included)")
