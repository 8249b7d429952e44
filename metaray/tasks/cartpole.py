"""CartPole with randomised physics and a hidden actuation sign.

Physics alone (pole length and mass, cart mass, gravity, force) barely changes which
policy is good; the actuation sign does: with it flipped, "push right" pushes left, so a
single policy that balances one half of the tasks topples the other half. Only
adaptation, from the task's own episodes, can tell which half a task is in.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleEnv

from metaray.tasks.base import Task

DEFAULTS = {"gravity": 9.8, "masscart": 1.0, "masspole": 0.1, "length": 0.5, "force_mag": 10.0}


class RandomPhysicsCartPoleEnv(CartPoleEnv):
    """Gymnasium's CartPole with its physical constants and actuation sign replaced."""

    def __init__(self, task: Task) -> None:
        super().__init__()
        for name in DEFAULTS:
            setattr(self, name, float(task[name]))
        self.total_mass = self.masspole + self.masscart
        self.polemass_length = self.masspole * self.length
        self.actuation_sign = int(task["actuation_sign"])

    def step(self, action):
        action = int(action)
        if self.actuation_sign < 0:
            action = 1 - action
        return super().step(action)


class CartPole:
    """Each physical constant is its default times U[1 - spread, 1 + spread]."""

    def __init__(self, spread: float = 0.5, flip_actuation: bool = True) -> None:
        if not 0.0 <= spread < 1.0:
            raise ValueError(f"cartpole spread must be in [0, 1) (got {spread})")
        self.spread = float(spread)
        self.flip_actuation = bool(flip_actuation)

    def sample_tasks(self, n: int, rng: np.random.Generator) -> list[Task]:
        tasks = []
        for _ in range(n):
            scale = rng.uniform(1.0 - self.spread, 1.0 + self.spread, size=len(DEFAULTS))
            task: Task = {k: float(v * s) for (k, v), s in zip(DEFAULTS.items(), scale)}
            task["actuation_sign"] = int(rng.choice([-1, 1])) if self.flip_actuation else 1
            tasks.append(task)
        return tasks

    def make_env(self, task: Task) -> gym.Env:
        return RandomPhysicsCartPoleEnv(task)
