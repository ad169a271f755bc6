"""Every command in README.md runs: the README is executed, not just read.

README.md is parsed at test time: every fenced ```bash / ```sh / ```shell block, and every untagged fence or
4-space indented code block that holds a command (a block that YAML reads as a mapping or a list is a config
snippet, not a command). Backslash continuations are joined, comments (a `#` that starts a word outside quotes)
dropped, and `&&` / `;` chains split into their commands. Each command must match one entry of `TABLE`, exactly
(whitespace collapsed):

- `Run`: run it, shrunk: arguments appended (a later `key=value` override or flag wins: 2 steps of tiny data,
  `--smoke`, `--batches 1`, `--samples 16`, `--limit 2`), placeholders replaced (`DIR`, `configs/X.yaml`, ...);
- `Skip`: not run, and why (a real SLURM job or multi-node launch, a GPU-only script, a server, the installs, the
  test suite itself, a scratch-venv install of the newest releases).

A README command that no entry matches fails the test ("README command not covered by ..."), and so does an entry
that matches no README command (a stale table): a new command in the README forces a decision here. That check,
and the check that `.ci/run` runs the README's test command line verbatim, are the fast tests; the slow one runs.

`test_readme_commands_run` runs every `Run` command in README order (an entry's `after` moves it behind the
command whose output it needs: `evaluate.py --compare runs/demo-finetune` is shown before the fine-tuning that
makes that run), each in a fresh `bash -c` with the test interpreter's bin folder first on PATH (so `python`,
`deepspeed` and the `mmscale-*` console scripts are this environment's), in its own process group that is killed
however the command ends (tests/test_training.py's `launch`), `deepspeed` with a free `--master_port`. A command
that the README repeats (the demo job, the fine-tuning, ...) runs once, at its first place.

Pass 1, from the repository root, writes nothing into the checkout: relative output and input paths of the
commands (`runs/`, `exported/`, `shards/`, `docs/`, `tok`, `data/digits`, `my_pngs/`, `pairs.jsonl`, `docs.jsonl`)
become paths in a temporary folder, and the configs that name `runs/demo` (configs/demo.yaml's output_dir,
configs/demo-finetune.yaml's init_from and tokenizer) get overrides into it (`pass1`); `git status --porcelain
--ignored` must show no new file afterwards (byte-code caches, and new Python sources or edits of tracked files,
which are people's work in a shared tree, aside; any change under benchmarks/results/ counts).

Pass 2 runs from a fresh temporary working directory, the repository's paths (`configs/`, `launchers/`,
`benchmarks/`, ...) made absolute and the outputs left as the README writes them (relative: into that directory;
the config files' `runs/demo` resolves there too). It covers a subset, to stay inside the time budget: every
command that starts no DeepSpeed job (but the Measured section's repeats of evaluate.py and mmscale-demo-objects),
plus the demo's `deepspeed` train and the resume of its copy (`output_dir=/tmp/demo-copy --resume`: a
moved run resumed from another directory); the runs it does not make itself (the fine-tuning's and the LoRA run's) are copied from pass 1 into
it, so they are also read after a move (their paths are stored relative to the run). Entries with `again=False`
are pass 1 only.

Each command's time is printed as it finishes (`-s`). Measured on the 2-core AMD EPYC, 2026-12-07, while other
jobs shared it (load average about 6): pass 1, 38 commands (14 DeepSpeed jobs, 3 of them inside benchmarks), 609 s;
pass 2, 26 commands (3 DeepSpeed jobs; 2 since then), 283 s; 892 s in all. A 2-rank DeepSpeed job of 2 demo steps costs 20-40 s
here, most of it start-up; a command that starts none, 2-20 s.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"

# ------------------------------------------------------------------------------------------------ parsing README

SHELL_LANGS = {"bash", "sh", "shell"}
_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass(frozen=True)
class Command:
    text: str  # one command: comments dropped, whitespace outside quotes collapsed
    line: str  # the whole logical line it came from (continuations joined, comment dropped), for .ci/run
    lineno: int  # README line where its block starts


def _is_command_block(body: str) -> bool:
    """An untagged or indented code block: a command unless YAML reads it as a mapping or a list (a config)."""
    try:
        return not isinstance(yaml.safe_load(body), (dict, list))
    except yaml.YAMLError:
        return True


def code_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, body) of every shell code block of a Markdown text."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m:
            indent, fence, lang = m.groups()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(fence):
                j += 1
            body = textwrap.dedent("\n".join(lines[i + 1:j]))
            if lang.lower() in SHELL_LANGS or (not lang and _is_command_block(body)):
                blocks.append((i + 2, body))
            i = j + 1
            continue
        # an indented code block: 4+ spaces after a blank line (it cannot interrupt a paragraph)
        if lines[i].startswith("    ") and lines[i].strip() and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            body = textwrap.dedent("\n".join(lines[i:j])).strip("\n")
            if _is_command_block(body):
                blocks.append((i + 1, body))
            i = j
            continue
        i += 1
    return blocks


def split_commands(body: str) -> list[tuple[str, str]]:
    """(command, logical line) pairs of a shell block: continuations joined, comments dropped, `&&`/`;` split."""
    out = []
    for logical in re.sub(r"\\\n", " ", body).split("\n"):
        cmds, cur, quote, i, n = [], [], None, 0, len(logical)
        kept = []  # the logical line without its comment
        while i < n:
            c = logical[i]
            if quote:
                cur.append(c)
                kept.append(c)
                if c == quote:
                    quote = None
                elif c == "\\" and quote == '"' and i + 1 < n:
                    cur.append(logical[i + 1])
                    kept.append(logical[i + 1])
                    i += 1
            elif c in "'\"":
                quote = c
                cur.append(c)
                kept.append(c)
            elif c == "#" and (i == 0 or logical[i - 1].isspace()):
                break
            elif logical.startswith("&&", i) or c == ";":
                cmds.append("".join(cur))
                cur = []
                kept.append(logical[i:i + (2 if c == "&" else 1)])
                i += 2 if c == "&" else 1
                continue
            elif c.isspace():
                if cur and not cur[-1] == " ":
                    cur.append(" ")
                kept.append(c)
            else:
                cur.append(c)
                kept.append(c)
            i += 1
        cmds.append("".join(cur))
        line = " ".join("".join(kept).split())
        out += [(c.strip(), line) for c in cmds if c.strip()]
    return out


def readme_commands(text: str | None = None) -> list[Command]:
    text = README.read_text() if text is None else text
    return [Command(cmd, line, lineno) for lineno, body in code_blocks(text) for cmd, line in split_commands(body)]


# ------------------------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Run:
    """Run the README command `cmd`, with `add` appended (both passes) and `pass1` too in pass 1 (overrides
    where a config file names a repository-relative output). `sub`: README token -> ours, before anything else.
    In `add`/`pass1`/`sub`, `{out}` is the pass's output folder (pass 2: its working directory) and `{root}` the
    repository. `after`: a README command that must run first. `again`: also in pass 2."""

    cmd: str
    add: tuple[str, ...] = ()
    pass1: tuple[str, ...] = ()
    sub: dict[str, str] = field(default_factory=dict)
    after: str | None = None
    again: bool = True
    timeout: int = 300


@dataclass(frozen=True)
class Skip:
    cmd: str
    why: str


SMOKED_BY_TEST_BENCHMARKS = ("a benchmark that starts DeepSpeed jobs: tests/test_benchmarks.py runs it at --smoke (slow tier) "
                             "and checks its table, JSON file and headline; about a minute each, so not twice")


# The demo preset at its smallest: 2 steps of 32 samples from 64 generated ones, a checkpoint and an evaluation
# at step 2 (one batch). A resume must keep the data terms (samples per epoch, ...), so it takes the same ones.
TINY_DATA = ("data.synthetic_train_samples=64", "data.synthetic_val_samples=32", "data.samples_per_shard=32",
             "train.checkpoint_every=2", "train.eval_every=2", "train.eval_batches=1")
STEPS_2 = ("train.max_steps=2", *TINY_DATA)
DEMO = "deepspeed --num_gpus 2 launchers/train.py --config configs/demo.yaml"
FINETUNE = "deepspeed --num_gpus 2 launchers/train.py --config configs/demo-finetune.yaml"
INTO_DEMO = ("output_dir={out}/runs/demo",)  # configs/demo.yaml's output_dir is runs/demo: in the checkout
COPY = {"/tmp/demo-copy": "{out}/demo-copy"}  # one fixed /tmp folder would be shared by both passes and all users


def bench(name: str, work_dir: bool = True) -> tuple[str, ...]:
    """A benchmark at --smoke size, its JSON and its data/runs in the output folder."""
    return ("--smoke", "--out", f"{{out}}/bench/{name}.json",
            *(("--work-dir", f"{{out}}/bench/{name}") if work_dir else ()))


TABLE: list[Run | Skip] = [
    # --- Two commands for a fresh machine
    Skip("pip install -c constraints.txt -e .",
         "an install: .ci/run installs the same pins (with the [test] extra) before the tests"),
    Run(DEMO, add=STEPS_2, pass1=INTO_DEMO),
    Skip('pip install -c constraints.txt -e ".[test]"',
         "an install, run by .ci/run itself (the fast test checks .ci/run holds the README's line verbatim)"),
    Skip('python -m pytest -m "not slow"',
         "the fast tier, this test's own suite (~70 s+, and it would run this file again): .ci/run runs it, the "
         "README's line verbatim (checked by test_ci_runs_the_readme_test_command)"),
    Skip("bash .ci/newest /tmp/mmscale-newest",
         "installs the newest releases into a scratch venv and runs the fast tier there: minutes and the network; "
         "a report, not pass/fail"),
    # --- Using it
    Run(f"{DEMO} train.lr=3e-4 train.max_steps=500", add=("output_dir={out}/runs/demo-lr", *STEPS_2), again=False),
    # (pass 1 only: its output_dir is absolute, and the demo job shows pass 2's repository paths made absolute)
    Run("python launchers/train.py --config configs/demo.yaml", add=("output_dir={out}/runs/demo-1proc", *STEPS_2),
        again=False),
    Run("python launchers/train.py --config configs/demo.yaml --print-config", pass1=INTO_DEMO),
    Run("python launchers/train.py --config configs/flamingo-9b.yaml --dry-run --world-size 64"),
    Run(f"{DEMO} --resume", add=("train.max_steps=4", *TINY_DATA), pass1=INTO_DEMO, again=False),
    Run(f"{DEMO} --resume auto", add=("train.max_steps=6", *TINY_DATA), pass1=INTO_DEMO, again=False),
    Run(f"{DEMO} --overwrite", add=STEPS_2, pass1=INTO_DEMO, again=False),
    Run("mmscale-image-use --run runs/demo", add=("--batches", "1")),
    Run("mmscale-demo-objects --run runs/demo --show 16", add=("--samples", "16")),
    Skip("tensorboard --logdir runs/demo/tensorboard", "a server: it runs until stopped"),
    # --- Using a trained run
    Run("python launchers/evaluate.py --checkpoint runs/demo-finetune --compare runs/demo", add=("--batches", "1"),
        after=FINETUNE),
    Run("python launchers/generate.py --model runs/demo --shards runs/demo/data/val --limit 8", add=("--limit", "2")),
    Run("python launchers/generate.py --model runs/demo --images my_pngs/ --mode beam --beams 4",
        add=("--max-new-tokens", "8")),
    Run("python launchers/export.py --run runs/demo --out exported/demo"),
    Run("python launchers/generate.py --model exported/demo --images my_pngs/", add=("--max-new-tokens", "8")),
    # --- a run moved or copied (the README's /tmp/demo-copy: in the pass's folder instead)
    Run("cp -r runs/demo /tmp/demo-copy", sub=COPY),
    Run("python launchers/evaluate.py --checkpoint /tmp/demo-copy --batches 2", sub=COPY),
    Run(f"{DEMO} output_dir=/tmp/demo-copy --resume", sub=COPY, add=("train.max_steps=6", *TINY_DATA)),
    # --- Fine-tuning
    Run(FINETUNE, add=STEPS_2, again=False,
        pass1=("output_dir={out}/runs/demo-finetune", "model.init_from={out}/runs/demo",
               "data.tokenizer={out}/runs/demo/data/tokenizer.model")),
    Run("mmscale-finetune-report --before runs/demo --after runs/demo-finetune", add=("--batches", "1")),
    Run(f"{DEMO} output_dir=runs/ft model.init_from=runs/demo 'callbacks=[{{name: lora, args: {{r: 8}}}}]' "
        "train.eval_at_start=true", add=STEPS_2, again=False),
    # a template: any config, any Hugging Face LM folder; here the demo's, with the LM the fine-tuning wrote
    Run("deepspeed --num_gpus 2 launchers/train.py --config configs/X.yaml model.lm.path=BASE_LM_DIR "
        "train.precision=bf16 'callbacks=[{name: qlora, args: {quant_type: nf4, double_quant: true}}]'",
        sub={"configs/X.yaml": "configs/demo.yaml", "BASE_LM_DIR": "{out}/runs/demo-finetune/base_lm"},
        add=("output_dir={out}/runs/qlora", *STEPS_2), again=False),
    Run("mmscale-export adapter --run runs/ft --out exported/adapter"),
    Run("python launchers/train.py --config configs/demo.yaml 'callbacks=[{name: lora}]' --dry-run --world-size 2"),
    # --- Objectives
    Run("deepspeed --num_gpus 2 launchers/train.py --config configs/demo-contrastive.yaml",
        add=("output_dir={out}/runs/demo-contrastive", *STEPS_2), again=False),
    Run(f"{DEMO} output_dir=runs/demo-both 'objectives={{captioning: {{weight: 1}}, contrastive: {{weight: 0.5}}}}'",
        add=STEPS_2, again=False),
    Skip("python benchmarks/contrastive.py", SMOKED_BY_TEST_BENCHMARKS),
    # --- Continual learning data
    Run("python benchmarks/continual_digits.py --prepare-only", add=("--work-dir", "{out}/bench/digits-tasks")),
    Run("mmscale-digits --out data/digits --classes 0 1"),
    # --- Your own data (inputs made by `make_inputs`)
    Run("mmscale-write-shards --input pairs.jsonl --images DIR --out shards/ --samples-per-shard 1000",
        sub={"DIR": "{out}/images"}),
    Run("mmscale-train-tokenizer --shards shards/ --out tok --vocab-size 8000"),  # a word model: as many as it finds
    Run("mmscale-interleaved write --input docs.jsonl --images DIR --out docs/", sub={"DIR": "{out}/images"}),
    Run("python launchers/train.py --config configs/demo.yaml --print-config 'data.sources=[{name: captions, "
        "shards: shards/, weight: 0.7}, {name: docs, shards: docs/, weight: 0.3}]' data.tokenizer=tok/tokenizer.model",
        pass1=INTO_DEMO),
    # --- Multi-node on SLURM
    Skip("launchers/slurm/submit.sh --nodes 8 --gpus-per-node 8 --time 24:00:00 --partition gpu --config "
         "configs/flamingo-9b.yaml train.lr=1e-4",
         "submits a real 8-node x 8-GPU job with sbatch to a GPU partition; tests/test_slurm.py submits through "
         "submit.sh to its own two-node test cluster (slow tier)"),
    Skip("mmscale-cluster hostfile hosts.txt",
         "needs a SLURM allocation (SLURM_JOB_NODELIST, scontrol); tests/test_slurm.py runs it inside one"),
    Skip("deepspeed --hostfile hosts.txt launchers/train.py --config configs/flamingo-9b.yaml",
         "the deepspeed launcher's multi-node mode: reaches the hosts of an allocation over pdsh/ssh, and a 9B "
         "model"),
    # --- Measured (the demo job and the fine-tuning above are repeated there: run once)
    # (pass 2 runs the same tools above: evaluate.py --compare, mmscale-demo-objects --show 16)
    Run("python launchers/evaluate.py --checkpoint runs/demo --batches 16", add=("--batches", "1"), again=False),
    Run("mmscale-demo-objects --run runs/demo --samples 1024 --show 16", add=("--samples", "16"), again=False),
    # The benchmarks that start DeepSpeed jobs run at --smoke in tests/test_benchmarks.py (slow tier), which also
    # checks their output contract (table, JSON file = last-line headline): not twice.
    Skip("python benchmarks/continual_digits.py", SMOKED_BY_TEST_BENCHMARKS),
    Skip("python benchmarks/continual_captions.py", SMOKED_BY_TEST_BENCHMARKS),
    Skip("python benchmarks/media.py", "trains three small models (~12 min); tests/test_media_benchmark.py runs it at "
         "--quick (slow tier) and checks its headline and results file"),
    Skip("python benchmarks/text_only.py", SMOKED_BY_TEST_BENCHMARKS),
    Skip("deepspeed --num_gpus 2 benchmarks/peft_memory.py --steps 100", SMOKED_BY_TEST_BENCHMARKS),
    # (pass 1 only: its outputs are absolute; kernel_host_overhead shows a benchmark run from another directory)
    Run("python benchmarks/data_throughput.py", add=bench("data_throughput"), again=False),
    Skip("python -m pytest tests/test_slurm.py",
         "the slow tier's SLURM tests (.ci/run runs `-m slow`): about 5 minutes, and root for the cluster"),
    Skip("deepspeed --num_gpus 2 benchmarks/train_step.py --steps 30 --rounds 5", SMOKED_BY_TEST_BENCHMARKS),
    Run("python benchmarks/kernel_host_overhead.py", add=bench("kernel_host_overhead", False)),
    Skip("bash benchmarks/gpu_check.sh OUT_DIR",
         "GPU only (exits 2 without CUDA); tests/test_benchmarks.py runs it with a fake nvidia-smi and python"),
    Skip("bash .ci/run", "the whole CI (installs, then both test tiers, this test among them): about 25 minutes"),
]

# relative paths of the README's commands that are outputs or inputs, not the repository's: pass 1 puts them under
# its temporary folder (pass 2 runs elsewhere: they land there as written)
RELATIVE_IO = ("runs/", "exported/", "shards/", "docs/", "tok", "data/digits", "my_pngs/", "pairs.jsonl",
               "docs.jsonl", "hosts.txt")
# the repository's own paths: pass 2 (another working directory) makes them absolute
REPO_PATHS = ("configs/", "launchers/", "benchmarks/", "tests/", "kernels/", ".ci/")
# the runs pass 2 does not make itself (their deepspeed jobs are pass 1 only) but reads: copied from pass 1
PASS2_COPIED = ("runs/demo-finetune", "runs/ft")


def _path_pattern(prefixes: tuple[str, ...]) -> re.Pattern:
    # a prefix at the start of a word or value (after a space, `=`, a quote, `[` or `,`), not inside another path;
    # one without a trailing slash must end there (`tok`, `tok/...`, not `tokenizer`)
    alts = [re.escape(p) + ("" if p.endswith("/") else r"(?![\w.-])") for p in prefixes]
    return re.compile(r"(?<![\w./~-])(" + "|".join(alts) + ")")


_RELATIVE_IO, _REPO_PATHS = _path_pattern(RELATIVE_IO), _path_pattern(REPO_PATHS)


def match_table(commands: list[Command]) -> tuple[dict[str, Run | Skip], list[Command], list[Run | Skip]]:
    """(README command -> its entry, commands no entry matches, entries no command matches)."""
    by_cmd: dict[str, Run | Skip] = {}
    for e in TABLE:
        assert e.cmd not in by_cmd, f"two table entries for {e.cmd!r}"
        by_cmd[e.cmd] = e
    seen = {c.text for c in commands}
    return ({c.text: by_cmd[c.text] for c in commands if c.text in by_cmd},
            [c for c in commands if c.text not in by_cmd], [e for e in TABLE if e.cmd not in seen])


def coverage_problems(commands: list[Command]) -> list[str]:
    _, uncovered, stale = match_table(commands)
    return ([f"README command not covered by tests/test_readme_commands.py: {c.text!r} (README.md line {c.lineno}): "
             f"add a Run (how to shrink it) or a Skip (why) entry to TABLE" for c in uncovered]
            + [f"tests/test_readme_commands.py: table entry matches no README command (stale, remove or update it): "
               f"{e.cmd!r}" for e in stale])


def plan(commands: list[Command], second: bool) -> list[Run]:
    """The Run entries in README order, each once; an entry's `after` moves it behind that command (where that
    one runs in this pass; in pass 2 its output may be pass 1's, copied)."""
    entries, _, _ = match_table(commands)
    runs_here = {e.cmd for e in entries.values() if isinstance(e, Run) and (e.again or not second)}
    order, done, waiting = [], set(), {}
    for c in commands:
        e = entries.get(c.text)
        if not isinstance(e, Run) or e.cmd in done or (second and not e.again):
            continue
        if e.after and e.after in runs_here and e.after not in done:
            waiting.setdefault(e.after, []).append(e)
            done.add(e.cmd)
            continue
        order.append(e)
        done.add(e.cmd)
        for w in waiting.pop(e.cmd, []):
            order.append(w)
    assert not waiting, f"commands waiting for one that never runs in this pass: {waiting}"
    return order


