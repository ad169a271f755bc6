"""What names and versions an export folder (its layout: the package docstring, mmscale/export/__init__.py), how to
tell one, and the error that stops writing one. Every other module of the package reads its names from here."""

from __future__ import annotations

import json
from pathlib import Path

FORMAT = "mmscale-export"
FORMAT_VERSION = 1
CONFIG_JSON = "config.json"
CONFIG_YAML = "config.yaml"
ADAPTER_DIR = "adapter"
LORA_METHODS = ("lora", "dora", "qlora")
"""The callbacks whose adapters are peft LoRA layers (DoRA's included): merged into the weights, or set aside."""
ADAPTER_METHODS = (*LORA_METHODS, "ia3")
TASK_METHOD = "task_adapters"
"""A run with one module per task (mmscale.callbacks.task_adapters): exported one task at a time (--task NAME)."""
"""Every callback whose layers export merges or sets aside (in peft's format): LoRA's and IA3's. The exported config
leaves them out."""


class ExportError(ValueError):
    """What stops an export, every problem found, each with its fix."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n  ".join(self.problems) if len(self.problems) == 1 else
                         "\n  - " + "\n  - ".join(self.problems))


def is_export(path: Path) -> bool:
    """`path` holds an mmscale export (its config.json says the format)."""
    try:
        return json.loads((path / CONFIG_JSON).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False
