"""What the project installs and puts on sys.path: every package listed, no name that poses as another package.

Python puts the working directory first on sys.path for `python -m ...` (and so for `python -m pytest`), and a
script's own folder first for `python path/to/script.py`. A module or regular package of ours in such a folder
that has the name of an installed package (or of one our dependencies probe for) shadows it: transformers 5.25
imported the repository's old `kernels/__init__.py`, and `benchmarks/kernels.py`, as Hugging Face's `kernels`.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folders Python puts first on sys.path when the README's commands run: the root (`python -m`), each script's
# own folder, and tests/ (pytest's rootdir-relative import of test modules, tests/ having no __init__.py).
PATH_FOLDERS = ["", "benchmarks", "launchers", "launchers/slurm", "tests", "tests/dist"]


def _setup_kwarg(name):
    tree = ast.parse((ROOT / "setup.py").read_text())
    return next(ast.literal_eval(k.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                for k in node.keywords if k.arg == name)


def test_setup_lists_every_package():
    listed = set(_setup_kwarg("packages"))
    package_dir = _setup_kwarg("package_dir")
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mmscale").rglob("__init__.py")}
    # mapped packages: each mapped folder's sub-packages under the mapped name
    for name, folder in package_dir.items():
        if name == "mmscale":
            continue
        for init in (ROOT / folder).rglob("__init__.py"):
            on_disk.add(".".join([name, *init.parent.relative_to(ROOT / folder).parts]))
    assert "mmscale.kernels" in on_disk
    assert on_disk <= listed, f"setup.py packages lacks {sorted(on_disk - listed)}"
    for name in listed:
        folder = ROOT / package_dir.get(name, name.replace(".", "/"))
        assert (folder / "__init__.py").is_file(), f"setup.py lists {name}, but {folder} has no __init__.py"


def test_kernels_folder_is_never_a_regular_top_level_package():
    assert (ROOT / "kernels").is_dir()
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the repository root's kernels/ a regular package that shadows Hugging Face's "
        "`kernels` whenever the root is on sys.path (kernels/README.md)")


def _our_names(folder: Path) -> set[str]:
    """Importable top-level names a folder defines: modules and regular packages (namespace portions lose to any
    regular package of the same name, PEP 420)."""
    names = {p.stem for p in folder.glob("*.py")}
    names |= {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    return names


def _probed_by_transformers() -> set[str]:
    """Packages transformers looks for by name (import_utils' `_is_package_available("...")` calls)."""
    import re

    import transformers.utils.import_utils as iu

    return set(re.findall(r'_is_package_available\(\s*"([A-Za-z0-9_]+)"', Path(iu.__file__).read_text()))


def test_no_folder_on_sys_path_defines_an_installed_or_probed_name():
    from importlib.metadata import packages_distributions

    installed = {name for name, dists in packages_distributions().items() if "mmscale" not in dists}
    taken = installed | _probed_by_transformers() | {"kernels"}
    clashes = {f"{folder or '.'}/{name}": name for folder in PATH_FOLDERS for name in _our_names(ROOT / folder)
               if name in taken}
    assert not clashes, (f"these would shadow another package whenever their folder is first on sys.path: "
                         f"{sorted(clashes)}; rename them")


@pytest.mark.parametrize("cwd", ["", "benchmarks", "launchers", "tests"])
def test_import_kernels_is_hugging_faces_from_any_folder(cwd):
    """The behaviour that broke: from the root, transformers imported our folder as `kernels`. Run from each folder
    Python puts first on the path, in a fresh process, exactly as `python -m` / a script there would."""
    code = r"""
import importlib.util, json, sys
import transformers.utils as u
spec = importlib.util.find_spec("kernels")
out = {"origin": spec and spec.origin, "available": u.is_kernels_available()}
if out["available"]:
    from kernels import get_kernel  # what bitsandbytes and transformers import from it
import mmscale.kernels as m
out["ours"] = m.__file__
out["has_api"] = hasattr(m, "cross_attention")
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT / cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["has_api"], out
    assert Path(out["ours"]).parent == ROOT / "kernels" / "xattn" or "site-packages" in out["ours"], out
    if out["origin"] is not None:  # Hugging Face's kernels is installed (transformers >= 5.25 requires it)
        assert not Path(out["origin"]).resolve().is_relative_to(ROOT), f"`kernels` resolves into the repo: {out}"
    else:
        assert not out["available"], out


def test_the_source_tree_finds_its_kernels_without_an_install():
    """From a checkout whose install is missing or belongs to another checkout, `mmscale.kernels` is still this
    checkout's kernels/xattn (the finder in mmscale/__init__.py); every install finder is removed first."""
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__]; "
            f"sys.path.insert(0, {str(ROOT)!r}); import mmscale.kernels as k; print(k.__file__); "
            "from mmscale.kernels import cross_attention")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == str(ROOT / "kernels" / "xattn" / "__init__.py")
