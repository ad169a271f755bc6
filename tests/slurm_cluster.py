"""A real SLURM cluster on this machine for the tests: munged, slurmctld and two slurmd (nodes n1 and n2, both
127.0.0.1, distinct ports), configured in a temporary folder (SLURM_CONF) and stopped by the test that started it.

Needs root and the Debian packages slurm-wlm and munge (`.ci/run` installs them); see ../shared/notes/
slurm-localhost.md for the facts this follows. `unavailable()` says why a cluster cannot start here.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel", "srun")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def unavailable() -> str | None:
    """Why a SLURM cluster cannot be started here, or None."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the SLURM daemons need root here"
    if not Path("/etc/munge/munge.key").exists():
        return "no /etc/munge/munge.key (the munge package creates it)"
    return None


def _bin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []
        self.started_munged = False

    # --------------------------------------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 60) -> SlurmCluster:
        host = socket.gethostname()
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=2 CoresPerSocket=2 "
            f"ThreadsPerCore=1 RealMemory=8000" for n, port in (("n1", 17101), ("n2", 17102)))
        self.conf.write_text(f"""ClusterName=mmscale-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort=17100
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=3600
KillWait=10
StateSaveLocation={self.root}/state
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmdSpoolDir={self.root}/spool/%n
SlurmdLogFile={self.root}/log/slurmd-%n.log
{nodes}
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
""")
        self._start_munged()
        self.procs.append(subprocess.Popen([_bin("slurmctld"), "-D", "-i"], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for n in ("n1", "n2"):
            self.procs.append(subprocess.Popen([_bin("slurmd"), "-D", "-N", n], env=self.env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + timeout
        states: list[str] = []
        while time.monotonic() < deadline:
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
            states = r.stdout.split("\n")
            if r.returncode == 0 and sum("idle" in s for s in states) == 2:
                return self
            time.sleep(0.5)
        logs = "\n".join(p.read_text()[-2000:] for p in (self.root / "log").glob("*.log"))
        self.stop()
        raise RuntimeError(f"the SLURM cluster did not come up in {timeout} s (sinfo: {states}):\n{logs}")

    def _start_munged(self) -> None:
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            return  # one is running (the machine's own, or an earlier test's): share it
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", _bin("munged")], check=True)
        self.started_munged = True

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
        time.sleep(0.5)
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        if self.started_munged:
            subprocess.run(["pkill", "-x", "munged"], capture_output=True)

    # --------------------------------------------------------------------------------------------- jobs

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def submit(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
        """`sbatch --parsable ARGS` (or a script that calls it, if args[0] is a path); the job id."""
        cmd = args if args[0].endswith(".sh") else ["sbatch", "--parsable", *args]
        r = subprocess.run(cmd, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                           timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stdout}{r.stderr}")
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", job_id, "-o", check=False).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait(self, job_id: str, timeout: float) -> dict[str, str]:
        """The job's record once it reached a final state; TimeoutError (after cancelling it) if it did not."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES:
                return info
            time.sleep(1)
        self.run("scancel", job_id, check=False)
        raise TimeoutError(f"job {job_id} not done after {timeout} s: {info}")

    def pids_of(self, job_id: str, procid: int, needle: str) -> list[int]:
        """PIDs of this job's processes of task `procid` whose command line holds `needle` (read from /proc)."""
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                env = dict(kv.split("=", 1) for kv in (d / "environ").read_bytes().decode(errors="replace")
                           .split("\0") if "=" in kv)
            except OSError:
                continue
            if needle in cmd and env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(procid):
                out.append(int(d.name))
        return sorted(out)
