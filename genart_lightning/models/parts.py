"""A model's configurable parts (diffusion process, backbone) as plain `{class_path, init_args}` hyperparameters.

LightningCLI hands the model built part objects; a checkpoint must not pickle them, so the model saves each
part as the dict a YAML config would write, and rebuilds it from that dict, accepting only classes of this
project that subclass the expected base.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

Part = TypeVar("Part")


def part_config(part: object) -> dict[str, Any]:
    """`{class_path, init_args}` of a part; its init arguments are read back from its same-named attributes."""
    cls = type(part)
    names = [n for n, p in inspect.signature(cls.__init__).parameters.items()
             if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    init_args = {}
    for name in names:
        value = getattr(part, name)
        init_args[name] = list(value) if isinstance(value, tuple) else value
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def build_part(spec: Part | dict | str | None, base: type[Part], default: Callable[[], Part], what: str) -> Part:
    """The part `spec` names: an instance as is, a `{class_path, init_args}` dict or a bare class path built, None the
    default; anything but a genart_lightning subclass of `base` is one line naming `what` and the base."""
    if spec is None:
        return default()
    if isinstance(spec, base):
        return copy.copy(spec)  # the model's own: building may fill in resolved settings
    if isinstance(spec, str):
        spec = {"class_path": spec}
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"{what} must be a {base.__name__} (class_path / init_args), got {spec!r}")
    module_name, _, class_name = spec["class_path"].rpartition(".")
    cls = None
    if module_name.startswith("genart_lightning."):
        try:
            cls = getattr(importlib.import_module(module_name), class_name, None)
        except ImportError:
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{what} class_path {spec['class_path']!r} is not a genart_lightning {base.__name__}; "
                         f"see the {base.__module__} module for the base class")
    return cls(**spec.get("init_args", {}))
