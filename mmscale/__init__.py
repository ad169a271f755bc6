"""mmscale: a distributed trainer for multimodal models on DeepSpeed.

`mmscale.kernels` lives in `kernels/xattn/` (setup.py's package_dir): an install maps it there. Run from a checkout
that has no install of its own (the repository root on sys.path, and no install or another checkout's), the last
finder below finds it beside this package; an installed layout always wins, as this finder is consulted last.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_SOURCE_KERNELS = Path(__file__).resolve().parent.parent / "kernels" / "xattn" / "__init__.py"


class _SourceTreeKernels(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201  (the finder protocol)
        if name != "mmscale.kernels" or not _SOURCE_KERNELS.is_file():
            return None
        return importlib.util.spec_from_file_location(name, _SOURCE_KERNELS,
                                                      submodule_search_locations=[str(_SOURCE_KERNELS.parent)])


if not any(isinstance(f, _SourceTreeKernels) for f in sys.meta_path):
    sys.meta_path.append(_SourceTreeKernels())
