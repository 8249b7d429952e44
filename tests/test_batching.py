"""Sampling several tasks together changes speed, never results."""

from __future__ import annotations

import numpy as np
import pytest

from metaray.config import load_config
from metaray.core.policy import flatten
from metaray.core.seeding import train_episode_seed, train_tasks
from metaray.core.task_worker import TaskRunner


@pytest.mark.parametrize("family,algorithm", [("navigation2d", "maml"), ("cartpole", "reptile"), ("bandit", "fomaml")])
def test_tasks_run_together_equal_tasks_run_alone_bit_for_bit(family, algorithm):
    cfg = load_config("quickstart", [f"task.family={family}", f"algorithm={algorithm}", "inner.steps=2",
                                     "inner.episodes=6", "rollout.horizon=40",
                                     "outer.optimizer=" + ("sgd" if algorithm == "reptile" else "adam")])
    runner = TaskRunner(cfg)
    flat = flatten(runner.template).numpy()
    jobs = [(i, task, train_episode_seed(0, 3, i)) for i, task in enumerate(train_tasks(runner.family, 0, 3, 5))]
    together = runner.run_tasks(flat, jobs, iteration=3)
    for job, batched in zip(jobs, together):
        alone = runner.run_tasks(flat, [job], iteration=3)[0]
        assert np.array_equal(batched.vector, alone.vector)
        assert (batched.pre_return, batched.post_return, batched.env_steps) == (
            alone.pre_return, alone.post_return, alone.env_steps)
    assert len({r.env_steps for r in together}) > 1 or family != "cartpole", "episodes of different lengths"
