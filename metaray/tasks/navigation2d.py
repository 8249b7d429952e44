"""2D point navigation from the MAML paper (Finn et al. 2017, section 5.3)."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from metaray.tasks.base import Task


class Navigation2DEnv(gym.Env):
    """A point starts at the origin and moves towards a goal it cannot see.

    Reward is minus the distance to the goal after the move; actions are clipped to
    [-0.1, 0.1] per axis; the episode ends when the point is within 0.01 of the goal
    on both axes, as in the reference implementation.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, goal: tuple[float, float] | list[float]) -> None:
        self.goal = np.asarray(goal, dtype=np.float64)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-0.1, 0.1, shape=(2,), dtype=np.float32)
        self._state = np.zeros(2)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._state = np.zeros(2)
        return self._state.astype(np.float32), {}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64), -0.1, 0.1)
        self._state = self._state + action
        dx, dy = self._state - self.goal
        reward = -float(np.sqrt(dx * dx + dy * dy))
        terminated = bool(abs(dx) < 0.01 and abs(dy) < 0.01)
        return self._state.astype(np.float32), reward, terminated, False, {}


GOAL_LIMIT = 100.0
"""Served goals lie within this of the origin (or the sampled range, if wider): a point
moving at most 0.1 per step reaches 10 in a 100-step episode; a goal of 1e200 only
overflows the returns."""


class Navigation2D:
    """Goals uniform in [low, high]^2 (the paper's [-0.5, 0.5]^2 by default)."""

    def __init__(self, low: float = -0.5, high: float = 0.5) -> None:
        if not low < high:
            raise ValueError(f"navigation2d needs low < high (got low={low}, high={high})")
        self.low, self.high = float(low), float(high)
        self.task_bounds = {"goal": (min(-GOAL_LIMIT, self.low), max(GOAL_LIMIT, self.high))}

    def sample_tasks(self, n: int, rng: np.random.Generator) -> list[Task]:
        goals = rng.uniform(self.low, self.high, size=(n, 2))
        return [{"goal": [float(x), float(y)]} for x, y in goals]

    def make_env(self, task: Task) -> gym.Env:
        return Navigation2DEnv(task["goal"])

    def make_batched_env(self, task: Task, n: int, horizon: int) -> BatchedNavigation2D:
        return BatchedNavigation2D(task["goal"], n)


class BatchedNavigation2D:
    """``n`` Navigation2DEnv episodes as numpy arrays (identical step for step)."""

    def __init__(self, goal: list[float], n: int) -> None:
        self.goal = np.asarray(goal, dtype=np.float64)
        self.num_envs = n
        self.state = np.zeros((n, 2))

    def reset(self, seeds: list[int]) -> np.ndarray:
        self.state = np.zeros((self.num_envs, 2))
        return self.state.astype(np.float32)

    def step(self, actions: np.ndarray, alive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        moved = self.state + np.clip(actions.astype(np.float64), -0.1, 0.1)
        self.state = np.where(alive[:, None], moved, self.state)
        delta = self.state - self.goal
        rewards = -np.sqrt(delta[:, 0] * delta[:, 0] + delta[:, 1] * delta[:, 1])
        done = (np.abs(delta[:, 0]) < 0.01) & (np.abs(delta[:, 1]) < 0.01)
        return self.state.astype(np.float32), rewards, done

    def close(self) -> None:
        pass
