"""setup.py lists its packages by hand (the kernels folder ships as mmscale.kernels): none may be left out."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_setup_lists_every_package():
    tree = ast.parse((ROOT / "setup.py").read_text())
    listed = next(ast.literal_eval(k.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                  for k in node.keywords if k.arg == "packages")
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mmscale").rglob("__init__.py")}
    on_disk |= {"mmscale.kernels"} if (ROOT / "kernels/__init__.py").is_file() else set()
    assert on_disk <= set(listed), f"setup.py packages lacks {sorted(on_disk - set(listed))}"
