"""The tests' rank launcher: what `deepspeed --num_gpus N` does on one node, without importing DeepSpeed twice.

`deepspeed --num_gpus N script args` starts two Python processes before any rank (DeepSpeed's runner, then
`deepspeed.launcher.launch`), each importing DeepSpeed and torch: about 8 s of the 15 s a 2-rank job of nothing
costs on the 2-core CI machine, paid by every one of the slow tier's ~100 jobs. This starts the ranks as
`deepspeed.launcher.launch` does (the same environment: MASTER_ADDR/PORT, WORLD_SIZE, RANK, LOCAL_RANK,
LOCAL_SIZE, CROSS_RANK/SIZE; `python -u script --local_rank=I args`), and stops them as it does: the first rank to
exit non-zero has the others terminated (SIGTERM, SIGKILL after 30 s) and its code is this process's code; a
SIGTERM or SIGINT here is passed on to every rank. The ranks are the real thing (DeepSpeed engines over gloo); the
README-commands test, the demo test and a kill -9 test start theirs through the real `deepspeed` launcher.

    python tests/dist/ranks.py NPROCS MASTER_PORT SCRIPT [ARGS...]
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def main() -> int:
    nprocs, port, script, args = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(nprocs),
           "CROSS_RANK": "0", "CROSS_SIZE": "1", "LOCAL_SIZE": str(nprocs)}
    procs = [subprocess.Popen([sys.executable, "-u", script, f"--local_rank={r}", *args],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nprocs)]

    def stop(code: int) -> int:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 30
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return code

    def on_signal(signum, _frame):
        sys.exit(stop(1))

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            return stop(failed[0])
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
