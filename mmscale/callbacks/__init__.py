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


def build_callbacks(specs: list[Any]) -> list[Callback]:
    """Instantiate `[CallbackSpec(name, args), ...]`; bad args give an error naming the callback."""
    out = []
    for i, spec in enumerate(specs):
        try:
            out.append(CALLBACKS[spec.name](**spec.args))
        except TypeError as e:
            raise ValueError(f"callbacks[{i}] ({spec.name}): bad args {spec.args}: {e}") from e
    return out


from mmscale.callbacks import early_stopping  # noqa: E402,F401  (registers itself)
