"""The worker actor: a thin Ray shell around a TaskWorker.

Contract: ``run_tasks`` for training, ``answer`` for the learner half's requests about the
tasks it kept (ProMP's gradients) and ``answer_sums`` for those it averages (TRPO's
products, losses and KLs), so that no trajectory ever leaves the worker that sampled it,
``evaluate`` for held-out tasks, ``ping`` for readiness.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from metaray.config import Config
from metaray.core import seeding
from metaray.core.task_worker import TaskResult, TaskWorker
from metaray.tasks import Task


@dataclass
class GroupResult:
    """One fixed task group's part of an iteration: the sum of its tasks' finite vectors, added in
    task order, and one row per task (tasks.parquet's). The learner adds the groups' sums in
    group order, so the update is the same for any worker count (a group never spans workers);
    what waits in the learner to be folded is one vector per group, and the rows it returns are
    the very objects that arrived, so its memory beyond those rows does not grow with the tasks."""

    group: int
    total: np.ndarray  # float32 [parameters]
    rows: list[dict[str, Any]]


def task_row(result: TaskResult, rejected: bool) -> dict[str, Any]:
    """A task's row of tasks.parquet: its returns, losses, steps and timings; never its vector."""
    return {"task_index": result.task_index, "worker": result.worker, "pre_return": result.pre_return,
            "post_return": result.post_return, "outer_loss": result.outer_loss, "env_steps": result.env_steps,
            "metric_env_steps": result.metric_env_steps, "rejected": rejected,
            "pre_success": result.pre_success, "post_success": result.post_success, **result.timings}


def group_results(results: list[TaskResult], group_size: int) -> list[GroupResult]:
    """Results (in task order, whole groups) as their groups' in-order sums and rows; a vector with
    NaN or inf is left out of its sum and its row says ``rejected``."""
    out: list[GroupResult] = []
    for r in results:
        group = r.task_index // group_size
        if not out or out[-1].group != group:
            out.append(GroupResult(group, np.zeros_like(r.vector), []))
        vector = torch.from_numpy(r.vector)
        finite = bool(torch.isfinite(vector).all())
        if finite:
            torch.from_numpy(out[-1].total).add_(vector)
        out[-1].rows.append(task_row(r, rejected=not finite))
    return out


class Worker:
    def __init__(self, config: dict[str, Any], index: int) -> None:
        self.config = Config.model_validate(config)
        # The thread count comes from the config, never from the CPUs a worker got: it is
        # part of the numerical recipe (see README, Reproducibility).
        torch.set_num_threads(self.config.resources.torch_threads)
        self.runner = TaskWorker(self.config)
        self.index = index
        self.node = ray.util.get_node_ip_address() if ray.is_initialized() else socket.gethostname()

    def run_tasks(self, flat_params: np.ndarray, iteration: int, tasks: list[tuple[int, Task]],
                  attempt: int = 0) -> list[GroupResult]:
        """Run (task index, task) pairs of an iteration together (whole groups); one sum per group."""
        seed = self.config.seed
        jobs = [(i, task, seeding.train_episode_seed(seed, iteration, i, attempt)) for i, task in tasks]
        results = self.runner.run_tasks(flat_params, jobs, iteration)
        for result in results:
            result.worker = f"worker-{self.index}@{self.node}"
        return group_results(results, self.config.rollout.task_group_size)

    def answer(self, iteration: int, task_indices: list[int], request: str, *args: np.ndarray) -> list[Any]:
        return [self.runner.answer(iteration, i, request, *args) for i in task_indices]

    def answer_sums(self, iteration: int, task_indices: list[int], request: str,
                    *args: np.ndarray) -> dict[int, np.ndarray]:
        """The answers (arrays of one shape) as one in-order sum per task group: what goes back is a
        vector per group, not per task, and the sums do not depend on which worker holds a group."""
        groups: dict[int, list[int]] = {}
        for i in task_indices:
            groups.setdefault(self.runner.group_of(i), []).append(i)
        return {g: np.asarray(self.runner.answer_sum(iteration, idx, request, *args)) for g, idx in groups.items()}

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
