"""Where a job's ranks come from and what they share: launcher environments (SLURM's srun, the `deepspeed`
launcher, torchrun), the rendezvous address, preemption signals, a shared output_dir, and which rank died.

SLURM (`srun`, one task per GPU) sets SLURM_* variables, not the ones torch.distributed reads. `slurm_env` derives

    RANK              SLURM_PROCID
    WORLD_SIZE        SLURM_NTASKS
    LOCAL_RANK        SLURM_LOCALID, or 0 when the task sees a single GPU (`srun --gpus-per-task=1` gives each task
                      its own CUDA_VISIBLE_DEVICES: the local id would point past it, and DeepSpeed selects the
                      device by LOCAL_RANK)
    LOCAL_WORLD_SIZE  this node's entry of SLURM_TASKS_PER_NODE ("2(x3),1" = 2, 2, 2, 1), by SLURM_NODEID
    MASTER_ADDR       the first host of SLURM_JOB_NODELIST (`scontrol show hostnames`); a name that does not
                      resolve falls back to that node's NodeAddr (`scontrol show node NAME`)
    MASTER_PORT       20000 + SLURM_JOB_ID % 20000: two jobs sharing a node do not collide

and never overrides what a launcher already set.

Preemption: `StopSignals` turns SIGUSR1 (sbatch `--signal=B:USR1@120`, forwarded by launchers/slurm/train.sbatch)
and SIGTERM (scancel, SLURM's preemption) into a flag the trainer reads once per step; the ranks agree on it in the
step's first all-reduce, finish that step, write one checkpoint and exit with EXIT_REQUEUE. Data-loader workers
ignore both signals (srun signals every process of a task): their parent stops them.

A dead peer is told by where an error came from, never by its words: mmscale's collectives and the engine's
DeepSpeed verbs run inside `collective(...)`, which turns only an error raised by a collective (gloo, NCCL, a
timeout) into CollectiveError; the trainer then names the rank that is gone (`find_dead_ranks`). Any other error (a
data error, a full disk, the model's) takes the normal error path with its own message and exit status.
"""

from __future__ import annotations

import contextlib
import dis
import functools
import importlib.util
import logging
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("mmscale.cluster")

EXIT_REQUEUE = 85
"""Exit status of a run that stopped on a preemption signal after writing its checkpoint: requeue me (the sbatch
script does; the next start resumes by itself)."""
EXIT_PEER_FAILED = 4
"""Exit status of a rank that stopped because another rank died or stopped answering."""

from mmscale.data.pipeline import PREEMPT_SIGNALS  # noqa: E402  (the data workers ignore them)


# ----------------------------------------------------------------------------------------------- SLURM environment


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE ("2(x3),1") -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"SLURM_TASKS_PER_NODE={spec!r}: cannot read {part!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def _scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], check=True, capture_output=True, text=True, timeout=30).stdout


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list ("n[1-2],gpu07" -> "n1"), expanded by `scontrol show hostnames`."""
    try:
        return _scontrol("show", "hostnames", nodelist).split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        # no scontrol here (a copied environment): the simple forms by hand
        m = re.match(r"([^\[,]+)(?:\[(\d+))?", nodelist)
        if not m:
            raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot find its first host") from None
        return m.group(1) + (m.group(2) or "")


def node_address(host: str) -> str:
    """An address for `host`: the name itself when it resolves, else the NodeAddr SLURM has for it (simulated or
    badly named nodes; without the fallback the rendezvous waits for its whole timeout)."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except socket.gaierror:
        pass
    try:
        m = re.search(r"\bNodeAddr=(\S+)", _scontrol("show", "node", host, "-o"))
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"MASTER_ADDR: host {host!r} (first of SLURM_JOB_NODELIST) does not resolve, and "
                           f"`scontrol show node {host}` failed ({e}); set MASTER_ADDR to its address") from None
    if not m:
        raise RuntimeError(f"MASTER_ADDR: host {host!r} does not resolve and SLURM records no NodeAddr for it; "
                           f"set MASTER_ADDR to its address")
    return m.group(1)


def slurm_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The torch.distributed variables a SLURM task lacks, derived from SLURM's (see the module doc). Empty outside
    a SLURM task, or when a launcher (deepspeed, torchrun) inside the allocation already set RANK."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return {}
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
           "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) == 1:  # one GPU per task (--gpus-per-task=1): device 0 of its own, whatever its SLURM_LOCALID
        out["LOCAL_RANK"] = "0"
    per_node = env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE")
    if per_node:
        counts = expand_tasks_per_node(per_node)
        out["LOCAL_WORLD_SIZE"] = str(counts[min(int(env.get("SLURM_NODEID", 0)), len(counts) - 1)])
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        out["MASTER_ADDR"] = node_address(first_host(nodelist)) if nodelist else "127.0.0.1"
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return out


