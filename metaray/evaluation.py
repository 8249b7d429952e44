"""Held-out evaluation: adapt on tasks training never saw, report return per step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray

from metaray import seeding
from metaray.pool import WorkerPool
from metaray.tasks import TaskFamily


@dataclass
class EvalResult:
    returns: np.ndarray  # [tasks, steps + 1]: mean episode return after k adaptation steps

    @property
    def mean_return(self) -> list[float]:
        return self.returns.mean(0).tolist()

    @property
    def std_return(self) -> list[float]:
        return self.returns.std(0).tolist()

    @property
    def stderr_return(self) -> list[float]:
        return (self.returns.std(0, ddof=1 if len(self.returns) > 1 else 0) / np.sqrt(len(self.returns))).tolist()

    def to_json(self) -> dict:
        return {
            "tasks": int(self.returns.shape[0]),
            "steps": int(self.returns.shape[1] - 1),
            "mean_return": self.mean_return,
            "std_return": self.std_return,
            "stderr_return": self.stderr_return,
        }


def evaluate(
    pool: WorkerPool,
    family: TaskFamily,
    flat_params: np.ndarray,
    tasks: int,
    steps: int,
    seed: int,
) -> EvalResult:
    """Adapt ``flat_params`` for 0..steps inner steps on ``tasks`` held-out tasks."""
    held_out = seeding.eval_tasks(family, seed, tasks)
    params_ref = ray.put(np.asarray(flat_params, dtype=np.float32))
    returns: dict[int, list[float]] = {}
    pool.map(lambda w, i: w.evaluate.remote(params_ref, held_out[i], i, steps, seed), list(range(tasks)),
             lambda i, _, value: returns.__setitem__(i, value))
    return EvalResult(np.asarray([returns[i] for i in range(tasks)], dtype=np.float64))
