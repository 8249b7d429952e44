"""Held-out evaluation (the MAML paper's protocol): adapt on tasks training never saw.

Held-out tasks come from the family's ``sample_eval_tasks`` where it has one (Meta-World:
the test goals or test classes), else from ``sample_tasks`` on a stream training never uses.
Where the family's envs report ``info["success"]``, each (task, step) also has the fraction
of its episodes that succeeded.

Every policy evaluated in one call (the meta-learned one and its baselines) meets the same
held-out tasks with the same episode seeds, so their curves differ only by the policy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from metaray.core import seeding
from metaray.runtime.pool import WorkerPool
from metaray.tasks import Task, TaskFamily


def task_json(task: Task) -> str:
    """A task dict as JSON (numpy scalars and arrays become plain numbers and lists)."""
    return json.dumps(task, sort_keys=True, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))


@dataclass
class EvalResult:
    returns: np.ndarray  # [tasks, steps + 1]: mean episode return after k adaptation steps
    env_steps: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))  # same shape
    tasks: list[Task] = field(default_factory=list)
    success: np.ndarray | None = None  # [tasks, steps + 1]: success rate after k steps; NaN where not reported

    def __post_init__(self) -> None:
        if self.success is None:
            self.success = np.full(self.returns.shape, np.nan)

    @property
    def has_success(self) -> bool:
        """Whether the family reported success (info["success"]) on these tasks."""
        return bool(np.isfinite(self.success).any())

    @property
    def mean_success(self) -> list[float]:
        """Mean success rate over the tasks per adaptation step (NaN where none was reported)."""
        counted = np.isfinite(self.success).sum(0)
        totals = np.where(np.isfinite(self.success), self.success, 0.0).sum(0)
        return np.where(counted > 0, totals / np.maximum(counted, 1), np.nan).tolist()

    @property
    def mean_return(self) -> list[float]:
        return self.returns.mean(0).tolist()

    @property
    def std_return(self) -> list[float]:
        return self.returns.std(0).tolist()

    @property
    def stderr_return(self) -> list[float]:
        return (self.returns.std(0, ddof=1 if len(self.returns) > 1 else 0) / np.sqrt(len(self.returns))).tolist()

    def to_json(self) -> dict[str, Any]:
        out = {
            "tasks": int(self.returns.shape[0]),
            "steps": int(self.returns.shape[1] - 1),
            "mean_return": self.mean_return,
            "std_return": self.std_return,
            "stderr_return": self.stderr_return,
        }
        if self.has_success:
            out["mean_success"] = self.mean_success
        return out

    def rows(self, policy: str) -> list[dict[str, Any]]:
        """One row per (task, adaptation steps), for eval.parquet."""
        return [
            {"policy": policy, "task_index": i, "task": task_json(task), "adaptation_steps": k,
             "return": float(self.returns[i, k]), "env_steps": int(self.env_steps[i, k]),
             "success": float(self.success[i, k])}
            for i, task in enumerate(self.tasks) for k in range(self.returns.shape[1])
        ]


def evaluate_many(
    pool: WorkerPool,
    family: TaskFamily,
    policies: dict[str, np.ndarray],
    tasks: int,
    steps: int,
    seed: int,
) -> dict[str, EvalResult]:
    """Adapt each policy for 0..steps inner steps on the same ``tasks`` held-out tasks."""
    held_out = seeding.eval_tasks(family, seed, tasks)
    jobs = [(name, i) for name in policies for i in range(tasks)]
    refs = {name: ray.put(np.asarray(p, dtype=np.float32)) for name, p in policies.items()}
    out: dict[tuple[str, int], tuple[list[float], ...]] = {}
    pool.map(lambda w, j: w.evaluate.remote(refs[jobs[j][0]], held_out[jobs[j][1]], jobs[j][1], steps, seed),
             list(range(len(jobs))), lambda j, _, value: out.__setitem__(jobs[j], value))
    column = lambda name, k, dtype: np.asarray([out[(name, i)][k] for i in range(tasks)], dtype=dtype)  # noqa: E731
    return {  # a worker's answer: (returns, env steps, success rates), one per adaptation step
        name: EvalResult(column(name, 0, np.float64), column(name, 1, np.int64), held_out, column(name, 2, np.float64))
        for name in policies
    }


def evaluate(pool: WorkerPool, family: TaskFamily, flat_params: np.ndarray, tasks: int, steps: int,
             seed: int) -> EvalResult:
    """Adapt ``flat_params`` for 0..steps inner steps on ``tasks`` held-out tasks."""
    return evaluate_many(pool, family, {"metaray": flat_params}, tasks, steps, seed)["metaray"]
