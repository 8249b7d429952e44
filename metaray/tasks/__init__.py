"""Task families: built-in ones by name, a user's own by ``module:Class``."""

from __future__ import annotations

import importlib
from typing import Any

from metaray.tasks.bandit import Bandit
from metaray.tasks.base import Task, TaskFamily
from metaray.tasks.cartpole import CartPole
from metaray.tasks.locomotion import AntDir, HalfCheetahDir, HalfCheetahVel
from metaray.tasks.metaworld import MetaWorldML1, MetaWorldML10
from metaray.tasks.navigation2d import Navigation2D

BUILTIN_FAMILIES: dict[str, type] = {
    "cartpole": CartPole,
    "navigation2d": Navigation2D,
    "bandit": Bandit,
    "halfcheetah-vel": HalfCheetahVel,
    "halfcheetah-dir": HalfCheetahDir,
    "ant-dir": AntDir,
    "metaworld-ml1": MetaWorldML1,
    "metaworld-ml10": MetaWorldML10,
}

__all__ = ["BUILTIN_FAMILIES", "Task", "TaskFamily", "make_family", "resolve_family_class"]


def resolve_family_class(name: str) -> type:
    """Return the family class for a built-in name or an import path; ValueError if none.

    An import path is imported: a config naming one is as trusted as the Python file it names.
    """
    from metaray.limits import one_line, short_repr

    if name in BUILTIN_FAMILIES:
        return BUILTIN_FAMILIES[name]
    allowed = f"allowed: {', '.join(BUILTIN_FAMILIES)}, or an import path module:Class"
    if ":" not in name:
        raise ValueError(f"unknown task family {short_repr(name)}; {allowed}")
    module_name, _, class_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # an ImportError, or the module's own error while importing
        raise ValueError(f"cannot import module {short_repr(module_name)} of task family {short_repr(name)}: "
                         f"{one_line(err, 300)}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ValueError(f"module {short_repr(module_name)} has no attribute {short_repr(class_name)} ({allowed})")
    missing = [m for m in ("sample_tasks", "make_env") if not callable(getattr(cls, m, None))]
    if missing:
        raise ValueError(f"task family {short_repr(name)} lacks {', '.join(missing)}; see the README's contract")
    return cls


def make_family(name: str, options: dict[str, Any]) -> TaskFamily:
    """Instantiate a family with its options; ValueError names the family on bad options."""
    cls = resolve_family_class(name)
    try:
        return cls(**options)
    except (TypeError, ValueError) as err:
        raise ValueError(f"task.options for family {name!r}: {err}") from None
