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
    """

    def sample_tasks(self, n: int, rng: np.random.Generator) -> list[Task]: ...

    def make_env(self, task: Task) -> gym.Env: ...