def apply_launcher_env() -> dict[str, str]:
    """Fill in torch.distributed's variables from SLURM's (when this is a SLURM task) and log what was derived."""
    derived = slurm_env()
    if derived:
        os.environ.update(derived)
        log.info("SLURM job %s task %s on %s: %s", os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_PROCID"),
                 socket.gethostname(), " ".join(f"{k}={v}" for k, v in derived.items()))
    return derived


def write_hostfile(path: str | Path, slots: int | None = None, environ: dict[str, str] | None = None) -> list[str]:
    """A DeepSpeed hostfile ("host slots=N" per node) for this SLURM allocation, for the `deepspeed` launcher's
    multi-node mode (`deepspeed --hostfile FILE launchers/train.py ...`). `slots`: GPUs per node; default
    SLURM_GPUS_ON_NODE, else the allocation's tasks per node. Returns the lines written."""
    env = os.environ if environ is None else environ
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise RuntimeError("write_hostfile: SLURM_JOB_NODELIST is not set; run it inside a SLURM allocation "
                           "(salloc/sbatch)")
    hosts = _scontrol("show", "hostnames", nodelist).split()
    if slots is None and env.get("SLURM_GPUS_ON_NODE"):
        slots = int(env["SLURM_GPUS_ON_NODE"])
    counts = [slots] * len(hosts) if slots else expand_tasks_per_node(env.get("SLURM_TASKS_PER_NODE", "1"))
    if len(counts) != len(hosts):
        counts = (counts * len(hosts))[: len(hosts)]
    lines = [f"{h} slots={n}" for h, n in zip(hosts, counts)]
    Path(path).write_text("\n".join(lines) + "\n")
    return lines


# ----------------------------------------------------------------------------------------------- preemption


class StopSignals:
    """SIGUSR1/SIGTERM -> a flag (`received`) while installed. `install`/`restore` nest: the launcher installs at
    its start (a signal during the build is not lost: the run stops after its first step), the trainer around
    `train()`; the previous handlers come back when the outermost restores.

    A handler only records: the checkpoint in progress (if any) finishes as it would, and the trainer stops after
    the step the ranks agree on. A second signal changes nothing."""

    def __init__(self):
        self.received: int | None = None
        self._old: dict[int, Any] = {}
        self._depth = 0

    def _handle(self, signum, _frame) -> None:
        if self.received is None:
            self.received = signum
            log.warning("received %s: finishing the current step, then a checkpoint, then exit %d (requeue)",
                        signal.Signals(signum).name, EXIT_REQUEUE)

    def install(self) -> StopSignals:
        import threading

        if threading.current_thread() is not threading.main_thread():  # Python allows handlers only there
            return self
        if self._depth == 0:
            self.received = None
            for s in PREEMPT_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        self._depth += 1
        return self

    def restore(self) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            for s, old in self._old.items():
                signal.signal(s, old)
            self._old.clear()


STOP_SIGNALS = StopSignals()
"""The process's one set of preemption handlers (signal handlers are per process)."""


# ----------------------------------------------------------------------------------------------- shared output_dir


class SharedDirError(RuntimeError):
    """output_dir is not one filesystem for every rank (raised on every rank alike)."""


def shared_dir_problems(output_dir: str | Path) -> list[str]:
    """Every rank must see what rank 0 writes in output_dir (data it generates, the tokenizer it trains, the
    checkpoints it commits). Rank 0 writes a token file; every rank reads it; all compare. Collective."""
    from mmscale.training.engine import all_gather_object, barrier, broadcast_object

    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    root = Path(output_dir)
    token = broadcast_object(uuid.uuid4().hex if rank == 0 else None)
    probe = root / f".mmscale-shared-{token}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    barrier()
    seen = False
    deadline = time.monotonic() + 10  # an NFS client may cache a directory listing for a few seconds
    while True:
        try:
            seen = probe.read_text() == token
        except OSError:
            seen = False
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    views = all_gather_object((rank, socket.gethostname(), seen))
    barrier()
    if rank == 0:
        probe.unlink(missing_ok=True)
    blind = [(r, host) for r, host, ok in views if not ok]
    if not blind:
        return []
    hosts = sorted({h for _, h in blind})
    return [f"output_dir {str(root)!r}: a file rank 0 wrote there ({probe.name}) is not visible to rank(s) "
            f"{', '.join(str(r) for r, _ in blind)} on {', '.join(hosts)}. Rank 0 generates data, trains the "
            f"tokenizer and commits checkpoints there for every rank: put output_dir on a filesystem every node "
            f"mounts (NFS, Lustre, GPFS), not on node-local disk"]


# ----------------------------------------------------------------------------------------------- who died


class CollectiveError(RuntimeError):
    """A collective failed (an all-reduce, all-gather, broadcast or barrier of mmscale's, or one DeepSpeed runs in
    forward, backward, step or a checkpoint write): another rank died, or did not answer within the collective
    timeout. Raised by `collective` from the collective's own error (its `__cause__`)."""

    def __init__(self, op: str, cause: BaseException):
        super().__init__(f"{op}: {type(cause).__name__}: {cause}")
        self.op = op