def shell_command(e: Run, out: Path, second: bool, port: int) -> str:
    fmt = {"out": str(out), "root": str(ROOT)}
    cmd = e.cmd
    for old, new in e.sub.items():
        cmd = re.sub(r"(?<![\w./-])" + re.escape(old) + r"(?![\w.-])", new.format(**fmt).replace("\\", r"\\"), cmd)
    if second:
        cmd = _REPO_PATHS.sub(lambda m: f"{ROOT}/{m.group(1)}", cmd)
    else:
        cmd = _RELATIVE_IO.sub(lambda m: f"{out}/{m.group(1)}", cmd)
    extra = [a.format(**fmt) for a in (*e.add, *(() if second else e.pass1))]
    if cmd.startswith("deepspeed "):  # a free port: other jobs on this machine may hold DeepSpeed's default one
        cmd = f"deepspeed --master_port {port} " + cmd[len("deepspeed "):]
    return " ".join([cmd, *map(shlex.quote, extra)])


# ------------------------------------------------------------------------------------------------ fast tests


def test_parser_on_a_sample():
    """Continuations, comments outside quotes, `&&` chains, indented blocks; YAML and other languages left out."""
    md = textwrap.dedent("""\
        Text.

        ```bash
        pip install -e . && python a.py --x 'a # b' \\
            --y 2   # a comment
        # a whole-line comment
        ```

        ```yaml
        not: a command
        ```

            callbacks:
              - {name: replay}

        A paragraph.

            bash tool.sh OUT    # indented command
        """)
    assert [(c.text, c.line) for c in readme_commands(md)] == [
        ("pip install -e .", "pip install -e . && python a.py --x 'a # b' --y 2"),
        ("python a.py --x 'a # b' --y 2", "pip install -e . && python a.py --x 'a # b' --y 2"),
        ("bash tool.sh OUT", "bash tool.sh OUT"),
    ]


