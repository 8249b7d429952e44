"""Many episodes of one task stepped as one: the contract the rollout loop speaks.

Built-in families provide numpy-batched dynamics (no per-env Python loop) that are
step-for-step identical to their gymnasium envs; any other family falls back to
``EnvList``, one gymnasium env per episode. Finished episodes are never stepped again
(their entries are frozen), as if each env had been left alone after it ended.

A batched env MAY expose ``success``: a bool array [num_envs], True where the env's current
episode has had ``info["success"]`` truthy at any step so far, all False after ``reset``;
``None`` (or no attribute) when the family reports no success. ``EnvList`` tracks it from
its envs' infos (None until one of them reports the key).
"""

from __future__ import annotations

from typing import Protocol

import gymnasium as gym
import numpy as np


class BatchedEnv(Protocol):
    num_envs: int
    # Optional: ``success: np.ndarray | None`` (see the module's docstring).

    def reset(self, seeds: list[int]) -> np.ndarray:
        """Start one episode per env, env i seeded with seeds[i]; returns raw observations."""
        ...

    def step(self, actions: np.ndarray, alive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Step the envs where ``alive``; returns (observations, rewards, done)."""
        ...

    def close(self) -> None: ...


class EnvList:
    """The fallback for any gymnasium family: one env per episode, stepped in a loop."""

    def __init__(self, envs: list[gym.Env]) -> None:
        self.envs = envs
        self.num_envs = len(envs)
        self._obs: np.ndarray | None = None
        self._success = np.zeros(self.num_envs, dtype=bool)
        self._reports_success = False

    @property
    def success(self) -> np.ndarray | None:
        """Whether each env's episode has succeeded at some step so far; None while no env
        has reported ``info["success"]``."""
        return self._success.copy() if self._reports_success else None

    def reset(self, seeds: list[int]) -> np.ndarray:
        self._obs = np.stack([np.asarray(env.reset(seed=int(s))[0]) for env, s in zip(self.envs, seeds)])
        self._success[:] = False
        return self._obs

    def step(self, actions: np.ndarray, alive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        obs = self._obs.copy()
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        done = np.zeros(self.num_envs, dtype=bool)
        for i in np.flatnonzero(alive):
            env = self.envs[i]
            action = actions[i] if isinstance(env.action_space, gym.spaces.Discrete) else \
                actions[i].reshape(env.action_space.shape)
            o, r, terminated, truncated, info = env.step(int(action) if np.ndim(action) == 0 else action)
            obs[i], rewards[i], done[i] = o, r, terminated or truncated
            success = info.get("success") if isinstance(info, dict) else None
            if success is not None:
                self._reports_success = True
                self._success[i] |= bool(success)
        self._obs = obs
        return obs, rewards, done

    def close(self) -> None:
        for env in self.envs:
            env.close()
