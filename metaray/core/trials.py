"""Trials for RL²: several episodes of one task in a row, the recurrent state carried across.

A trial is ``episodes`` episodes of one task; the policy's state starts at zero with the
trial and is never reset inside it, so what the first episode reveals about the task can
change how the later ones are played. All trials of all the tasks a worker holds step in one
time loop; the trials of a fixed group of tasks share one recurrent step per time step (as
the MLP sampler's groups do, so no result depends on what else is sampled beside it). A
task's episodes run in lock step: episode k+1 of all its trials starts once all its trials
ended episode k (or reached the horizon). A trial waiting for the others is not stepped and
its state does not move.

Each trial is stored compacted, its steps back to back from its start, padded at the end
(time-major), with the episode each step belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from metaray.core.policy import Params
from metaray.core.recurrent import RecurrentPolicy
from metaray.core.rollout import _spans
from metaray.tasks.batched import BatchedEnv


@dataclass
class Trials:
    """N trials of one task, padded to T steps (time-major)."""

    inputs: torch.Tensor  # [T, N, input_size] what the policy read before each action
    actions: torch.Tensor  # [T, N] (discrete) or [T, N, act_dim]
    rewards: torch.Tensor  # [T, N]
    mask: torch.Tensor  # [T, N], 1.0 where the step happened
    log_probs: torch.Tensor  # [T, N], each action's log-probability when it was sampled
    values: torch.Tensor  # [T, N], the value head's estimate when it was sampled
    episode_returns: np.ndarray  # [episodes, N], undiscounted return of each episode of each trial
    episode_steps: np.ndarray  # [episodes, N]
    success: np.ndarray | None  # [episodes, N] 0/1, where the family reports success (None otherwise)
    seed: int  # a seed of the task's own stream, for anything later drawn about these trials
    advantages: torch.Tensor | None = None  # [T, N], filled by trial_advantages
    returns: torch.Tensor | None = None  # [T, N], the value targets

    @property
    def steps(self) -> int:
        return int(self.episode_steps.sum())

    def mean_return(self, episode: int) -> float:
        return float(self.episode_returns[episode].mean())

    def success_rate(self, episode: int) -> float:
        return float("nan") if self.success is None else float(self.success[episode].mean())

    def select(self, index: np.ndarray) -> Trials:
        """The trials at ``index`` (a minibatch), trimmed to their longest."""
        idx = torch.as_tensor(index, dtype=torch.long)
        mask = self.mask[:, idx]
        t = int(mask.sum(0).max().item()) if len(idx) else 0
        pick = lambda a: None if a is None else a[:t, idx]  # noqa: E731
        return Trials(pick(self.inputs), pick(self.actions), pick(self.rewards), mask[:t], pick(self.log_probs),
                      pick(self.values), self.episode_returns[:, index], self.episode_steps[:, index],
                      None if self.success is None else self.success[:, index], self.seed,
                      pick(self.advantages), pick(self.returns))


def collect_trials(
    policy: RecurrentPolicy,
    params: Params,
    envs: list[BatchedEnv],
    horizon: int,
    episodes: int,
    env_seeds: list[list[list[int]]],
    generators: list[torch.Generator],
    seeds: list[int],
    groups: list[int] | None = None,
) -> list[Trials]:
    """``envs[i].num_envs`` trials of ``episodes`` episodes for each task, all at ``params``.

    ``env_seeds[i][k]`` seeds the envs of task i's episode k. A task's trials are a function
    of the parameters, its seeds, its generator and its group alone.
    """
    spec = policy.spec
    tasks, n, width = len(envs), envs[0].num_envs, policy.hidden_size
    spans = _spans(groups if groups is not None else [0] * tasks)
    cap = episodes * horizon
    inputs = torch.zeros(cap, tasks, n, policy.input_size)
    actions = torch.zeros(cap, tasks, n, dtype=torch.long) if spec.discrete else torch.zeros(cap, tasks, n,
                                                                                               spec.act_dim)
    rewards = torch.zeros(cap, tasks, n)
    mask = torch.zeros(cap, tasks, n)
    log_probs = torch.zeros(cap, tasks, n)
    values = torch.zeros(cap, tasks, n)
    ep_returns = np.zeros((tasks, episodes, n))
    ep_steps = np.zeros((tasks, episodes, n), dtype=np.int64)
    success = np.zeros((tasks, episodes, n))
    reports_success = [True] * tasks

    state = [torch.zeros((b - a) * n, width) for a, b in spans]  # each group's trials, task-major
    where = [(g, i - a) for g, (a, b) in enumerate(spans) for i in range(a, b)]
    obs = [env.reset(seeds[0]) for env, seeds in zip(envs, env_seeds)]
    prev_action = [np.full(n, -1, dtype=np.int64) if spec.discrete else np.zeros((n, spec.act_dim), np.float32)
                   for _ in range(tasks)]
    prev_reward = [np.zeros(n, dtype=np.float32) for _ in range(tasks)]
    first = [np.zeros(n, dtype=np.float32) for _ in range(tasks)]
    alive = np.ones((tasks, n), dtype=bool)
    episode = np.zeros(tasks, dtype=np.int64)
    t_ep = np.zeros(tasks, dtype=np.int64)
    ptr = np.zeros((tasks, n), dtype=np.int64)
    done_task = np.zeros(tasks, dtype=bool)
    log_std = None if spec.discrete else params["log_std"]
    low, high = spec.act_low, spec.act_high
    with torch.no_grad():
        for _ in range(cap):  # every task ends within episodes x horizon steps
            x = [torch.from_numpy(policy.encode(obs[i], prev_action[i], prev_reward[i], first[i]))
                 for i in range(tasks)]
            outs: list[tuple[torch.Tensor, torch.Tensor] | None] = []
            for g, (a, b) in enumerate(spans):
                if done_task[a:b].all():  # a group whose trials all ended is never stepped again
                    outs.append(None)
                    continue
                xg = torch.cat(x[a:b])
                h = policy.step(params, xg, state[g])
                live = torch.from_numpy(alive[a:b].reshape(-1)).unsqueeze(1)
                state[g] = torch.where(live, h, state[g])
                outs.append(policy.heads(params, h, xg))
            for i in np.flatnonzero(~done_task):
                g, j = where[i]
                rows = slice(j * n, (j + 1) * n)
                out, value = outs[g][0][rows], outs[g][1][rows]
                if spec.discrete:
                    action = torch.multinomial(torch.softmax(out, -1), 1, generator=generators[i]).squeeze(-1)
                else:
                    action = out + log_std.exp() * torch.randn(out.shape, generator=generators[i])
                live = alive[i]
                cols = np.flatnonzero(live)
                at = ptr[i, cols]
                inputs[at, i, cols] = x[i][cols]
                actions[at, i, cols] = action[cols]
                log_probs[at, i, cols] = policy.head(out, log_std).log_prob(action)[cols]
                values[at, i, cols] = value[cols]
                mask[at, i, cols] = 1.0
                act_np = action.numpy()
                if not spec.discrete:
                    act_np = np.minimum(np.maximum(act_np, low), high)
                raw_obs, reward, done = envs[i].step(act_np, live)
                reward = np.where(live, reward, 0.0)
                rewards[at, i, cols] = torch.as_tensor(reward[cols], dtype=torch.float32)
                k = episode[i]
                ep_returns[i, k] += reward
                ep_steps[i, k] += live
                ptr[i, cols] += 1
                prev_action[i] = np.where(live.reshape(-1, *[1] * (act_np.ndim - 1)), act_np, prev_action[i])
                prev_reward[i] = np.where(live, reward, prev_reward[i]).astype(np.float32)
                obs[i] = np.where(live.reshape(-1, *[1] * (np.ndim(raw_obs) - 1)), raw_obs, obs[i])
                alive[i] &= ~np.asarray(done, dtype=bool)
                first[i] = np.where(live, 0.0, first[i]).astype(np.float32)
                t_ep[i] += 1
                if alive[i].any() and t_ep[i] < horizon:
                    continue
                flags = getattr(envs[i], "success", None)  # the episode ended for every trial
                if flags is None:
                    reports_success[i] = False
                else:
                    success[i, k] = np.asarray(flags, dtype=np.float64)
                if k + 1 == episodes:
                    done_task[i] = True
                    continue
                episode[i], t_ep[i] = k + 1, 0
                obs[i] = envs[i].reset(env_seeds[i][k + 1])
                alive[i] = True
                first[i] = np.ones(n, dtype=np.float32)
            if done_task.all():
                break
    out = []
    for i in range(tasks):
        t = int(ptr[i].max())
        out.append(Trials(inputs[:t, i].clone(), actions[:t, i].clone(), rewards[:t, i].clone(), mask[:t, i].clone(),
                          log_probs[:t, i].clone(), values[:t, i].clone(), ep_returns[i], ep_steps[i],
                          success[i] if reports_success[i] else None, seeds[i]))
    return out


def trial_advantages(trials: Trials, gamma: float, gae_lambda: float, normalize: bool) -> Trials:
    """GAE over each whole trial with the sampler's value estimates: one trial is one long
    episode to the learner, so credit flows from a later episode back to the exploring first
    one (the trial's end is terminal). Normalised per task, like every metaray advantage."""
    r = trials.rewards.double().numpy()
    v = trials.values.double().numpy() * trials.mask.double().numpy()
    m = trials.mask.double().numpy()
    adv = np.zeros_like(r)
    last = np.zeros(r.shape[1])
    next_v = np.zeros(r.shape[1])
    for t in range(r.shape[0] - 1, -1, -1):  # steps are back to back: only the padding at the end is masked
        delta = r[t] + gamma * next_v * m[t] - v[t]
        last = (delta + gamma * gae_lambda * last) * m[t]
        adv[t] = last
        next_v = v[t]
    returns = torch.from_numpy(adv + v).float() * trials.mask
    adv_t = torch.from_numpy(adv).float()
    if normalize:
        count = trials.mask.sum()
        mean = (adv_t * trials.mask).sum() / count
        var = (((adv_t - mean) * trials.mask) ** 2).sum() / count
        adv_t = (adv_t - mean) / (var.sqrt() + 1e-8) * trials.mask
    trials.advantages, trials.returns = adv_t, returns
    return trials
