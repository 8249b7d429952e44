"""The training loop: sample tasks -> fan out -> gather -> update -> log."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from metaray import seeding
from metaray.config import Config
from metaray.evaluation import EvalResult, evaluate
from metaray.learner import start_learner
from metaray.policy import flatten
from metaray.run_dir import RunDir
from metaray.task_runner import TaskRunner
from metaray.worker import start_workers

Log = Callable[[str], None]


def iteration_row(iteration: int, out: dict[str, Any], wall_s: float, total_steps: int) -> dict[str, Any]:
    tasks = out["tasks"]
    steps = sum(t["env_steps"] for t in tasks)
    nodes: dict[str, int] = {}
    for t in tasks:
        nodes[t["worker"].split("@")[-1]] = nodes.get(t["worker"].split("@")[-1], 0) + 1
    return {
        "iteration": iteration,
        "pre_return": float(np.mean([t["pre_return"] for t in tasks])),
        "post_return": float(np.mean([t["post_return"] for t in tasks])),
        "env_steps": steps,
        "total_env_steps": total_steps + steps,
        "env_steps_per_s": steps / wall_s,
        "time_iteration_s": wall_s,
        "time_sample_s": float(sum(t["sample_s"] for t in tasks)),
        "time_adapt_s": float(sum(t["adapt_s"] for t in tasks)),
        "time_gather_s": out["gather_s"],
        "time_outer_s": out["outer_s"],
        "grad_norm": out["grad_norm"],
        "tasks_per_node": ",".join(f"{k}={v}" for k, v in sorted(nodes.items())),
    }


def train(config: Config, run: RunDir, log: Log = print, runner: TaskRunner | None = None) -> dict[str, Any]:
    """Meta-train on the connected Ray cluster; returns the final params, rows and held-out evaluation.

    ``runner`` (a local TaskRunner) is built here if the caller has not already built one
    to check the family before starting anything.
    """
    runner = runner or TaskRunner(config)
    flat0 = flatten(runner.template).numpy()
    workers = start_workers(config)
    learner = start_learner(config, flat0)
    n_workers = len(workers)
    rows: list[dict[str, Any]] = []
    total_steps = 0
    log(f"meta-training {config.algorithm} on {config.task.family}: {config.outer.iterations} iterations, "
        f"{config.outer.meta_batch_size} tasks each, {n_workers} workers, {flat0.size} parameters")
    for it in range(config.outer.iterations):
        start = time.perf_counter()
        tasks = seeding.train_tasks(runner.family, config.seed, it, config.outer.meta_batch_size)
        [params_ref] = ray.get(learner.publish.remote())
        holders = [i % n_workers for i in range(len(tasks))]
        refs = [workers[w].run_task.remote(params_ref, it, i, task) for i, (w, task) in enumerate(zip(holders, tasks))]
        out = ray.get(learner.apply.remote(it, refs, holders, workers))
        row = iteration_row(it, out, time.perf_counter() - start, total_steps)
        total_steps = row["total_env_steps"]
        rows.append(row)
        run.write_metrics(rows)
        log(f"iter {it + 1:4d}/{config.outer.iterations}  pre {row['pre_return']:9.3f}  "
            f"post {row['post_return']:9.3f}  steps/s {row['env_steps_per_s']:8.0f}  "
            f"{row['time_iteration_s']:.2f}s")
        last = it + 1 == config.outer.iterations
        if last or (it + 1) % config.checkpoint.every == 0:
            run.save_checkpoint(it + 1, ray.get(learner.get_state.remote()), config)
    final = ray.get(learner.get_state.remote())["params"].numpy()
    result = evaluate(workers, runner.family, final, config.eval.tasks, config.eval.steps, config.seed)
    for actor in [*workers, learner]:
        ray.kill(actor)
    return {"params": final, "eval": result, "rows": rows}


def eval_run(config: Config, flat_params: np.ndarray, tasks: int, steps: int, seed: int) -> EvalResult:
    runner = TaskRunner(config)
    workers = start_workers(config)
    try:
        return evaluate(workers, runner.family, flat_params, tasks, steps, seed)
    finally:
        for actor in workers:
            ray.kill(actor)
