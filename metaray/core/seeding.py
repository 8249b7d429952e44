"""Every random stream of a run, derived from the config's seed.

A stream is keyed by what it is for and where it is used (iteration, task index), never
by the process that uses it: the same seed gives the same run on any number of workers.
Held-out evaluation tasks come from a stream that training never touches.
"""

from __future__ import annotations

import numpy as np

from metaray.tasks import Task, TaskFamily

_TRAIN_TASKS, _TRAIN_EPISODES, _EVAL_TASKS, _EVAL_EPISODES = 0, 1, 2, 3


def train_tasks(family: TaskFamily, seed: int, iteration: int, n: int) -> list[Task]:
    return family.sample_tasks(n, np.random.default_rng([seed, _TRAIN_TASKS, iteration]))


def train_episode_seed(seed: int, iteration: int, task_index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, _TRAIN_EPISODES, iteration, task_index])


def eval_tasks(family: TaskFamily, seed: int, n: int) -> list[Task]:
    return family.sample_tasks(n, np.random.default_rng([seed, _EVAL_TASKS]))


def eval_episode_seed(seed: int, task_index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, _EVAL_EPISODES, task_index])
