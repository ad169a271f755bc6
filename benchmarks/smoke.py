"""The smoke contract every benchmark keeps, and where a benchmark writes.

`--smoke` runs tiny sizes (seconds to a minute on 2 CPU cores) and proves the script works: it still prints its
table, writes its JSON and prints the headline as one JSON object on its last stdout line, but its figures mean
nothing. So a smoke run never writes into the repository: without `--out` its JSON goes to a fresh temporary
folder (named on stderr), and so do the data and runs it makes unless `--work-dir` names a folder; an `--out` or
`--work-dir` inside benchmarks/results/ is refused. Without `--smoke`, `--out` defaults to the committed
benchmarks/results/<name>.json.

A helper module, not a script (tests/test_benchmarks.py lists it as such).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]


def add_smoke_args(p: argparse.ArgumentParser, name: str, *, quick_alias: bool = False,
                   work_dir: str | None = None) -> None:
    """--smoke (and --quick as its alias where a script had it), --out, and --work-dir if the script makes data or
    runs (`work_dir`: what it holds and where it goes by default, for the help)."""
    flags = ("--smoke", "--quick") if quick_alias else ("--smoke",)
    p.add_argument(*flags, dest="smoke", action="store_true",
                   help="tiny sizes: checks the script in well under a minute, the figures mean nothing; never "
                        "writes into the repository" + (" (--quick: the same)" if quick_alias else ""))
    p.add_argument("--out", default=None, metavar="FILE.json",
                   help=f"JSON results file (default benchmarks/results/{name}.json; with --smoke, a new temporary "
                        f"folder's {name}.json)")
    if work_dir is not None:
        p.add_argument("--work-dir", default=None, metavar="DIR",
                       help=f"{work_dir} (with --smoke, default: a new temporary folder)")


def check_smoke_paths(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses a smoke run's --out or --work-dir inside benchmarks/results/ (its committed figures)."""
    if not args.smoke:
        return
    for flag in ("out", "work_dir"):
        value = getattr(args, flag, None)
        if value and Path(value).resolve().is_relative_to(RESULTS):
            p.error(f"--smoke writes meaningless figures: --{flag.replace('_', '-')} {value} is inside "
                    f"{RESULTS.relative_to(ROOT)}/, whose files are the committed results; give a path elsewhere "
                    f"or none (a temporary folder)")


def temp_dir(name: str) -> Path:
    """A new temporary folder for a smoke run, named on stderr."""
    d = Path(tempfile.mkdtemp(prefix=f"mmscale-smoke-{name}-"))
    print(f"{name}: smoke run, writing under {d}", file=sys.stderr, flush=True)
    return d


def out_path(args: argparse.Namespace, name: str, smoke_dir: Path | None = None) -> Path:
    """Where the JSON goes: --out, else benchmarks/results/<name>.json, else (smoke) `smoke_dir` or a new
    temporary folder's <name>.json. Call it only on the process that writes (rank 0)."""
    if args.out:
        return Path(args.out)
    if not args.smoke:
        return RESULTS / f"{name}.json"
    return (smoke_dir or temp_dir(name)) / f"{name}.json"


def work_dir(args: argparse.Namespace, name: str, default: Path) -> Path:
    """Where the data and runs go: --work-dir, else `default` (a full run), else (smoke) a new temporary folder."""
    if args.work_dir:
        return Path(args.work_dir)
    return temp_dir(name) if args.smoke else default
