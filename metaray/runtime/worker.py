"""The worker actor: a thin Ray shell around a TaskRunner.

Contract: ``run_tasks`` for training, ``evaluate`` for held-out tasks, and, for TRPO,
``trpo_hvp`` / ``trpo_loss_kl`` on the episodes it kept for the iteration, so that no
trajectory ever leaves the worker that sampled it.
"""

from __future__ import annotations

import math
import os
import socket
from typing import Any

import numpy as np
import ray
import torch

from metaray.config import Config
from metaray.core import seeding
from metaray.core.task_worker import TaskResult, TaskRunner
from metaray.tasks import Task


class Worker:
    def __init__(self, config: dict[str, Any], index: int) -> None:
        self.config = Config.model_validate(config)
        # One thread count everywhere: results must not depend on where a task runs.
        torch.set_num_threads(max(1, math.ceil(self.config.resources.cpus_per_worker)))
        self.runner = TaskRunner(self.config)
        self.index = index
        self.node = ray.util.get_node_ip_address() if ray.is_initialized() else socket.gethostname()

    def run_tasks(self, flat_params: np.ndarray, iteration: int, tasks: list[tuple[int, Task]]) -> list[TaskResult]:
        """Run (task index, task) pairs of an iteration together; one result each, in order."""
        jobs = [(i, task, seeding.train_episode_seed(self.config.seed, iteration, i)) for i, task in tasks]
        results = self.runner.run_tasks(flat_params, jobs, iteration)
        for result in results:
            result.worker = f"worker-{self.index}@{self.node}"
        return results

    def trpo_hvp(self, iteration: int, task_indices: list[int], flat_params: np.ndarray,
                 vector: np.ndarray) -> list[np.ndarray]:
        return [self.runner.trpo_hvp(iteration, i, flat_params, vector) for i in task_indices]

    def trpo_loss_kl(self, iteration: int, task_indices: list[int],
                     flat_params: np.ndarray) -> list[tuple[float, float]]:
        return [self.runner.trpo_loss_kl(iteration, i, flat_params) for i in task_indices]

    def promp_gradient(self, iteration: int, task_indices: list[int], flat_params: np.ndarray) -> list[np.ndarray]:
        return [self.runner.promp_gradient(iteration, i, flat_params) for i in task_indices]

    def evaluate(self, flat_params: np.ndarray, task: Task, task_index: int, steps: int,
                 seed: int) -> tuple[list[float], list[int]]:
        return self.runner.evaluate(flat_params, task, steps, seeding.eval_episode_seed(seed, task_index))

    def ping(self) -> dict[str, Any]:
        return {"index": self.index, "node": self.node, "pid": os.getpid()}


def start_workers(config: Config, name_prefix: str | None = None) -> list[ray.actor.ActorHandle]:
    """Restartable workers: Ray brings a dead one back; the pool re-runs what it lost.

    With ``name_prefix`` the actors are named ``PREFIX-i``, so operators (and tests) can
    find them with ``ray.get_actor``.
    """
    res = config.resources
    actor = ray.remote(Worker)
    dumped = config.model_dump(mode="json")
    return [
        actor.options(num_cpus=res.cpus_per_worker, resources=res.worker_resources or None, max_restarts=-1,
                      max_task_retries=0, scheduling_strategy="SPREAD" if res.placement == "spread" else "DEFAULT",
                      name=f"{name_prefix}-{i}" if name_prefix else None).remote(dumped, i)
        for i in range(res.num_workers)
    ]
