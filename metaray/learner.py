"""The learner actor: holds the meta-parameters and the outer optimizer.

Each iteration it puts the meta-parameters into the object store once, then folds the
workers' results into a running sum as they arrive, strictly in task-index order, so the
update never depends on which worker finished first, and memory stays O(parameters).
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
from metaray.task_runner import TaskResult


class NonFiniteResultError(RuntimeError):
    pass


class Learner:
    def __init__(self, config: dict[str, Any], flat_params: np.ndarray) -> None:
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
        self._params_ref: ray.ObjectRef | None = None

    def publish(self) -> list[ray.ObjectRef]:
        """Put the meta-parameters in the object store (once per iteration)."""
        self._params_ref = ray.put(self.params.detach().numpy().copy())
        return [self._params_ref]

    def apply(self, iteration: int, refs: list[ray.ObjectRef], holders: list[int],
              workers: list[ray.actor.ActorHandle]) -> dict[str, Any]:
        """Aggregate the iteration's task results and take one outer step."""
        start = time.perf_counter()
        index_of = {ref: i for i, ref in enumerate(refs)}
        pending: dict[int, TaskResult] = {}
        total = torch.zeros_like(self.params)
        rows: list[dict[str, Any]] = []
        waiting = list(refs)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            pending[index_of[ready[0]]] = ray.get(ready[0])
            while len(rows) in pending:
                result = pending.pop(len(rows))
                vector = torch.tensor(result.vector)
                if not torch.isfinite(vector).all():
                    raise NonFiniteResultError(f"task {result.task_index} returned a non-finite update")
                total += vector
                rows.append({
                    "task_index": result.task_index, "worker": result.worker,
                    "pre_return": result.pre_return, "post_return": result.post_return,
                    "outer_loss": result.outer_loss, "env_steps": result.env_steps, **result.timings,
                })
        gather_s = time.perf_counter() - start
        mean = total / len(refs)
        step_start = time.perf_counter()
        info = self._outer_step(iteration, mean, rows, holders, workers)
        return {"tasks": rows, "gather_s": gather_s, "outer_s": time.perf_counter() - step_start, **info}

    def _outer_step(self, iteration: int, mean: torch.Tensor, rows: list[dict[str, Any]],
                    holders: list[int], workers: list[ray.actor.ActorHandle]) -> dict[str, Any]:
        if self.config.algorithm == "reptile":
            mean = pseudo_gradient(mean)
        if self.optimizer is not None:
            self.optimizer.zero_grad()
            self.params.grad = mean.clone()
            self.optimizer.step()
            return {"grad_norm": float(mean.norm())}
        trpo = self.config.outer.trpo
        old_loss = float(np.mean([r["outer_loss"] for r in rows]))
        by_worker: dict[int, list[int]] = {}
        for task_index, w in enumerate(holders):
            by_worker.setdefault(w, []).append(task_index)
        n = len(holders)

        def gather(method: str, *args: Any) -> dict[int, Any]:
            calls = {w: getattr(workers[w], method).remote(iteration, idx, *args) for w, idx in by_worker.items()}
            out: dict[int, Any] = {}
            for w, values in zip(calls, ray.get(list(calls.values()))):
                out.update(zip(by_worker[w], values))
            return out

        def hvp(vector: torch.Tensor) -> torch.Tensor:
            parts = gather("trpo_hvp", self._params_ref, ray.put(vector.numpy()))
            return sum((torch.tensor(parts[i]) for i in range(n)), torch.zeros_like(vector)) / n

        def loss_and_kl(candidate: torch.Tensor) -> tuple[float, float]:
            parts = gather("trpo_loss_kl", ray.put(candidate.numpy()))
            return (float(np.mean([parts[i][0] for i in range(n)])),
                    float(np.mean([parts[i][1] for i in range(n)])))

        result = trpo_step(self.params.detach(), mean, old_loss, hvp, loss_and_kl, trpo.max_kl,
                           trpo.cg_iters, trpo.cg_damping, trpo.ls_max_steps, trpo.ls_backtrack_ratio)
        with torch.no_grad():
            self.params.copy_(result.params)
        return {"grad_norm": float(mean.norm()), "trpo_accepted": result.accepted,
                "trpo_ls_steps": result.line_search_steps, "trpo_kl": result.kl}

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


def start_learner(config: Config, flat_params: np.ndarray) -> ray.actor.ActorHandle:
    return ray.remote(Learner).options(num_cpus=0).remote(config.model_dump(mode="json"), flat_params)
