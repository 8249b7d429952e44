"""Collect batches of episodes, several tasks stepped together.

All episodes of the tasks of a fixed group step in one time loop and share one policy
forward per time step; the groups of a call are sampled one after another. Episodes are
stored time-major, a batch padded to its longest episode (at most the horizon), with a mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from metaray.core.policy import Params, Policy
from metaray.tasks.batched import BatchedEnv


@dataclass
class Episodes:
    """A batch of N episodes of one task, padded to T steps (time-major): T is the longest
    episode's length (at most the horizon)."""

    obs: torch.Tensor  # [T, N, obs_dim]
    actions: torch.Tensor  # [T, N] (discrete) or [T, N, act_dim]
    rewards: torch.Tensor  # [T, N]
    mask: torch.Tensor  # [T, N], 1.0 where the step happened
    advantages: torch.Tensor | None = None  # [T, N], filled by compute_advantages
    log_probs: torch.Tensor | None = None  # [T, N], each action's log-probability when it was sampled
    params: Params | None = None  # the (detached) parameters that sampled the batch
    success: torch.Tensor | None = None  # [N] float32 0/1: the episode had info["success"] at some step
    # (None: the env reports no success)

    @property
    def returns(self) -> np.ndarray:
        """Undiscounted return of each episode."""
        return (self.rewards * self.mask).sum(0).numpy()

    @property
    def success_rate(self) -> float:
        """Fraction of the episodes that succeeded; NaN when the env reports no success."""
        return float("nan") if self.success is None else float(self.success.mean())

    @property
    def steps(self) -> int:
        return int(self.mask.sum().item())

    def every(self, k: int) -> Episodes:
        """Every k-th episode (the first, the (k+1)-th, ...): a curvature minibatch, always at least one."""
        if k == 1:
            return self
        pick = lambda t: None if t is None else t[:, ::k]  # noqa: E731
        return Episodes(pick(self.obs), pick(self.actions), pick(self.rewards), pick(self.mask), pick(self.advantages),
                        pick(self.log_probs), self.params, None if self.success is None else self.success[::k])

    def to(self, dtype: torch.dtype) -> Episodes:
        """A copy with floating-point fields cast (float64 for gradient checks)."""
        cast = lambda t: t.to(dtype) if t is not None and t.is_floating_point() else t  # noqa: E731
        params = None if self.params is None else type(self.params)((k, cast(v)) for k, v in self.params.items())
        return Episodes(cast(self.obs), cast(self.actions), cast(self.rewards), cast(self.mask),
                        cast(self.advantages), cast(self.log_probs), params, self.success)


def concat_episodes(batches: list[Episodes]) -> Episodes:
    """Several batches of one task as one. A batch stops at its longest episode, so the
    shorter ones are padded with masked-out steps to the longest."""
    steps = max(b.mask.shape[0] for b in batches)

    def cat(name: str) -> torch.Tensor:
        parts = [getattr(b, name) for b in batches]
        padded = [torch.cat([p, p.new_zeros(steps - p.shape[0], *p.shape[1:])]) for p in parts]
        return torch.cat(padded, dim=1)

    maybe = lambda name: None if any(getattr(b, name) is None for b in batches) else cat(name)  # noqa: E731
    success = None if any(b.success is None for b in batches) else torch.cat([b.success for b in batches])
    return Episodes(cat("obs"), cat("actions"), cat("rewards"), cat("mask"), maybe("advantages"), maybe("log_probs"),
                    success=success)


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


