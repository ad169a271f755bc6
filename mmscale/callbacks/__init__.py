"""Registered callbacks, built from the `callbacks:` list of a job config.

Each callback depends only on `mmscale.training.callbacks.Callback`; the trainer never imports this package.
"""

from __future__ import annotations

from typing import Any, Callable

from mmscale.training.callbacks import Callback

CALLBACKS: dict[str, Callable[..., Callback]] = {}


def register_callback(name: str) -> Callable[[type[Callback]], type[Callback]]:
    def wrap(cls: type[Callback]) -> type[Callback]:
        if name in CALLBACKS:
            raise ValueError(f"callback {name!r} is registered twice ({CALLBACKS[name]} and {cls})")
        cls.name = name
        CALLBACKS[name] = cls
        return cls

    return wrap


def callback_problems(index: int, name: str, args: dict[str, Any], cfg: Any) -> list[str]:
    """Problems with `callbacks[index]`: its arguments (found by constructing it; a callback's constructor only
    checks and stores them) and what it needs of the rest of the config (`Callback.config_problems`). Config
    validation calls this before any process group starts."""
    try:
        cb = CALLBACKS[name](**args)
    except (TypeError, ValueError) as e:
        return [f"callbacks[{index}].args ({name}): {args}: {e}"]
    return [f"callbacks[{index}] ({name}): {p}" for p in cb.config_problems(cfg)]


def build_callbacks(specs: list[Any]) -> list[Callback]:
    """Instantiate `[CallbackSpec(name, args), ...]` (already validated with the config)."""
    return [CALLBACKS[spec.name](**spec.args) for spec in specs]


from mmscale.callbacks import early_stopping  # noqa: E402,F401  (registers itself)
from mmscale.callbacks import peft_methods  # noqa: E402,F401  (registers lora, qlora, dora, ia3, adapters, prompt_tuning, bitfit)
from mmscale.callbacks import continual  # noqa: E402,F401  (registers replay, distill)
from mmscale.callbacks import ewc  # noqa: E402,F401  (registers ewc)
from mmscale.callbacks import task_adapters  # noqa: E402,F401  (registers task_adapters)