def test_every_readme_command_is_covered():
    """Every README command has a Run or a Skip entry, and every entry a README command."""
    commands = readme_commands()
    assert commands, "no shell commands found in README.md"
    problems = coverage_problems(commands)
    assert not problems, "\n".join(problems)


def test_ci_runs_the_readme_test_command():
    """`.ci/run` holds the README's test command line verbatim (the README's test command is what CI runs)."""
    lines = {c.line for c in readme_commands() if c.text == 'python -m pytest -m "not slow"'}
    assert lines, "README.md shows no `python -m pytest -m \"not slow\"` command"
    ci = CI_RUN.read_text()
    for line in lines:
        assert line in ci, f".ci/run does not run the README's test command line verbatim: {line!r}"


def test_paths_are_moved_out_of_the_checkout():
    """Pass 1's rewriting: README outputs into the temporary folder, config-named ones by override."""
    out = Path("/t")
    e = Run("python launchers/train.py --config configs/demo.yaml --print-config 'data.sources=[{name: c, shards: "
            "shards/}]' data.tokenizer=tok/tokenizer.model --out tok --x runs/demo/data/val", pass1=INTO_DEMO)
    assert shell_command(e, out, False, 1) == (
        "python launchers/train.py --config configs/demo.yaml --print-config 'data.sources=[{name: c, shards: "
        "/t/shards/}]' data.tokenizer=/t/tok/tokenizer.model --out /t/tok --x /t/runs/demo/data/val "
        "output_dir=/t/runs/demo")
    assert shell_command(e, out, True, 1).startswith(f"python {ROOT}/launchers/train.py --config {ROOT}/configs/")
    d = Run(f"{DEMO} --resume", sub={"configs/demo.yaml": "configs/tiny.yaml"})
    assert shell_command(d, out, False, 123) == ("deepspeed --master_port 123 --num_gpus 2 launchers/train.py "
                                                "--config configs/tiny.yaml --resume")


