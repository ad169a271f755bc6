"""SLURM: the real sbatch script on a real two-node cluster on this machine (tests/slurm_cluster.py), against the
same run under the `deepspeed` launcher; preemption by SIGUSR1 with requeue and resume; a killed rank.

The cluster tests skip (with the reason) only where SLURM cannot run: not installed, or not root.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from mmscale.training import checkpoint
from mmscale.training.cluster import expand_tasks_per_node, slurm_env
from slurm_cluster import SlurmCluster, unavailable
from test_training import ROOT, launch, tiny_data  # noqa: F401  (tiny_data is a fixture)

STEPS = 24
COMMON = [f"train.max_steps={STEPS}", "train.checkpoint_every=8", "logging.log_every=1",
          "deepspeed.zero_stage=3", "deepspeed.collective_timeout_s=30", "data.num_workers=1"]


# ----------------------------------------------------------------------------------------------- no cluster needed


def test_slurm_env_derivation():
    """What mmscale derives from a task's SLURM variables (the values srun sets, as seen in a real 2-node job)."""
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "4242"}
    assert slurm_env(env) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                              "MASTER_ADDR": "localhost", "MASTER_PORT": str(20000 + 4242)}
    # one GPU per task: LOCAL_RANK is that GPU's index, 0, whatever SLURM_LOCALID says
    assert slurm_env({**env, "CUDA_VISIBLE_DEVICES": "5"})["LOCAL_RANK"] == "0"
    assert slurm_env({**env, "CUDA_VISIBLE_DEVICES": "0,1"})["LOCAL_RANK"] == "1"
    # a launcher inside the allocation (deepspeed, torchrun) already set them: nothing is overridden
    assert slurm_env({**env, "RANK": "0"}) == {}
    assert slurm_env({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}).keys() == {
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}
    assert slurm_env({}) == {}
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(ValueError, match="SLURM_TASKS_PER_NODE"):
        expand_tasks_per_node("two")


# ----------------------------------------------------------------------------------------------- the cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = unavailable()
    if why:
        pytest.skip(why)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def data(tiny_data):
    """Shards and a tokenizer every run of this module shares, so runs differ only in how they were launched."""
    return tiny_data


def _losses(run: Path) -> dict[int, float]:
    """The last logged loss of each step in the run's metrics.jsonl (a resumed run truncates and goes on)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run under the deepspeed launcher (2 ranks): the losses every SLURM job must give."""
    run = tmp_path_factory.mktemp("ref") / "run"
    launch(ROOT / "launchers/train.py", ["--config", "configs/tiny.yaml", f"output_dir={run}", *data, *COMMON],
           nprocs=2)
    losses = _losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _assert_matches(losses: dict[int, float], reference: dict[int, float]) -> None:
    # The tolerance of the ZeRO-3 2-rank vs 1-process test (test_training): 1e-4 relative. Same world size and
    # data order here, so the runs should in fact agree far closer.
    assert sorted(losses) == sorted(reference)
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4), (step, losses[step], loss)


def _sbatch(cluster: SlurmCluster, tmp_path: Path, layout: list[str], run: Path, data: list[str],
            extra: tuple[str, ...] = ()) -> str:
    return cluster.submit([*layout, f"--output={tmp_path / 'job.out'}", "launchers/slurm/train.sbatch",
                           "--config", "configs/tiny.yaml", f"output_dir={run}", *data, *COMMON, *extra], cwd=ROOT)


