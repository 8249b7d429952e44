"""The learner actor: holds the meta-parameters and the outer optimizer.

Each iteration it puts the meta-parameters into the object store once, hands the tasks to
the worker pool in whole groups, and folds the results into a running sum as they arrive,
strictly in group order, each group's sum added in task order on its worker: the update
never depends on which worker finished first or which worker died, and what waits to be
folded is one vector per group (the sum itself is O(parameters)). Results with NaN or inf are rejected,
never applied. The outer step is the algorithm's learner half; its requests go to the
workers that keep each task's episodes.
"""

from __future__ import annotations

import time
from functools import reduce
from typing import Any

import numpy as np
import ray
import torch

from metaray.algorithms.base import resolve_algorithm
from metaray.config import Config
from metaray.core.task_worker import LostTaskStateError
from metaray.runtime.pool import LOST, WorkerPool
from metaray.runtime.worker import GroupResult
from metaray.tasks import Task

INLINE_BYTES = 64 * 1024  # below Ray's 100 KiB limit for arguments sent inside the call


class IterationFailedError(RuntimeError):
    pass


def task_groups(n: int, size: int) -> list[list[int]]:
    """Task indices 0..n-1 in their fixed sampling groups of ``size`` consecutive indices."""
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)]


def split_calls(groups: list[list[int]], workers: int, batch_tasks: bool) -> list[list[int]]:
    """One call per worker, of whole consecutive groups, their counts differing by at most one
    (one call per group without batching). Which calls exist never changes a result."""
    if not batch_tasks:
        return [list(g) for g in groups]
    calls, n = min(len(groups), max(1, workers)), len(groups)
    bounds = [c * n // calls for c in range(calls + 1)]
    return [[i for g in groups[bounds[c]: bounds[c + 1]] for i in g] for c in range(calls)]


class _Outer:
    """The OuterContext of one iteration: the learner's parameters and optimizer, and requests
    to the workers that keep the counted tasks."""

    def __init__(self, learner: Learner, iteration: int, attempt: int, rows: list[dict[str, Any]],
                 holders: dict[int, int], tasks: list[Task], params_ref: ray.ObjectRef) -> None:
        self.learner, self.iteration, self.attempt = learner, iteration, attempt
        self.indices = [r["task_index"] for r in rows]
        self.losses = [r["outer_loss"] for r in rows]
        self.holders, self.tasks, self.params_ref = holders, tasks, params_ref
        self.params = learner.params
        self.rejected = 0

    def apply(self, gradient: torch.Tensor) -> None:
        optimizer = self.learner.optimizer
        if optimizer is None:
            raise RuntimeError(f"outer.optimizer {self.learner.config.outer.optimizer!r} is not a torch optimizer")
        optimizer.zero_grad()
        self.params.grad = gradient.detach().clone().to(self.params.dtype)
        optimizer.step()

    def ask(self, request: str, *args: np.ndarray) -> list[Any]:
        return self.learner.ask_holders(self, request, *self._shared(args))

    def ask_mean(self, request: str, *args: np.ndarray) -> np.ndarray:
        sums = self.learner.ask_holders(self, request, *self._shared(args), summed=True)
        return reduce(np.add, sums) / len(self.indices)  # in group order: the same for any worker count

    @staticmethod
    def _shared(args: tuple[np.ndarray, ...]) -> list[Any]:
        """A request's arguments, which every worker asked reads: large ones into the object store
        once per request; small ones (a TRPO vector of a 64x64 policy) inline in the calls, which
        saves a store round trip per request."""
        arrays = [np.asarray(a) for a in args]
        return [ray.put(a) if a.nbytes > INLINE_BYTES else a for a in arrays]


class Learner:
    def __init__(self, config: dict[str, Any], flat_params: np.ndarray,
                 workers: list[ray.actor.ActorHandle] | None = None) -> None:
        self.config = Config.model_validate(config)
        torch.set_num_threads(1)
        self.params = torch.nn.Parameter(torch.tensor(np.asarray(flat_params), dtype=torch.float32))
        outer = self.config.outer
        optimizers = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
        self.optimizer = optimizers[outer.optimizer]([self.params], lr=outer.lr) if outer.optimizer in optimizers \
            else None
        self.algorithm = resolve_algorithm(self.config.algorithm)(self.config, None, None)  # its learner half
        res = self.config.resources
        self.pool = WorkerPool(workers or [], task_timeout_s=res.task_timeout_s)
        self._settled = False

    # -- one iteration -----------------------------------------------------------------------

    def step(self, iteration: int, tasks: list[Task], attempt: int = 0) -> dict[str, Any]:
        """Run every task of the iteration on the workers, aggregate, take the outer step.

        When fewer than ``resources.min_valid_fraction`` of the results are finite, nothing
        is applied and ``applied`` is False: the trainer retries with a fresh task draw.
        """
        if not self._settled:  # first step: a worker still starting would get no share of the meta-batch
            self.pool.settle(timeout=10.0)
            self._settled = True
        before = self.pool.counters.as_dict()
        params_ref = ray.put(self.params.detach().numpy().copy())  # once per iteration
        start = time.perf_counter()
        total, rows, holders = self._gather(iteration, tasks, params_ref, attempt)
        valid = [r for r in rows if not r["rejected"]]
        gather_s = time.perf_counter() - start
        out: dict[str, Any] = {"tasks": rows, "gather_s": gather_s, "outer_s": 0.0, "grad_norm": None,
                               "rejected_results": len(rows) - len(valid), "applied": False}
        if len(valid) >= self.config.resources.min_valid_fraction * len(tasks):
            start = time.perf_counter()
            outer = _Outer(self, iteration, attempt, valid, holders, tasks, params_ref)
            info = self.algorithm.outer_step(outer, total / len(valid))
            out.update(info, applied=True, outer_s=time.perf_counter() - start,
                       rejected_results=out["rejected_results"] + outer.rejected)
        faults = {k: v - before[k] for k, v in self.pool.counters.as_dict().items()}
        return {**out, **faults}

    def _chunks(self, n: int) -> tuple[list[list[int]], list[list[int]]]:
        """The groups, and the calls: whole groups, split evenly over the workers."""
        groups = task_groups(n, self.config.rollout.task_group_size)
        return groups, split_calls(groups, len(self.pool.workers), self.config.resources.batch_tasks)

    def _gather(self, iteration: int, tasks: list[Task], params_ref: ray.ObjectRef,
                attempt: int) -> tuple[torch.Tensor, list[dict[str, Any]], dict[int, int]]:
        total = torch.zeros_like(self.params)
        rows: list[dict[str, Any]] = []
        pending: dict[int, GroupResult] = {}
        holders: dict[int, int] = {}
        folded = 0  # groups added to the total so far

        def on_result(worker: int, result: GroupResult) -> None:
            nonlocal total, folded
            holders.update(dict.fromkeys((r["task_index"] for r in result.rows), worker))
            pending[result.group] = result
            while folded in pending:  # fold the contiguous prefix of groups: a fixed summation order
                group = pending.pop(folded)
                folded += 1
                total += torch.tensor(group.total)  # a copy: arrays from the object store are read-only
                rows.extend(group.rows)

        _, calls = self._chunks(len(tasks))
        self.pool.map(lambda w, c: w.run_tasks.remote(params_ref, iteration, [(i, tasks[i]) for i in calls[c]],
                                                      attempt),
                      list(range(len(calls))),
                      lambda _, w, results: [on_result(w, r) for r in results])
        return total, rows, holders

    def ask_holders(self, outer: _Outer, request: str, *args: Any, summed: bool = False) -> list[Any]:
        """``answer(request, *args)`` on the workers that keep each counted task; values in task order
        (``summed``: each group's in-order sum of them, in group order).

        A task whose worker died (or restarted, losing its episodes), or, with
        ``resources.task_timeout_s``, has not answered within it (hung, or busy behind a
        straggler's abandoned call), is sampled again on a live worker with its whole group and
        the same seeds, which rebuilds exactly the same episodes.
        """
        answers: dict[int, Any] = {}
        todo, holders = list(outer.indices), outer.holders
        groups, _ = self._chunks(len(outer.tasks))
        while todo:
            by_worker: dict[int, list[int]] = {}
            for i in todo:
                by_worker.setdefault(holders[i], []).append(i)
            calls = {w: (self.pool.workers[w].answer_sums if summed else self.pool.workers[w].answer).remote(
                outer.iteration, idx, request, *args) for w, idx in by_worker.items()}
            lost: list[int] = []
            timeout = self.pool.task_timeout_s
            answered = set(calls.values()) if timeout is None else set(
                ray.wait(list(calls.values()), num_returns=len(calls), timeout=timeout)[0])
            for w, ref in calls.items():
                if ref not in answered:  # no calls to it until it answers a ping, queued behind this one
                    self.pool.counters.task_timeouts += 1
                    self.pool.mark_down(w)
                    lost += by_worker[w]
                    continue
                try:
                    got = dict(ray.get(ref) if summed else zip(by_worker[w], ray.get(ref)))
                    if answers.keys() & got.keys():  # a group split between holders would be summed twice
                        raise RuntimeError(f"{request!r}: answers for {sorted(answers.keys() & got.keys())} twice")
                    answers.update(got)
                except LOST:
                    self.pool.mark_down(w)
                    lost += by_worker[w]
                except ray.exceptions.RayTaskError as err:
                    if not isinstance(err.cause, LostTaskStateError):
                        raise
                    lost += by_worker[w]
            if lost:
                self.pool.counters.task_retries += len(lost)
                again = sorted({i // self.config.rollout.task_group_size for i in lost})
                self.pool.map(
                    lambda w, g: w.run_tasks.remote(outer.params_ref, outer.iteration,
                                                    [(i, outer.tasks[i]) for i in groups[g]], outer.attempt),
                    again, lambda g, w, _: holders.update(dict.fromkeys(groups[g], w)))
            todo = lost
        return [answers[k] for k in sorted(answers)] if summed else [answers[i] for i in outer.indices]

    # -- state ---------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        return {
            "params": self.params.detach().clone(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.params.copy_(state["params"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])


def start_learner(config: Config, flat_params: np.ndarray,
                  workers: list[ray.actor.ActorHandle]) -> ray.actor.ActorHandle:
    """The learner runs on the head node: worker nodes may be preemptible, the head, which
    holds the cluster's state, is not (a sliver of the head's marker resource pins it)."""
    return ray.remote(Learner).options(num_cpus=0, resources={"node:__internal_head__": 0.001}).remote(
        config.model_dump(mode="json"), flat_params, workers)
