"""CartPole with randomised physics and a hidden actuation sign.

Physics alone (pole length and mass, cart mass, gravity, force) barely changes which
policy is good; the actuation sign does: with it flipped, "push right" pushes left, so a
single policy that balances one half of the tasks topples the other half. Only
adaptation, from the task's own episodes, can tell which half a task is in.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleEnv
from gymnasium.utils.seeding import np_random

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

    # Physically sensible (SI units), far wider than any spread samples: a massless cart or
    # pole, a zero-length pole or a force of 1e300 N is no cart-pole, and its arithmetic
    # (division by the masses and the length) gives inf and NaN.
    task_bounds = {"gravity": (0.0, 100.0), "masscart": (0.01, 100.0), "masspole": (0.001, 10.0),
                   "length": (0.01, 10.0), "force_mag": (0.0, 1000.0), "actuation_sign": (-1, 1)}

    @staticmethod
    def check_task(task: Task) -> None:
        if task["actuation_sign"] not in (-1, 1):
            raise ValueError(f"actuation_sign must be -1 or 1 (got {task['actuation_sign']!r})")

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

    def make_batched_env(self, task: Task, n: int, horizon: int) -> BatchedCartPole:
        return BatchedCartPole(task, n)


class BatchedCartPole:
    """``n`` RandomPhysicsCartPoleEnv episodes: gymnasium's Euler step, vectorised, with the
    same float64 operations in the same order, so states match bit for bit."""

    def __init__(self, task: Task, n: int) -> None:
        self.num_envs = n
        self.gravity, self.masscart, self.masspole = task["gravity"], task["masscart"], task["masspole"]
        self.length, self.force_mag = task["length"], task["force_mag"]
        self.total_mass = self.masspole + self.masscart
        self.polemass_length = self.masspole * self.length
        self.sign = int(task["actuation_sign"])
        self.tau, self.theta_limit, self.x_limit = 0.02, 12 * 2 * math.pi / 360, 2.4
        self.state = np.zeros((n, 4))

    def reset(self, seeds: list[int]) -> np.ndarray:
        self.state = np.stack([np_random(int(s))[0].uniform(low=-0.05, high=0.05, size=(4,)) for s in seeds])
        return self.state.astype(np.float32)

    def step(self, actions: np.ndarray, alive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        push = actions.astype(np.int64) if self.sign > 0 else 1 - actions.astype(np.int64)
        force = np.where(push == 1, self.force_mag, -self.force_mag)
        x, x_dot, theta, theta_dot = self.state.T
        costheta, sintheta = np.cos(theta), np.sin(theta)
        temp = (force + self.polemass_length * np.square(theta_dot) * sintheta) / self.total_mass
        thetaacc = (self.gravity * sintheta - costheta * temp) / (
            self.length * (4.0 / 3.0 - self.masspole * np.square(costheta) / self.total_mass))
        xacc = temp - self.polemass_length * thetaacc * costheta / self.total_mass
        new = np.stack([x + self.tau * x_dot, x_dot + self.tau * xacc,
                        theta + self.tau * theta_dot, theta_dot + self.tau * thetaacc], axis=1)
        self.state = np.where(alive[:, None], new, self.state)
        x, theta = self.state[:, 0], self.state[:, 2]
        done = (x < -self.x_limit) | (x > self.x_limit) | (theta < -self.theta_limit) | (theta > self.theta_limit)
        return self.state.astype(np.float32), np.ones(self.num_envs), done

    def close(self) -> None:
        pass
