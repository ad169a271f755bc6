"""The arrows go one way: every import inside mmscale (function-level ones included) points to its own layer or a lower
one, so no two packages import each other. Read from the source (ast), not by importing it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A part may import only the parts before it (and itself). `config` is the schema, which imports none
# of what it describes; `job` assembles a run from a config; the CLIs (launchers/) sit above everything.
LAYERS = ("config", "kernels", "data", "media", "model", "objectives", "continual", "training", "callbacks", "job", "export",
          "inference", "evaluation")
SOURCES = {"mmscale": ROOT / "mmscale", "mmscale.kernels": ROOT / "kernels" / "xattn"}  # (setup.py's package_dir)


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in SOURCES.items():
        for f in sorted(folder.rglob("*.py")):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = f
    return out


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, relative ones resolved."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from mmscale import export` imports the submodule mmscale.export
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names if target == "mmscale"]
    return found


def part_of(module: str) -> str | None:
    """The layer part a module belongs to: mmscale.training.trainer -> training, mmscale.config -> config."""
    parts = module.split(".")
    if parts[0] != "mmscale" or len(parts) < 2:
        return None
    return parts[1]


def violations(modules: dict[str, Path], root: Path = ROOT) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    for module, path in modules.items():
        mine = part_of(module)
        for line, target in _imports(module, path):
            theirs = part_of(target)
            if theirs is None or theirs == mine:
                continue
            if theirs not in rank:
                continue  # checked by test_every_part_has_a_layer
            if rank[theirs] > rank[mine]:
                bad.append(f"{path.relative_to(root)}:{line}: {module} ({mine}) imports {target} ({theirs}), a "
                           f"higher layer")
    return bad


def test_every_part_has_a_layer():
    parts = {part_of(m) for m in _modules()} - {None}
    assert parts <= set(LAYERS), f"place these in LAYERS (tests/test_layers.py): {sorted(parts - set(LAYERS))}"


def test_no_import_goes_up_a_layer():
    bad = violations(_modules())
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycle_between_parts():
    """Implied by the order above, and checked on its own: the graph of part-to-part imports has no cycle."""
    graph: dict[str, set[str]] = {}
    for module, path in _modules().items():
        mine = part_of(module)
        for _, target in _imports(module, path):
            theirs = part_of(target)
            if theirs and theirs != mine and mine:
                graph.setdefault(mine, set()).add(theirs)
    seen, stack = set(), []

    def visit(node: str) -> None:
        if node in stack:
            raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(node):] + [node])}")
        if node in seen:
            return
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        stack.pop()
        seen.add(node)

    for node in sorted(graph):
        visit(node)


def test_the_check_catches_an_upward_import_inside_a_function(tmp_path):
    """The checker itself: a lower layer importing a higher one, inside a function and relatively, is caught; a
    downward import is not."""
    pkg = tmp_path / "mmscale" / "data"
    pkg.mkdir(parents=True)
    (pkg / "sneaky.py").write_text("def f():\n    from ..training import trainer\n    return trainer\n")
    (pkg / "fine.py").write_text("from mmscale.config import JobConfig\n")
    found = violations({"mmscale.data.sneaky": pkg / "sneaky.py", "mmscale.data.fine": pkg / "fine.py"}, tmp_path)
    assert found == ["mmscale/data/sneaky.py:2: mmscale.data.sneaky (data) imports mmscale.training (training), a "
                     "higher layer"], found


def test_the_mmscale_package_never_imports_launchers_or_benchmarks():
    for module, path in _modules().items():
        for line, target in _imports(module, path):
            assert target.split(".")[0] not in ("launchers", "benchmarks", "tests"), f"{path}:{line}: {target}"
