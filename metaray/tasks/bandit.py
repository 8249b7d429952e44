"""K-armed Bernoulli bandits: each episode is a sequence of pulls of one unknown bandit."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.utils.seeding import np_random

from metaray.tasks.base import Task


class BernoulliBanditEnv(gym.Env):
    """Observation is a constant; the episode length is the rollout horizon."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, probs: list[float]) -> None:
        self.probs = np.asarray(probs, dtype=np.float64)
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(len(self.probs))
        self._obs = np.ones(1, dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        return self._obs, {}

    def step(self, action):
        reward = float(self.np_random.random() < self.probs[int(action)])
        return self._obs, reward, False, False, {}


class Bandit:
    """Arm probabilities i.i.d. uniform in [0, 1]; with ``dependent``, two arms paying with
    probabilities p and 1 - p, p uniform (the dependent bandit of Wang et al. 2016): one pull
    tells about both arms, so a policy with memory gains much from what a first pull revealed."""

    task_bounds = {"probs": (0.0, 1.0)}

    def __init__(self, arms: int = 5, dependent: bool = False) -> None:
        if arms < 2:
            raise ValueError(f"bandit needs at least 2 arms (got {arms})")
        if not isinstance(dependent, bool):
            raise ValueError(f"dependent must be true or false (got {dependent!r})")
        if dependent and arms != 2:
            raise ValueError(f"a dependent bandit has 2 arms (got {arms})")
        self.arms, self.dependent = int(arms), bool(dependent)

    def sample_tasks(self, n: int, rng: np.random.Generator) -> list[Task]:
        if self.dependent:
            return [{"probs": [p, 1.0 - p]} for p in (float(rng.uniform()) for _ in range(n))]
        return [{"probs": [float(p) for p in rng.uniform(size=self.arms)]} for _ in range(n)]

    def check_task(self, task: Task) -> None:
        probs = task.get("probs", [])
        if len(probs) != self.arms:
            raise ValueError(f"probs must hold {self.arms} values (got {len(probs)})")
        if self.dependent and abs(probs[0] + probs[1] - 1.0) > 1e-9:
            raise ValueError(f"a dependent bandit's probs sum to 1 (got {probs[0]} + {probs[1]})")

    def make_env(self, task: Task) -> gym.Env:
        return BernoulliBanditEnv(task["probs"])

    def make_batched_env(self, task: Task, n: int, horizon: int) -> BatchedBandit:
        return BatchedBandit(task["probs"], n, horizon)


class BatchedBandit:
    """``n`` BernoulliBanditEnv episodes: each env's uniform draws, pre-drawn from its own
    seeded generator, are the very numbers the env would draw one pull at a time."""

    def __init__(self, probs: list[float], n: int, horizon: int) -> None:
        self.probs = np.asarray(probs, dtype=np.float64)
        self.num_envs, self.horizon = n, horizon
        self.t = 0
        self.draws = np.zeros((n, horizon))

    def reset(self, seeds: list[int]) -> np.ndarray:
        self.draws = np.stack([np_random(int(s))[0].random(self.horizon) for s in seeds])
        self.t = 0
        return np.ones((self.num_envs, 1), dtype=np.float32)

    def step(self, actions: np.ndarray, alive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rewards = (self.draws[:, self.t] < self.probs[actions.astype(np.int64)]).astype(np.float64)
        self.t += 1
        return np.ones((self.num_envs, 1), dtype=np.float32), rewards, np.zeros(self.num_envs, dtype=bool)

    def close(self) -> None:
        pass
