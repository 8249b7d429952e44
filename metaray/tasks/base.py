"""The task-family contract every family, built-in or user-written, follows."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np

Task = dict[str, Any]
"""A task is a plain, serialisable dict: cheap to ship to a worker, easy to log."""


@runtime_checkable
class TaskFamily(Protocol):
    """A distribution over tasks, and a way to build an env for one of them.

    Constructed with ``task.options`` as keyword arguments.

    Optional, for anything that takes tasks from outside (the adaptation service):
    ``task_bounds``, a dict of task key -> inclusive (low, high) that every number of that
    key's value must lie in, and ``check_task(task)``, which raises ValueError for values
    the bounds cannot express (a sign that must be -1 or 1). Without them any finite
    value is accepted, and a physically absurd one (a mass of 1e-300) reaches the env.
    """

    def sample_tasks(self, n: int, rng: np.random.Generator) -> list[Task]: ...

    def make_env(self, task: Task) -> gym.Env: ...


def task_problems(family: Any, task: Task) -> list[str]:
    """What the family's own declarations (``task_bounds``, ``check_task``) find wrong with
    ``task``, one phrase per key; empty when it is acceptable or the family declares nothing.
    Values must already be numbers (or nested lists of them) of the right shape."""
    problems = []
    for key, (low, high) in (getattr(family, "task_bounds", None) or {}).items():
        if key not in task:
            continue
        values = np.asarray(task[key], dtype=float)
        if not ((values >= low) & (values <= high)).all():  # NaN is outside too
            problems.append(f"{key}={_short(task[key])} is outside [{low:g}, {high:g}]")
    check = getattr(family, "check_task", None)
    if callable(check) and not problems:  # the bounds first: a check may assume them
        try:
            check(task)
        except (ValueError, TypeError, ArithmeticError) as err:
            problems.append(str(err))
    return problems


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
