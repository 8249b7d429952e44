"""Collect batches of episodes, several tasks stepped together.

All episodes of a batch step together: one policy forward per time step for the whole
batch. Episodes are stored time-major and padded to the horizon, with a mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from metaray.core.policy import Params, Policy
from metaray.tasks.batched import BatchedEnv


@dataclass
class Episodes:
    """A batch of N episodes of one task, padded to T steps (time-major)."""

    obs: torch.Tensor  # [T, N, obs_dim]
    actions: torch.Tensor  # [T, N] (discrete) or [T, N, act_dim]
    rewards: torch.Tensor  # [T, N]
    mask: torch.Tensor  # [T, N], 1.0 where the step happened
    advantages: torch.Tensor | None = None  # [T, N], filled by compute_advantages

    @property
    def returns(self) -> np.ndarray:
        """Undiscounted return of each episode."""
        return (self.rewards * self.mask).sum(0).numpy()

    @property
    def steps(self) -> int:
        return int(self.mask.sum().item())

    def to(self, dtype: torch.dtype) -> Episodes:
        """A copy with floating-point fields cast (float64 for gradient checks)."""
        cast = lambda t: t.to(dtype) if t is not None and t.is_floating_point() else t  # noqa: E731
        return Episodes(cast(self.obs), cast(self.actions), cast(self.rewards), cast(self.mask),
                        cast(self.advantages))


def concat_episodes(batches: list[Episodes]) -> Episodes:
    """Several batches of one task as one (all are padded to the same horizon)."""
    cat = lambda name: torch.cat([getattr(b, name) for b in batches], dim=1)  # noqa: E731
    advantages = None if any(b.advantages is None for b in batches) else cat("advantages")
    return Episodes(cat("obs"), cat("actions"), cat("rewards"), cat("mask"), advantages)


def collect(
    policy: Policy,
    params: Params,
    env: BatchedEnv,
    horizon: int,
    env_seeds: list[int],
    generator: torch.Generator,
) -> Episodes:
    """Run one episode in each of ``env``'s envs with the policy at ``params`` (no gradient)."""
    return collect_many(policy, [params], [env], horizon, [env_seeds], [generator])[0]


def collect_many(
    policy: Policy,
    params: list[Params],
    envs: list[BatchedEnv],
    horizon: int,
    env_seeds: list[list[int]],
    generators: list[torch.Generator],
) -> list[Episodes]:
    """One batch of episodes for each of several tasks, stepped together.

    One policy forward per time step for every episode of every task (each task at its own
    parameters), one numpy/torch conversion each way per task. Each task's random draws
    come from its own ``env_seeds`` and ``generator``, so a task's episodes are the same
    whichever tasks it is collected with and whichever process collects it.
    """
    spec = policy.spec
    tasks, n = len(envs), envs[0].num_envs
    obs_buf = torch.zeros(horizon, tasks, n, spec.obs_dim)
    act_buf = torch.zeros(horizon, tasks, n, dtype=torch.long) if spec.discrete else \
        torch.zeros(horizon, tasks, n, spec.act_dim)
    rew_buf = np.zeros((horizon, tasks, n), dtype=np.float32)
    mask_buf = np.zeros((horizon, tasks, n), dtype=np.float32)
    obs = [spec.encode_obs(env.reset(seeds)) for env, seeds in zip(envs, env_seeds)]
    alive = np.ones((tasks, n), dtype=bool)
    steps = np.full(tasks, horizon)
    forward = policy.sampler(params)
    std = None if spec.discrete else [p["log_std"].exp() for p in params]
    with torch.no_grad():
        for t in range(horizon):
            obs_t = obs_buf[t]
            for i in range(tasks):
                obs_t[i].copy_(torch.from_numpy(obs[i]))
            out = forward(obs_t)
            for i in np.flatnonzero(alive.any(axis=1)):
                if spec.discrete:
                    action = torch.multinomial(torch.softmax(out[i], -1), 1, generator=generators[i]).squeeze(-1)
                else:
                    action = out[i] + std[i] * torch.randn(out[i].shape, generator=generators[i])
                act_buf[t, i] = action
                act_np = action.numpy()
                if not spec.discrete:
                    act_np = np.clip(act_np, spec.act_low, spec.act_high)
                raw_obs, rewards, done = envs[i].step(act_np, alive[i])
                rew_buf[t, i] = np.where(alive[i], rewards, 0.0)
                mask_buf[t, i] = alive[i]
                alive[i] &= ~done
                obs[i] = spec.encode_obs(raw_obs)
                if not alive[i].any():
                    steps[i] = t + 1
            if not alive.any():
                break
    return [Episodes(obs_buf[: steps[i], i].contiguous(), act_buf[: steps[i], i].contiguous(),
                     torch.from_numpy(rew_buf[: steps[i], i].copy()),
                     torch.from_numpy(mask_buf[: steps[i], i].copy())) for i in range(tasks)]