@contextlib.contextmanager
def collective(op: str, deepspeed: bool = False) -> Iterator[None]:
    """Around code that runs collectives (`op` names it in the message): an error raised inside one of them (see
    `raised_by_collective`) leaves as CollectiveError; any other (the model's, the data's, a full disk's) leaves as
    it came, to take the normal error path. `deepspeed`: the section runs DeepSpeed, whose ZeRO-3 code waits on
    its own collectives' handles (a failed gather surfaces there, not in torch.distributed)."""
    try:
        yield
    except CollectiveError:
        raise
    except Exception as e:
        if raised_by_collective(e, deepspeed=deepspeed):
            raise CollectiveError(op, e) from e
        raise


@functools.lru_cache(maxsize=None)
def _package_dir(name: str) -> str | None:
    """The folder of an importable package, found without importing it (DeepSpeed's import takes seconds)."""
    spec = importlib.util.find_spec(name)
    locations = list(spec.submodule_search_locations or []) if spec else []
    return os.path.join(os.path.realpath(locations[0]), "") if locations else None


def _at_raise_statement(tb: Any) -> bool:
    """Whether a traceback entry stopped at a Python `raise` (the code's own error), not at a call into native code
    that failed (a gloo or NCCL operation, `Work.wait()`)."""
    try:
        return dis.opname[tb.tb_frame.f_code.co_code[tb.tb_lasti]] in ("RAISE_VARARGS", "RERAISE")
    except (IndexError, AttributeError):
        return False


def raised_by_collective(e: BaseException, deepspeed: bool = False) -> bool:
    """Whether `e` came out of a collective, judged by where it was raised, never by its words: a CollectiveError;
    one of torch.distributed's own error types (DistBackendError, DistNetworkError, DistStoreError: NCCL, the
    rendezvous store); or a plain RuntimeError (what gloo raises for a closed connection or a timeout) raised by
    native code that torch.distributed's Python called (with `deepspeed`, DeepSpeed's Python too), not by one of
    that code's own `raise` statements. A data error, an OSError from a write, a model's error: False, whatever
    their messages say ("timed out", "socket", "connection refused")."""
    import torch.distributed as dist

    if isinstance(e, CollectiveError):
        return True
    if isinstance(e, getattr(dist, "DistError", ())) and not isinstance(e, ValueError):
        return True
    if type(e) is not RuntimeError or e.__traceback__ is None:  # (a subclass is someone's own error type)
        return False
    tb = e.__traceback__
    while tb.tb_next is not None:  # the innermost entry: where it was raised
        tb = tb.tb_next
    where = os.path.realpath(tb.tb_frame.f_code.co_filename)
    code = [_package_dir("torch.distributed")] + ([_package_dir("deepspeed")] if deepspeed else [])
    return any(d and where.startswith(d) for d in code) and not _at_raise_statement(tb)


def is_peer_failure(e: BaseException) -> bool:
    """An error raised inside a collective because another rank died or never answered (gloo, NCCL, the store):
    the trainer then names the rank that is gone. mmscale's collectives and the engine's DeepSpeed verbs mark
    theirs (`collective`); anything else takes the normal error path with its own message and exit status."""
    return raised_by_collective(e)


def find_dead_ranks(store: Any, rank: int, world_size: int, grace_s: float) -> tuple[list[int] | None, str]:
    """After a failed collective: every live rank checks in at the rendezvous store; after `grace_s` the ranks
    that did not are the dead (or stuck) ones. (None, why) when the store itself is gone: it lives in rank 0's
    process (the MASTER_ADDR host), so rank 0 is then the one that died."""
    try:
        store.set(f"mmscale/alive/{rank}", "1")
        deadline = time.monotonic() + grace_s
        missing = []
        while True:
            missing = [r for r in range(world_size) if not store.check([f"mmscale/alive/{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing, ""
            time.sleep(0.5)
    except Exception as e:  # noqa: BLE001  (any store error: the store is unreachable)
        return None, f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """`python -m mmscale.training.cluster hostfile FILE [--slots N]`: the DeepSpeed hostfile of this allocation;
    `python -m mmscale.training.cluster env`: what mmscale derives from this SLURM task's variables."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m mmscale.training.cluster", description=main.__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hostfile", help="write a DeepSpeed hostfile for this SLURM allocation")
    h.add_argument("path")
    h.add_argument("--slots", type=int, default=None, help="GPUs per node (default: SLURM_GPUS_ON_NODE or tasks)")
    sub.add_parser("env", help="print RANK, WORLD_SIZE, ... as derived from SLURM's variables")
    args = p.parse_args(argv)
    if args.cmd == "hostfile":
        print("\n".join(write_hostfile(args.path, args.slots)))
    else:
        print("\n".join(f"{k}={v}" for k, v in slurm_env().items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
