"""A user-defined task family, as a user would write one (used through module:Class)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class GoalLineEnv(gym.Env):
    """A point on a line moves towards a hidden target; reward is minus the distance."""

    def __init__(self, target: float, max_speed: float) -> None:
        self.target, self.max_speed = target, max_speed
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-max_speed, max_speed, shape=(1,), dtype=np.float32)
        self.x = 0.0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = 0.0
        return np.array([self.x], dtype=np.float32), {}

    def step(self, action):
        self.x += float(np.clip(action[0], -self.max_speed, self.max_speed))
        return np.array([self.x], dtype=np.float32), -abs(self.x - self.target), False, False, {}


class GoalLine:
    """Options for fault tests: ``broken`` makes make_env raise; every ``nan_every``-th task
    has a NaN target, so its rewards and its whole update are NaN; with ``nan_negative`` so
    has every task drawn with a negative target (a property of the draw, not of the index)."""

    def __init__(self, max_speed: float = 0.1, broken: bool = False, nan_every: int = 0, nan_negative: bool = False,
                 stall_target: float | None = None, stall_s: float = 0.0, stall_marker: str = "") -> None:
        self.max_speed, self.broken, self.nan_every, self.nan_negative = max_speed, broken, nan_every, nan_negative
        # Straggler: the first env made for the task with this target stalls, once.
        self.stall_target, self.stall_s, self.stall_marker = stall_target, stall_s, stall_marker

    def sample_tasks(self, n: int, rng: np.random.Generator) -> list[dict]:
        targets = rng.choice([-1.0, 1.0], size=n) * rng.uniform(0.5, 1.0, size=n)
        if self.nan_every:
            targets[:: self.nan_every] = np.nan
        if self.nan_negative:
            targets[targets < 0] = np.nan
        return [{"target": float(t)} for t in targets]

    def make_env(self, task: dict) -> gym.Env:
        if self.broken:
            raise RuntimeError("simulator licence expired")
        if self.stall_target is not None and task["target"] == self.stall_target:
            import os
            import time

            try:
                os.close(os.open(self.stall_marker, os.O_CREAT | os.O_EXCL))
                time.sleep(self.stall_s)
            except FileExistsError:
                pass
        return GoalLineEnv(task["target"], self.max_speed)