# ------------------------------------------------------------------------------------------------ running them


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkout_state() -> set[str]:
    """What a command could have written into the checkout: `git status --porcelain --ignored` lines of files
    that git does not track (byte-code caches aside), and any change under benchmarks/results/ (the committed
    figures a benchmark writes by default). Edits of tracked files and new Python sources are left out: no command
    writes those, and in a working tree shared with people editing it they are their work."""
    r = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=ROOT,
                       capture_output=True, text=True, check=True)
    return {line for line in r.stdout.splitlines()
            if ((line[:2] in ("??", "!!") and not line.endswith(".py")) or line[3:].startswith("benchmarks/results/"))
            and "__pycache__/" not in line and not line.endswith(".pyc") and ".pytest_cache/" not in line
            and ".egg-info/" not in line}


def make_inputs(out: Path) -> None:
    """What the README's commands read that a user brings: a few PNGs (my_pngs/, and DIR for the pair and
    document files), pairs.jsonl, docs.jsonl."""
    from PIL import Image

    colours = ["red", "green", "blue", "yellow"]
    for d in (out / "my_pngs", out / "images"):
        d.mkdir(parents=True, exist_ok=True)
        for i, c in enumerate(colours):
            Image.new("RGB", (48, 40), c).save(d / f"{i}.png")
    rows = [f'{{"image": "{i}.png", "caption": "a {c} picture"}}' for i, c in enumerate(colours)] * 2
    (out / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    docs = [f'{{"texts": ["some {c} text", null, "more text"], "images": [null, "{i}.png", null]}}'
            for i, c in enumerate(colours)]
    (out / "docs.jsonl").write_text("\n".join(docs) + "\n")


def run_one(e: Run, cwd: Path, out: Path, second: bool, env: dict[str, str]) -> tuple[str, float]:
    port = _port()
    cmd = shell_command(e, out, second, port)
    t0 = time.monotonic()
    proc = subprocess.Popen(["bash", "-c", cmd], cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**env, "MASTER_PORT": str(port)},
                            start_new_session=True)
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=e.timeout)
    except subprocess.TimeoutExpired:
        timed_out, output = True, ""
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # no launcher or rank outlives its command
        except ProcessLookupError:
            pass
        if timed_out:
            output = proc.communicate()[0] or ""
        proc.wait()
        for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            f.unlink(missing_ok=True)
    took = time.monotonic() - t0
    if timed_out or proc.returncode != 0:
        tail = "\n".join(output.splitlines()[-40:])
        why = f"timed out after {e.timeout} s" if timed_out else f"exit {proc.returncode}"
        raise AssertionError(f"README command failed ({why}, {took:.0f} s, pass {2 if second else 1}, cwd {cwd}):\n"
                             f"  README: {e.cmd}\n  ran:    {cmd}\n--- last lines of its output:\n{tail}")
    return cmd, took