def _log(tmp_path: Path) -> str:
    return (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else "(no job output)"


@pytest.mark.slow
def test_two_nodes_one_task_each_matches_the_deepspeed_launcher(cluster, data, reference, tmp_path):
    """sbatch -N 2 --ntasks-per-node 1: ranks on the two nodes rendezvous at the first node's address (a simulated
    node name that does not resolve: the NodeAddr fallback) and train as the deepspeed launcher's 2 ranks do."""
    run = tmp_path / "run"
    job = _sbatch(cluster, tmp_path, ["--nodes=2", "--ntasks-per-node=1"], run, data)
    info = cluster.wait(job, 600)
    log = _log(tmp_path)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert "SLURM job" in log and "MASTER_ADDR=127.0.0.1" in log and "LOCAL_WORLD_SIZE=1" in log, log[-4000:]
    assert info["NodeList"] == "n[1-2]"
    _assert_matches(_losses(run), reference)


@pytest.mark.slow
def test_one_node_two_tasks_through_submit_sh_matches(cluster, data, reference, tmp_path):
    """submit.sh --nodes 1 --tasks-per-node 2 (CPU ranks): two tasks of one node, the same losses."""
    run = tmp_path / "run"
    job = cluster.submit(["launchers/slurm/submit.sh", "--nodes", "1", "--tasks-per-node", "2", "--job-name",
                          "mmscale-1x2", "--sbatch-arg", f"--output={tmp_path / 'job.out'}", "--config",
                          "configs/tiny.yaml", f"output_dir={run}", *data, *COMMON], cwd=ROOT)
    info = cluster.wait(job, 600)
    log = _log(tmp_path)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert info["NumNodes"] == "1" and info["NumTasks"] == "2" and "LOCAL_WORLD_SIZE=2" in log, (info, log[-3000:])
    _assert_matches(_losses(run), reference)


def _wait_for_step(run: Path, step: int, job: str, cluster: SlurmCluster, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and any(s >= step for s in _steps(run)):
            return
        if cluster.job(job).get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise AssertionError(f"job {job} ended before step {step}: {cluster.job(job)}")
        time.sleep(0.2)
    raise TimeoutError(f"job {job} did not reach step {step} in {timeout} s")


@pytest.mark.slow
def test_sigusr1_checkpoints_requeues_and_resumes_to_the_same_loss(cluster, data, reference, tmp_path):
    """SIGUSR1 to the batch script mid-run (as sbatch --signal=B:USR1@120 sends it): every rank finishes its step,
    one checkpoint is written, the job requeues itself and its next start resumes without --resume added, and the
    run ends with the uninterrupted run's losses, each step logged once."""
    run = tmp_path / "run"
    job = _sbatch(cluster, tmp_path, ["--nodes=2", "--ntasks-per-node=1"], run, data)
    _wait_for_step(run, 3, job, cluster)
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    info = cluster.wait(job, 900)
    log = _log(tmp_path)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-6000:]
    assert info["Restarts"] == "1", (info, log[-6000:])
    assert "got SIGUSR1" in log and "stopped with a checkpoint (exit 85); requeueing" in log, log[-6000:]
    stopped = [int(line.split("stopped at step ")[1].split()[0]) for line in log.splitlines()
               if "stopped at step " in line]
    assert stopped and 3 <= stopped[0] < STEPS, log[-6000:]
    # the signal's checkpoint is the one the second start resumed from (not the periodic one before it)
    assert f"resumed from {run / 'checkpoints' / checkpoint.tag_for(stopped[0])}" in log, log[-6000:]
    assert _steps(run) == list(range(1, STEPS + 1))
    _assert_matches(_losses(run), reference)


@pytest.mark.slow
def test_a_killed_rank_fails_the_job_within_the_timeout_naming_it(cluster, data, tmp_path):
    """kill -9 of rank 1's process: rank 0 does not hang; it names rank 1 and the step and exits, and the job
    fails, well within deepspeed.collective_timeout_s (30 s) of the kill."""
    run = tmp_path / "run"
    job = _sbatch(cluster, tmp_path, ["--nodes=2", "--ntasks-per-node=1"], run, data, extra=("data.num_workers=0",))
    _wait_for_step(run, 2, job, cluster)
    pids = cluster.pids_of(job, 1, "launchers/train.py")
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    killed = time.monotonic()
    info = cluster.wait(job, 120)
    elapsed = time.monotonic() - killed
    log = _log(tmp_path)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", (info, log[-4000:])
    assert elapsed < 30 + 15, (elapsed, log[-4000:])
    assert "rank 0: a collective failed at step" in log and "rank(s) 1 " in log, log[-4000:]


@pytest.mark.slow
def test_hostfile_from_the_allocation(cluster, tmp_path):
    """The DeepSpeed hostfile helper inside a 2-node allocation: one line per node with its slots."""
    out = tmp_path / "hostfile"
    r = cluster.run("srun", "--nodes=2", "--ntasks-per-node=1", "--chdir", str(ROOT), "bash", "-c",
                    f"[ $SLURM_PROCID = 0 ] && python -m mmscale.training.cluster hostfile {out} --slots 8 || true")
    assert out.read_text() == "n1 slots=8\nn2 slots=8\n", r.stdout + r.stderr


@pytest.mark.slow
def test_output_dir_not_shared_by_every_rank_is_refused(tmp_path):
    """Rank 1 runs in its own mount namespace with a private tmpfs over output_dir (node-local disk, as a second
    node would have it): both ranks get the error naming rank 1 and the fix; with one shared folder, none."""
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to give one rank a private mount")
    from test_training import _port

    script = ROOT / "tests/dist/shared_dir.py"
    for shared in (True, False):
        out, result = tmp_path / f"out-{shared}", tmp_path / f"result-{shared}"
        out.mkdir()
        port = str(_port())
        procs = []
        for rank in (0, 1):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            cmd = [sys.executable, str(script), str(out), str(result)]
            if rank == 1 and not shared:
                cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                       f'mount -t tmpfs tmpfs "{out}" && exec "$0" "$@"', *cmd]
            procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
        logs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], logs
        views = [json.loads(Path(f"{result}.rank{r}").read_text()) for r in (0, 1)]
        if shared:
            assert views == [[], []]
        else:  # every rank gets the same verdict, so every rank stops alike
            assert views[0] == views[1] and len(views[0]) == 1, views
            assert "not visible to rank(s) 1" in views[0][0] and "filesystem every node mounts" in views[0][0]
            assert not list(out.glob(".mmscale-shared-*")), "the probe file is left behind"


