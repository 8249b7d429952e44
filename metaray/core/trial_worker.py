"""What a task worker does for a memory-based algorithm (RL²): sample trials, not inner batches.

The same guarantees as the gradient-based path: every stream of a task comes from its own
seed (its episodes' env seeds, its action draws, its minibatch order), tasks share a
recurrent step only within their fixed group, and the worker keeps the trials for the
learner half's later optimizer steps.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from metaray.core.trials import Trials, collect_trials, trial_advantages
from metaray.tasks import Task

if TYPE_CHECKING:
    from metaray.core.task_worker import TaskResult, TaskWorker


def _draw(rng: np.random.Generator, trials: int, episodes: int) -> tuple[list[list[int]], int, int]:
    """A task's env seeds (per episode, per trial), action-sampling seed and order seed; the
    single seeds first, so a trial's first k episodes are the same however many follow."""
    actions, order = int(rng.integers(0, 2**62)), int(rng.integers(0, 2**62))
    return [rng.integers(0, 2**31 - 1, size=trials).tolist() for _ in range(episodes)], actions, order


def sample_trials(worker: TaskWorker, flat_params: np.ndarray, tasks: list[tuple[int, Task, np.random.Generator]],
                  episodes: int) -> tuple[list[Trials], float]:
    """``inner.episodes`` trials for each (task index, task, rng), stepped together; and the seconds it took."""
    from metaray.core.task_worker import NonFiniteError, _finite

    params = {k: v.detach() for k, v in worker.params_from(flat_params).items()}
    if not _finite(params):
        raise NonFiniteError("non-finite policy parameters")
    r = worker.config.rollout
    start = time.perf_counter()
    envs, draws = [], []
    try:
        for _, task, rng in tasks:
            envs.append(worker.make_envs(task))
            draws.append(_draw(rng, envs[-1].num_envs, episodes))
        trials = collect_trials(worker.policy, params, envs, r.horizon, episodes, [d[0] for d in draws],
                                [torch.Generator().manual_seed(d[1]) for d in draws], [d[2] for d in draws],
                                [worker.group_of(i) for i, _, _ in tasks])
    finally:
        for env in envs:
            env.close()
    trials = [trial_advantages(t, r.gamma, r.gae_lambda, r.normalize_advantages) for t in trials]
    return trials, time.perf_counter() - start


def run_trial_tasks(worker: TaskWorker, flat_params: np.ndarray,
                    jobs: list[tuple[int, Task, np.random.SeedSequence]], iteration: int) -> list[TaskResult]:
    """The memory-based counterpart of ``TaskWorker.run_tasks``: one result per task, in task order.

    The pre-adaptation return is the trials' first episode, the post-adaptation return their last.
    """
    from metaray.core.task_worker import NonFiniteError, TaskResult

    jobs = sorted(jobs, key=lambda job: job[0])
    theta = worker.params_from(flat_params)
    episodes = worker.config.rl2.episodes_per_trial
    nan = float("nan")
    try:
        trials, sample_s = sample_trials(worker, flat_params, [(i, t, np.random.default_rng(s)) for i, t, s in jobs],
                                         episodes)
    except NonFiniteError:
        trials, sample_s = [None] * len(jobs), 0.0
    results = []
    for (task_index, _, _), task_trials in zip(jobs, trials):
        start = time.perf_counter()
        vector, loss = worker.update(iteration, task_index, theta, [task_trials] if task_trials is not None else None)
        results.append(TaskResult(
            task_index=task_index,
            vector=vector.numpy().astype(np.float32),
            outer_loss=loss,
            pre_return=task_trials.mean_return(0) if task_trials is not None else nan,
            post_return=task_trials.mean_return(episodes - 1) if task_trials is not None else nan,
            pre_success=task_trials.success_rate(0) if task_trials is not None else nan,
            post_success=task_trials.success_rate(episodes - 1) if task_trials is not None else nan,
            env_steps=task_trials.steps if task_trials is not None else 0,
            timings={"sample_s": sample_s / len(jobs), "adapt_s": time.perf_counter() - start},
        ))
    return results


def trial_returns(worker: TaskWorker, flat_params: np.ndarray, task: Task, steps: int,
                  seed: np.random.SeedSequence) -> tuple[list[float], list[int], list[float]]:
    """Held-out evaluation of a memory-based policy: trials of ``steps + 1`` episodes; mean return,
    env steps and success rate of each episode ("adaptation step k" is the k-th episode)."""
    from metaray.core.task_worker import NonFiniteError

    try:
        (trials,), _ = sample_trials(worker, flat_params, [(0, task, np.random.default_rng(seed))], steps + 1)
    except NonFiniteError:
        return [float("nan")] * (steps + 1), [0] * (steps + 1), [float("nan")] * (steps + 1)
    return ([trials.mean_return(k) for k in range(steps + 1)], trials.episode_steps.sum(1).tolist(),
            [trials.success_rate(k) for k in range(steps + 1)])