def run_pass(commands: list[Command], cwd: Path, out: Path, second: bool, env: dict[str, str]) -> list:
    make_inputs(out)
    times = []
    for e in plan(commands, second):
        cmd, took = run_one(e, cwd, out, second, env)
        times.append((e.cmd, took))
        print(f"[pass {2 if second else 1}] {took:6.1f} s  {cmd}", flush=True)
    return times


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_readme_commands_run(tmp_path):
    commands = readme_commands()
    problems = coverage_problems(commands)
    assert not problems, "\n".join(problems)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONWARNINGS": "ignore"}
    before = _checkout_state()

    out1 = tmp_path / "pass1"
    out1.mkdir()
    t0 = time.monotonic()
    times1 = run_pass(commands, ROOT, out1, False, env)
    took1 = time.monotonic() - t0
    new = sorted(_checkout_state() - before)
    assert not new, "README commands wrote into the checkout (pass 1):\n" + "\n".join(new)

    out2 = tmp_path / "pass2"  # the working directory: the README's relative outputs land here
    out2.mkdir()
    for rel in PASS2_COPIED:
        shutil.copytree(out1 / rel, out2 / rel, symlinks=True)
    t0 = time.monotonic()
    times2 = run_pass(commands, out2, out2, True, env)
    took2 = time.monotonic() - t0
    new = sorted(_checkout_state() - before)
    assert not new, "README commands wrote into the checkout (pass 2):\n" + "\n".join(new)
    print(f"\npass 1 (repository root): {len(times1)} commands in {took1:.0f} s; pass 2 (another directory, "
          f"absolute paths): {len(times2)} commands in {took2:.0f} s")
