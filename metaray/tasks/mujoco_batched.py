"""A task's locomotion episodes stepped on the ``mujoco`` bindings directly.

Through gymnasium (``EnvList``), each episode's step passes four wrappers, MujocoEnv's
checks and an info dict of numpy scalars, then the task's reward wrapper. Here the episodes
of a task share one ``MjModel`` and each has its own ``MjData``; the Python per live
episode and step is setting its controls and one ``mj_step`` call with the env's frame
skip. Everything else happens once per step for all episodes: one ``np.concatenate`` reads
the fields of every ``MjData`` (through views made once), and observations, rewards and
ends are computed from that table with gymnasium's float operations in gymnasium's order,
so they equal its envs' bit for bit (tests/test_mujoco_batched.py). Every constant (model,
frame skip, reset noise, healthy range, cost weights, time limit) is read off a built
gymnasium env rather than restated here, so none can drift from what ``make_env`` builds.

``mujoco.rollout`` (one call per step for all episodes, its C loop in place of this
Python one) was measured: about 6% more physics steps per second than this loop on
HalfCheetah, 20 episodes, one thread. It is not used: it starts each call from a state
vector with a cold constraint-solver warm start (it returns no warm start to carry on),
so its trajectories leave gymnasium's within a few steps (0.08 apart in qpos after 100
steps in that measurement), and its per-thread ``MjData`` keeps no ``cfrc_ext`` per
episode for Ant's observation and contact cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium.envs.mujoco.ant_v5 import AntEnv
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
from gymnasium.utils.seeding import np_random


@dataclass(frozen=True)
class AntTerms:
    """Ant-v5's terms beyond HalfCheetah's: contact forces, health, and the body whose
    position gives the velocity."""

    main_body: int
    contact_force_range: tuple[float, float]
    contact_cost_weight: float
    cfrc_in_obs: bool
    healthy_reward: float
    healthy_z_range: tuple[float, float]
    terminate_when_unhealthy: bool


@dataclass(frozen=True)
class Physics:
    """What a batched env needs of one gymnasium v5 env (HalfCheetah or Ant), read off it."""

    model: mujoco.MjModel
    frame_skip: int
    dt: float
    init_qpos: np.ndarray
    init_qvel: np.ndarray
    reset_noise_scale: float
    skipped_qpos: int  # leading qpos entries left out of the observation
    ctrl_cost_weight: float
    max_episode_steps: int | None  # gym.make's TimeLimit
    ant: AntTerms | None  # None: HalfCheetah (x is qpos[0], no contact or health terms)

    @classmethod
    def from_env(cls, env: gym.Env) -> Physics:
        """The v5 envs keep their constructor arguments only in private attributes: reading
        them, rather than restating the defaults, follows whatever the env was built with."""
        base = env.unwrapped
        if not isinstance(base, HalfCheetahEnv | AntEnv):
            raise TypeError(f"batched MuJoCo dynamics cover HalfCheetah-v5 and Ant-v5, not {type(base).__name__}")
        ant = None
        if isinstance(base, AntEnv):
            ant = AntTerms(
                main_body=base.model.body(base._main_body).id,
                contact_force_range=tuple(base._contact_force_range),
                contact_cost_weight=base._contact_cost_weight,
                cfrc_in_obs=base._include_cfrc_ext_in_observation,
                healthy_reward=base._healthy_reward,
                healthy_z_range=tuple(base._healthy_z_range),
                terminate_when_unhealthy=base._terminate_when_unhealthy,
            )
        return cls(base.model, base.frame_skip, base.dt, base.init_qpos.copy(), base.init_qvel.copy(),
                   base._reset_noise_scale, base.observation_structure["skipped_qpos"], base._ctrl_cost_weight,
                   env.spec.max_episode_steps if env.spec is not None else None, ant)


class BatchedLocomotion:
    """``n`` episodes of one locomotion task, equal to the family's gymnasium envs step for step.

    ``forward(x_velocity)`` is the task's forward reward; ``keep`` names the v5 reward terms
    added to it (``reward_ctrl``, and for Ant ``reward_contact``, ``reward_survive``), summed
    in that order as ``_GoalReward`` sums them.
    """

    def __init__(self, physics: Physics, forward: Callable[[np.ndarray], np.ndarray], keep: Sequence[str],
                 n: int) -> None:
        self.physics, self.forward, self.keep, self.num_envs = physics, forward, tuple(keep), n
        m = physics.model
        self.datas = [mujoco.MjData(m) for _ in range(n)]
        self._ctrls = [d.ctrl for d in self.datas]  # views, made once: the hot loop skips the lookup
        # What is read of each env after a step, as views into its MjData: one concatenate
        # reads them all (a call per env cost as much as the rest of the step's Python).
        # Columns: qpos, qvel (gymnasium's state_vector()), then for Ant cfrc_ext and the
        # main body's xpos. An env that is not stepped reads the same: finished ones stay frozen.
        self._state_cols = m.nq + m.nv
        self._views = [view for d in self.datas for view in self._fields(d)]
        self._x_col = self._state_cols + 6 * m.nbody if physics.ant is not None else 0
        self._steps = np.zeros(n, dtype=np.int64)
        self._table = self._x = np.zeros(0)

    def _fields(self, d: mujoco.MjData) -> tuple[np.ndarray, ...]:
        if self.physics.ant is None:
            return d.qpos, d.qvel
        return d.qpos, d.qvel, d.cfrc_ext.reshape(-1), d.xpos[self.physics.ant.main_body]

    def _read(self) -> np.ndarray:
        """Every env's fields after a reset or step, and its observation."""
        p = self.physics
        self._table = table = np.concatenate(self._views).reshape(self.num_envs, -1)
        self._x = table[:, self._x_col]  # HalfCheetah: qpos[0]; Ant: its main body's xpos, as v5 reads them
        obs = table[:, p.skipped_qpos:self._state_cols]
        if p.ant is not None and p.ant.cfrc_in_obs:
            forces = table[:, self._state_cols + 6:self._x_col]  # cfrc_ext[1:]: the world body left out
            return np.concatenate([obs, np.clip(forces, *p.ant.contact_force_range)], axis=1)
        return obs

    def reset(self, seeds: list[int]) -> np.ndarray:
        """MujocoEnv.reset(seed=s) and reset_model: the same noise from the same generator."""
        p, m = self.physics, self.physics.model
        scale = p.reset_noise_scale
        for d, seed in zip(self.datas, seeds):
            rng = np_random(int(seed))[0]
            qpos = p.init_qpos + rng.uniform(low=-scale, high=scale, size=m.nq)
            qvel = p.init_qvel + scale * rng.standard_normal(m.nv)
            mujoco.mj_resetData(m, d)
            d.qpos[:], d.qvel[:] = qpos, qvel
            mujoco.mj_forward(m, d)
        self._steps[:] = 0
        return self._read()

    def step(self, actions: np.ndarray, alive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p, m = self.physics, self.physics.model
        datas, ctrls, frame_skip = self.datas, self._ctrls, p.frame_skip
        mj_step, post = mujoco.mj_step, (mujoco.mj_rnePostConstraint if p.ant is not None else None)
        for i in alive.nonzero()[0].tolist():
            d = datas[i]
            ctrls[i][:] = actions[i]
            mj_step(m, d, frame_skip)
            if post is not None:  # Ant's contact forces; MujocoEnv computes them after every step, but
                post(m, d)  # no HalfCheetah observation or reward reads them, and the next step none of them
        x_before = self._x
        obs = self._read()
        x_velocity = (self._x - x_before) / p.dt
        # Numpy keeps the actions' dtype (float32 from the rollout), as gymnasium's cost does.
        terms = {"reward_ctrl": -(p.ctrl_cost_weight * np.add.reduce(np.square(actions), axis=1))}
        self._steps += alive
        done = self._steps >= p.max_episode_steps if p.max_episode_steps is not None else np.zeros_like(alive)
        if p.ant is not None:
            a = p.ant
            state, forces = self._table[:, :self._state_cols], self._table[:, self._state_cols:self._x_col]
            terms["reward_contact"] = -(a.contact_cost_weight *
                                        np.add.reduce(np.square(np.clip(forces, *a.contact_force_range)), axis=1))
            z, (low, high) = state[:, 2], a.healthy_z_range
            healthy = np.isfinite(state).all(axis=1) & (low <= z) & (z <= high)
            terms["reward_survive"] = healthy * a.healthy_reward
            if a.terminate_when_unhealthy:
                done |= ~healthy
        rewards = self.forward(x_velocity) + sum(terms[k] for k in self.keep)
        return obs, np.where(alive, rewards, 0.0), done & alive

    def close(self) -> None:
        """Nothing to release: the MjData go with this object."""
