"""The learner actor: holds the meta-parameters and the outer optimizer.

Each iteration it puts the meta-parameters into the object store once, hands the tasks to
the worker pool, and folds the results into a running sum as they arrive, strictly in
task-index order: the update never depends on which worker finished first or which worker
died, and memory stays O(parameters). Results with NaN or inf are rejected, never applied.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray
import torch

from metaray.algorithms.reptile import pseudo_gradient
from metaray.algorithms.trpo import trpo_step
from metaray.config import Config
from metaray.core.task_worker import LostTaskStateError, TaskResult
from metaray.runtime.pool import LOST, WorkerPool
from metaray.tasks import Task


class IterationFailedError(RuntimeError):
    pass


class Learner:
    def __init__(self, config: dict[str, Any], flat_params: np.ndarray,
                 workers: list[ray.actor.ActorHandle] | None = None) -> None:
        self.config = Config.model_validate(config)
        torch.set_num_threads(1)
        self.params = torch.nn.Parameter(torch.tensor(np.asarray(flat_params), dtype=torch.float32))
        outer = self.config.outer
        self.optimizer: torch.optim.Optimizer | None
        if outer.optimizer == "adam":
            self.optimizer = torch.optim.Adam([self.params], lr=outer.lr)
        elif outer.optimizer == "sgd":
            self.optimizer = torch.optim.SGD([self.params], lr=outer.lr)
        else:
            self.optimizer = None
        res = self.config.resources
        self.pool = WorkerPool(workers or [], task_timeout_s=res.task_timeout_s)
        self._settled = False

    # -- one iteration -----------------------------------------------------------------------

    def step(self, iteration: int, tasks: list[Task]) -> dict[str, Any]:
        """Run every task of the iteration on the workers, aggregate, take the outer step."""
        res = self.config.resources
        if not self._settled:  # first step: a worker still starting would get no share of the meta-batch
            self.pool.settle(timeout=10.0)
            self._settled = True
        before = self.pool.counters.as_dict()
        params_ref = ray.put(self.params.detach().numpy().copy())  # once per iteration
        start = time.perf_counter()
        attempts = 0
        while True:
            attempts += 1
            total, rows, holders = self._gather(iteration, tasks, params_ref)
            valid = [r for r in rows if not r["rejected"]]
            if len(valid) >= res.min_valid_fraction * len(tasks):
                break
            if attempts > res.max_iteration_retries:
                raise IterationFailedError(
                    f"iteration {iteration}: only {len(valid)} of {len(tasks)} task results were finite after "
                    f"{attempts} attempts (resources.min_valid_fraction={res.min_valid_fraction})")
        gather_s = time.perf_counter() - start
        start = time.perf_counter()
        mean = total / len(valid)
        info = self._outer_step(iteration, mean, valid, holders, tasks, params_ref)
        faults = {k: v - before[k] for k, v in self.pool.counters.as_dict().items()}
        return {"tasks": rows, "gather_s": gather_s, "outer_s": time.perf_counter() - start,
                "iteration_attempts": attempts, "rejected_results": len(rows) - len(valid), **faults, **info}

    def _gather(self, iteration: int, tasks: list[Task],
                params_ref: ray.ObjectRef) -> tuple[torch.Tensor, list[dict[str, Any]], dict[int, int]]:
        total = torch.zeros_like(self.params)
        rows: list[dict[str, Any]] = []
        pending: dict[int, TaskResult] = {}
        holders: dict[int, int] = {}

        def on_result(index: int, worker: int, result: TaskResult) -> None:
            nonlocal total
            holders[index] = worker
            pending[index] = result
            while len(rows) in pending:  # fold the contiguous prefix: a fixed summation order
                r = pending.pop(len(rows))
                vector = torch.tensor(r.vector)
                finite = bool(torch.isfinite(vector).all())
                if finite:
                    total += vector
                rows.append({"task_index": r.task_index, "worker": r.worker, "pre_return": r.pre_return,
                             "post_return": r.post_return, "outer_loss": r.outer_loss, "env_steps": r.env_steps,
                             "rejected": not finite, **r.timings})

        n, workers = len(tasks), max(1, len(self.pool.workers))
        size = -(-n // workers) if self.config.resources.batch_tasks else 1
        chunks = [list(range(start, min(start + size, n))) for start in range(0, n, size)]
        self.pool.map(lambda w, c: w.run_tasks.remote(params_ref, iteration, [(i, tasks[i]) for i in chunks[c]]),
                      list(range(len(chunks))),
                      lambda _, w, results: [on_result(r.task_index, w, r) for r in results])
        return total, rows, holders

    # -- outer step ----------------------------------------------------------------------------

    def _outer_step(self, iteration: int, mean: torch.Tensor, valid: list[dict[str, Any]],
                    holders: dict[int, int], tasks: list[Task], params_ref: ray.ObjectRef) -> dict[str, Any]:
        if self.config.algorithm == "reptile":
            mean = pseudo_gradient(mean)
        if self.config.algorithm == "promp":
            return self._promp_steps(iteration, mean, valid, holders, tasks, params_ref)
        if self.optimizer is not None:
            self._apply(mean)
            return {"grad_norm": float(mean.norm())}
        trpo = self.config.outer.trpo
        indices = [r["task_index"] for r in valid]
        old_loss = float(np.mean([r["outer_loss"] for r in valid]))

        def on_workers(method: str, *args: Any) -> list[Any]:
            return self._ask_holders(iteration, method, indices, holders, tasks, params_ref, *args)

        def hvp(vector: torch.Tensor) -> torch.Tensor:
            parts = on_workers("trpo_hvp", params_ref, ray.put(vector.numpy()))
            return sum((torch.tensor(p) for p in parts), torch.zeros_like(vector)) / len(parts)

        def loss_and_kl(candidate: torch.Tensor) -> tuple[float, float]:
            parts = on_workers("trpo_loss_kl", ray.put(candidate.numpy()))
            return float(np.mean([p[0] for p in parts])), float(np.mean([p[1] for p in parts]))

        result = trpo_step(self.params.detach(), mean, old_loss, hvp, loss_and_kl, trpo.max_kl,
                           trpo.cg_iters, trpo.cg_damping, trpo.ls_max_steps, trpo.ls_backtrack_ratio)
        with torch.no_grad():
            self.params.copy_(result.params)
        return {"grad_norm": float(mean.norm()), "trpo_accepted": result.accepted,
                "trpo_ls_steps": result.line_search_steps, "trpo_kl": result.kl}

    def _apply(self, gradient: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        self.params.grad = gradient.clone()
        self.optimizer.step()

    def _promp_steps(self, iteration: int, mean: torch.Tensor, valid: list[dict[str, Any]],
                     holders: dict[int, int], tasks: list[Task], params_ref: ray.ObjectRef) -> dict[str, Any]:
        """ProMP: outer.promp.steps optimizer steps on this iteration's samples; the workers that
        keep each task's episodes compute its meta-gradient at the current parameters."""
        indices = [r["task_index"] for r in valid]
        self._apply(mean)
        for _ in range(self.config.outer.promp.steps - 1):
            current = ray.put(self.params.detach().numpy().copy())
            parts = self._ask_holders(iteration, "promp_gradient", indices, holders, tasks, params_ref, current)
            self._apply(torch.tensor(np.mean(parts, axis=0)))
        return {"grad_norm": float(mean.norm())}

    def _ask_holders(self, iteration: int, method: str, indices: list[int], holders: dict[int, int],
                     tasks: list[Task], params_ref: ray.ObjectRef, *args: Any) -> list[Any]:
        """Call ``method`` on the workers that keep each task's episodes; values in task order.

        A task whose worker died (or restarted, losing its episodes) is sampled again on a
        live worker with the same seed, which rebuilds exactly the same episodes.
        """
        answers: dict[int, Any] = {}
        todo = list(indices)
        while todo:
            groups: dict[int, list[int]] = {}
            for i in todo:
                groups.setdefault(holders[i], []).append(i)
            calls = {w: getattr(self.pool.workers[w], method).remote(iteration, idx, *args)
                     for w, idx in groups.items()}
            lost: list[int] = []
            for w, ref in calls.items():
                try:
                    answers.update(zip(groups[w], ray.get(ref)))
                except LOST:
                    self.pool.mark_down(w)
                    lost += groups[w]
                except ray.exceptions.RayTaskError as err:
                    if not isinstance(err.cause, LostTaskStateError):
                        raise
                    lost += groups[w]
            if lost:
                self.pool.counters.task_retries += len(lost)
                self.pool.map(lambda w, i: w.run_tasks.remote(params_ref, iteration, [(i, tasks[i])]), lost,
                              lambda i, w, _: holders.__setitem__(i, w))
            todo = lost
        return [answers[i] for i in indices]

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