# ----------------------------------------------------------------------------------------------- preemption, no cluster


@pytest.mark.slow
def test_a_signal_during_a_checkpoint_write_lets_it_finish_then_stops(data, tmp_path):
    """SIGUSR1 reaches both ranks as step 4's checkpoint starts: that checkpoint completes intact, the ranks stop
    after step 5 with its checkpoint, and a resume from it ends with the uninterrupted run's losses."""
    from test_training import RUN_TINY

    common = [*data, "train.max_steps=8", "train.checkpoint_every=4", "deepspeed.zero_stage=3"]
    launch(RUN_TINY, [str(tmp_path / "full.json"), f"output_dir={tmp_path / 'full'}", *common], nprocs=2)
    run = tmp_path / "cut"
    launch(RUN_TINY, [str(tmp_path / "a.json"), f"output_dir={run}", "--signal-in-save", "4", *common], nprocs=2)
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["preempted"] == "SIGUSR1" and a["step"] == 5, a
    root = run / "checkpoints"
    assert [c.name for c in checkpoint.complete_checkpoints(root)] == ["step_00000004", "step_00000005"]
    assert checkpoint.verify(root / "step_00000004") == [] and checkpoint.verify(root / "step_00000005") == []
    launch(RUN_TINY, [str(tmp_path / "b.json"), f"output_dir={run}", "--resume", *common], nprocs=2)
    full = {r["step"]: r["loss"] for r in json.loads((tmp_path / "full.json").read_text())["history"] if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in json.loads((tmp_path / "b.json").read_text())["history"] if "loss" in r}
    assert sorted(resumed) == [6, 7, 8]
    for step in (6, 7, 8):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6), (step, resumed, full)


@pytest.mark.slow
def test_sigterm_to_a_single_process_run_checkpoints_and_exits_85(data, tmp_path):
    """SIGTERM (scancel, SLURM's preemption) to `python launchers/train.py`: the step finishes, a checkpoint is
    written, the exit status asks for a requeue, and the data-loader worker did not die of the signal."""
    import subprocess
    import sys

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "launchers/train.py", "--config", "configs/tiny.yaml", f"output_dir={run}",
                             *data, "train.max_steps=200", "train.checkpoint_every=0", "logging.log_every=1",
                             "data.num_workers=1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not ((run / "metrics.jsonl").exists() and any(s >= 2 for s in _steps(run))):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)  # the whole process group, as slurmstepd signals every process
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 85, out[-4000:]
    stopped = max(_steps(run))
    assert 2 <= stopped < 200 and f"stopped at step {stopped} on SIGTERM" in out, out[-4000:]
    assert checkpoint.latest_checkpoint(run / "checkpoints").name == checkpoint.tag_for(stopped)
    assert "DataLoader worker" not in out, out[-4000:]
