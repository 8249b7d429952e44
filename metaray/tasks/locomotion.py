"""MuJoCo locomotion task families of the MAML paper, on gymnasium's v5 envs.

- halfcheetah-vel: target forward velocity v_goal ~ U[low, high] (default [0, 2]);
  reward -|v - v_goal| - control cost.
- halfcheetah-dir: run forward (+1) or backward (-1); reward direction * v - control cost.
- ant-dir: the same on the Ant, plus the v5 env's contact cost and healthy reward
  (and its termination when the Ant is unhealthy).

The control cost weight defaults to 0.05 (0.5 * 0.1 sum a^2, as in the MAML reference
code's cheetah). Needs the ``mujoco`` extra (``gymnasium[mujoco]``). ``make_env`` wraps
gymnasium's env; ``make_batched_env`` steps the same dynamics for all of a task's episodes
on the mujoco bindings directly (metaray.tasks.mujoco_batched), equal step for step.
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

from metaray.tasks.base import Task

if TYPE_CHECKING:  # the mujoco extra is imported only when a batched env is built
    from metaray.tasks.mujoco_batched import BatchedLocomotion, Physics


def goal_forward(task: Task, x_velocity: Any) -> Any:
    """The task's forward reward from v5's ``x_velocity``: one env's float or a batch's array,
    by the same operations (so the batched dynamics' rewards equal the wrapper's)."""
    if "velocity" in task:
        return -abs(x_velocity - task["velocity"])
    return task["direction"] * x_velocity


class _GoalReward(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Replaces the env's forward reward by the task's, from v5's ``x_velocity`` info."""

    def __init__(self, env: gym.Env, task: Task, keep: tuple[str, ...]) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, task=task, keep=keep)
        gym.Wrapper.__init__(self, env)
        self.task, self.keep = task, keep

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, _, terminated, truncated, info = self.env.step(action)
        forward = goal_forward(self.task, float(info["x_velocity"]))
        reward = forward + sum(float(info[k]) for k in self.keep)
        return obs, reward, terminated, truncated, {**info, "reward_task": forward}


def _mujoco_warning(message: str) -> None:
    warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=1)


def _make(env_id: str, **kwargs: Any) -> gym.Env:
    try:
        import mujoco

        # MuJoCo's own handler prints every warning and appends it to MUJOCO_LOG.TXT in the
        # working directory, once per env built; Python's warnings show each message once.
        if mujoco.get_mju_user_warning() is None:
            mujoco.set_mju_user_warning(_mujoco_warning)
        return gym.make(env_id, **kwargs)
    except (gym.error.DependencyNotInstalled, ImportError) as err:
        raise RuntimeError(f"{env_id} needs MuJoCo: pip install 'metaray[mujoco]' ({err})") from None


@functools.cache
def _physics(env_id: str, ctrl_cost_weight: float) -> Physics:
    """One shared model and the env's constants per process, read off the env make_env builds."""
    env = _make(env_id, ctrl_cost_weight=ctrl_cost_weight)  # first: its error says what to install
    from metaray.tasks.mujoco_batched import Physics

    try:
        return Physics.from_env(env)
    finally:
        env.close()


class _Locomotion:
    """A goal on one of the v5 envs: gymnasium's env wrapped (make_env), or the same dynamics
    batched on the mujoco bindings (make_batched_env)."""

    env_id = ""
    keep: tuple[str, ...] = ()  # the v5 reward terms kept beside the task's forward reward
    ctrl_cost_weight: float

    def _goal(self, task: Task) -> Task:
        """The task's goal, checked and as plain Python numbers."""
        raise NotImplementedError

    def make_env(self, task: Task) -> gym.Env:
        env = _make(self.env_id, ctrl_cost_weight=self.ctrl_cost_weight)
        return _GoalReward(env, self._goal(task), keep=self.keep)

    def make_batched_env(self, task: Task, n: int, horizon: int) -> BatchedLocomotion:
        forward = functools.partial(goal_forward, self._goal(task))
        physics = _physics(self.env_id, self.ctrl_cost_weight)
        from metaray.tasks.mujoco_batched import BatchedLocomotion

        return BatchedLocomotion(physics, forward, self.keep, n)


VELOCITY_LIMIT = 20.0
"""Served target velocities lie within this (m/s; or the sampled range, if wider): a fast
HalfCheetah runs at about 10."""


class HalfCheetahVel(_Locomotion):
    env_id, keep = "HalfCheetah-v5", ("reward_ctrl",)

    def __init__(self, low: float = 0.0, high: float = 2.0, ctrl_cost_weight: float = 0.05) -> None:
        if not low <= high:
            raise ValueError(f"low ({low}) must not exceed high ({high})")
        self.low, self.high, self.ctrl_cost_weight = low, high, ctrl_cost_weight
        self.task_bounds = {"velocity": (min(-VELOCITY_LIMIT, low), max(VELOCITY_LIMIT, high))}

    def sample_tasks(self, n: int, rng: np.random.Generator) -> list[Task]:
        return [{"velocity": float(v)} for v in rng.uniform(self.low, self.high, size=n)]

    def _goal(self, task: Task) -> Task:
        return {"velocity": float(task["velocity"])}


class _Direction(_Locomotion):
    """Forward (+1) or backward (-1) on one of the v5 locomotion envs."""

    task_bounds = {"direction": (-1, 1)}

    @staticmethod
    def check_task(task: Task) -> None:
        if task["direction"] not in (-1, 1):
            raise ValueError(f"direction must be -1 or 1 (got {task['direction']!r})")

    def __init__(self, ctrl_cost_weight: float) -> None:
        self.ctrl_cost_weight = ctrl_cost_weight

    def sample_tasks(self, n: int, rng: np.random.Generator) -> list[Task]:
        return [{"direction": int(d)} for d in rng.choice([-1, 1], size=n)]

    def _goal(self, task: Task) -> Task:
        if task["direction"] not in (-1, 1):
            raise ValueError(f"direction must be -1 or 1, got {task['direction']!r}")
        return {"direction": int(task["direction"])}


class HalfCheetahDir(_Direction):
    env_id, keep = "HalfCheetah-v5", ("reward_ctrl",)

    def __init__(self, ctrl_cost_weight: float = 0.05) -> None:
        super().__init__(ctrl_cost_weight)


class AntDir(_Direction):
    env_id, keep = "Ant-v5", ("reward_ctrl", "reward_contact", "reward_survive")

    def __init__(self, ctrl_cost_weight: float = 0.5) -> None:  # Ant-v5's own default
        super().__init__(ctrl_cost_weight)
