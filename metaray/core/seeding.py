"""Every random stream of a run, derived from the config's seed.

A stream is keyed by what it is for and where it is used (iteration, task index), never
by the process that uses it: the same seed gives the same run on any number of workers.
Held-out evaluation tasks come from a stream that training never touches (and, for a family
with ``sample_eval_tasks``, from its test split).
"""

from __future__ import annotations

import numpy as np

from metaray.tasks import Task, TaskFamily

_TRAIN_TASKS, _TRAIN_EPISODES, _EVAL_TASKS, _EVAL_EPISODES = 0, 1, 2, 3


def _key(*parts: int, attempt: int) -> list[int]:
    """Attempt 0 keeps the key of runs written before retries drew fresh tasks."""
    return [*parts, attempt] if attempt else list(parts)


def train_tasks(family: TaskFamily, seed: int, iteration: int, n: int, attempt: int = 0) -> list[Task]:
    """The iteration's meta-batch; a retried iteration (``attempt`` > 0) draws a fresh one."""
    return family.sample_tasks(n, np.random.default_rng(_key(seed, _TRAIN_TASKS, iteration, attempt=attempt)))


def train_episode_seed(seed: int, iteration: int, task_index: int, attempt: int = 0) -> np.random.SeedSequence:
    return np.random.SeedSequence(_key(seed, _TRAIN_EPISODES, iteration, task_index, attempt=attempt))


def eval_tasks(family: TaskFamily, seed: int, n: int) -> list[Task]:
    """Held-out tasks: the family's ``sample_eval_tasks`` where it has one (a benchmark's test
    split, e.g. Meta-World's test goals or classes), else ``sample_tasks``; their own stream."""
    rng = np.random.default_rng([seed, _EVAL_TASKS])
    sample = getattr(family, "sample_eval_tasks", None)
    return sample(n, rng) if callable(sample) else family.sample_tasks(n, rng)


def eval_episode_seed(seed: int, task_index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, _EVAL_EPISODES, task_index])