def _spans(groups: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of equal group ids; a group split in two runs is an error."""
    spans: list[tuple[int, int]] = []
    for i, g in enumerate(groups):
        if i and g == groups[i - 1]:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    if len({groups[a] for a, _ in spans}) != len(spans):
        raise ValueError(f"tasks of one group must be adjacent: {groups}")
    return spans


def collect_many(
    policy: Policy,
    params: list[Params],
    envs: list[BatchedEnv],
    horizon: int,
    env_seeds: list[list[int]],
    generators: list[torch.Generator],
    groups: list[int] | None = None,
) -> list[Episodes]:
    """One batch of episodes for each of several tasks.

    Tasks with the same id in ``groups`` (adjacent; default: all in one group) are stepped
    together and share one batched policy forward per time step; every other step of the
    loop is per task. The groups are sampled one after another, whole episodes each: a
    worker's whole share at once is more state than the cache holds (MuJoCo: 400 ``MjData``
    step ~18% slower than 100 in a plain ``mj_step`` loop; measured, a HalfCheetah worker's
    share samples ~12% faster so, the classic families' ~4% slower). A task's episodes are
    a function of its parameters, its ``env_seeds`` and ``generator``, and its group: not of
    the other groups sampled beside it or of the process sampling it. Each action's
    log-probability is recorded, computed from the sampler's own output. Where an env
    exposes ``success`` (see metaray.tasks.batched), each episode's flag is kept.
    """
    spans = _spans(groups if groups is not None else [0] * len(envs))
    return [batch for a, b in spans for batch in _collect_group(
        policy, params[a:b], envs[a:b], horizon, env_seeds[a:b], generators[a:b])]


def _collect_group(
    policy: Policy,
    params: list[Params],
    envs: list[BatchedEnv],
    horizon: int,
    env_seeds: list[list[int]],
    generators: list[torch.Generator],
) -> list[Episodes]:
    """``collect_many`` for the tasks of one group: one time loop, one forward per step."""
    spec = policy.spec
    tasks, n = len(envs), envs[0].num_envs
    # The group's own observation buffer, so the memory its forward reads (its offset, hence its
    # alignment) is a function of the group alone, never of its place in the call. The loop
    # writes through numpy views of the buffers: a numpy item assignment costs a fraction of
    # torch's indexing, and casts float64 to float32 the same way (nearest).
    obs_buf = torch.zeros(horizon, tasks, n, spec.obs_dim)
    obs_view = obs_buf.numpy()
    outs: list[torch.Tensor] = []  # the forward's output at each step
    act_buf = torch.zeros(horizon, tasks, n, dtype=torch.long) if spec.discrete else \
        torch.zeros(horizon, tasks, n, spec.act_dim)
    act_view = act_buf.numpy()
    rew_buf = np.zeros((horizon, tasks, n), dtype=np.float32)
    mask_buf = np.zeros((horizon, tasks, n), dtype=np.float32)
    obs = [spec.encode_obs(env.reset(seeds)) for env, seeds in zip(envs, env_seeds)]
    alive = np.ones((tasks, n), dtype=bool)
    steps = np.full(tasks, horizon)
    forward = policy.sampler(params)
    std = None if spec.discrete else [p["log_std"].exp() for p in params]
    with torch.no_grad():
        for t in range(horizon):
            for i in range(tasks):
                obs_view[t, i] = obs[i]
            outs.append(forward(obs_buf[t]))
            for i in np.flatnonzero(alive.any(axis=1)):
                out = outs[-1][i]
                if spec.discrete:
                    action = torch.multinomial(torch.softmax(out, -1), 1, generator=generators[i]).squeeze(-1)
                else:
                    action = out + std[i] * torch.randn(out.shape, generator=generators[i])
                act_np = action.numpy()
                act_view[t, i] = act_np
                if not spec.discrete:  # np.clip's dispatch costs more than the two ufuncs; same values
                    act_np = np.minimum(np.maximum(act_np, spec.act_low), spec.act_high)
                raw_obs, rewards, done = envs[i].step(act_np, alive[i])
                rew_buf[t, i] = np.where(alive[i], rewards, 0.0)
                mask_buf[t, i] = alive[i]
                alive[i] &= ~done
                obs[i] = spec.encode_obs(raw_obs)
                if not alive[i].any():
                    steps[i] = t + 1
            if not alive.any():
                break
        group_out = torch.stack(outs)  # [steps, tasks, n, out]
    batches = []
    for i in range(tasks):
        T = steps[i]
        actions = act_buf[:T, i].contiguous()
        log_std = None if spec.discrete else params[i]["log_std"]
        with torch.no_grad():
            log_probs = policy.head(group_out[:T, i], log_std).log_prob(actions)
        success = getattr(envs[i], "success", None)
        batches.append(Episodes(obs_buf[:T, i].contiguous(), actions, torch.from_numpy(rew_buf[:T, i].copy()),
                                torch.from_numpy(mask_buf[:T, i].copy()), log_probs=log_probs,
                                params=params[i],
                                success=None if success is None else torch.tensor(success, dtype=torch.float32)))
    return batches
