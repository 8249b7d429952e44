"""The training loop: sample tasks -> fan out -> gather -> update -> log."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from metaray.config import Config, ConfigError
from metaray.core import seeding
from metaray.core.policy import flatten
from metaray.core.task_worker import TaskWorker
from metaray.evaluation.evaluate import EvalResult, evaluate, evaluate_many, task_json
from metaray.runtime.learner import IterationFailedError, start_learner
from metaray.runtime.pool import WorkerPool
from metaray.runtime.worker import start_workers
from metaray.tasks import Task, TaskFamily
from metaray.training.progress import FAULT_KEYS, LineProgress, Progress
from metaray.training.run_dir import SAFE_TO_CHANGE, RunDir, config_changes
from metaray.training.tensorboard import EventLog

Log = Callable[[str], None]


def mean_success(values: list[float | None]) -> float:
    """Mean of the success rates that were reported (finite); NaN when none was."""
    reported = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(reported)) if reported else float("nan")


def iteration_row(iteration: int, out: dict[str, Any], wall_s: float, total_steps: int) -> dict[str, Any]:
    tasks = out["tasks"]
    kept = [t for t in tasks if not t["rejected"]] or tasks
    steps = sum(t["env_steps"] for t in tasks) + out.get("discarded_env_steps", 0)
    nodes = Counter(t["worker"].split("@")[-1] for t in tasks)
    workers = Counter(w.split("@")[-1] for w in {t["worker"] for t in tasks})
    return {
        "iteration": iteration,
        "pre_return": float(np.mean([t["pre_return"] for t in kept])),
        "post_return": float(np.mean([t["post_return"] for t in kept])),
        # the fraction of the meta-batch's episodes that succeeded (info["success"]); NaN: no family success
        "pre_success_rate": mean_success([t.get("pre_success") for t in kept]),
        "post_success_rate": mean_success([t.get("post_success") for t in kept]),
        "env_steps": steps,  # including the draws of failed attempts: what the iteration cost
        "metric_env_steps": sum(t.get("metric_env_steps", 0) for t in tasks),
        "total_env_steps": total_steps + steps,
        "env_steps_per_s": steps / wall_s,
        "time_iteration_s": wall_s,
        "time_sample_s": float(sum(t["sample_s"] for t in tasks)),
        "time_adapt_s": float(sum(t["adapt_s"] for t in tasks)),
        "time_gather_s": out["gather_s"],
        "time_outer_s": out["outer_s"],
        "outer_loss": float(np.mean([t["outer_loss"] for t in kept])),
        "grad_norm": out["grad_norm"],
        "trpo_kl": out.get("trpo_kl"),
        # the line search's candidates evaluated, and whether one was taken (TRPO only; else None)
        "trpo_ls_steps": out.get("trpo_ls_steps"),
        "trpo_accepted": out.get("trpo_accepted"),
        "tasks_counted": len(tasks),
        "task_indices": ",".join(str(t["task_index"]) for t in tasks),
        "rejected_results": out["rejected_results"],
        "iteration_attempts": out["iteration_attempts"],
        **{k: out[k] for k in FAULT_KEYS},
        "tasks_per_node": ",".join(f"{k}={v}" for k, v in sorted(nodes.items())),
        "workers_per_node": ",".join(f"{k}={v}" for k, v in sorted(workers.items())),
    }


def task_rows(iteration: int, out: dict[str, Any], tasks: list[Task]) -> list[dict[str, Any]]:
    """One row per task of the iteration: what it was, where it ran, what it returned."""
    rows = []
    for t in out["tasks"]:
        text = task_json(tasks[t["task_index"]])
        worker, _, node = t["worker"].partition("@")
        rows.append({
            "iteration": iteration, "task_index": t["task_index"], "task": text,
            **{f"task_{k}": v for k, v in json.loads(text).items()},
            "worker": worker, "node": node, "pre_return": t["pre_return"], "post_return": t["post_return"],
            "pre_success_rate": t.get("pre_success", float("nan")),
            "post_success_rate": t.get("post_success", float("nan")),
            "outer_loss": t["outer_loss"], "env_steps": t["env_steps"], "metric_env_steps": t["metric_env_steps"],
            "attempt": out["iteration_attempts"] - 1, "rejected": t["rejected"],
            "sample_s": t["sample_s"], "adapt_s": t["adapt_s"],
        })
    return rows


def save_eval(run: RunDir, results: dict[str, EvalResult], iteration: int, seed: int,
              extra: list[dict[str, Any]] | None = None) -> None:
    """Replace eval.parquet with this evaluation: one row per (policy, task, adaptation steps)."""
    rows = [row for name, r in results.items() for row in r.rows(name)] + (extra or [])
    run.write_eval([{"iteration": iteration, "seed": seed, **row} for row in rows])


def check_compatible(checkpoint: dict[str, Any], config: Config, n_params: int, source: str) -> None:
    """Refuse a checkpoint whose policy or optimizer does not fit ``config``."""
    params = checkpoint["params"]
    saved = checkpoint.get("config", {})
    if params.numel() != n_params or saved.get("policy") != config.policy.model_dump(mode="json"):
        raise ConfigError(
            f"checkpoint {source} holds a policy of {params.numel()} parameters "
            f"({saved.get('policy')}); the config needs {n_params} ({config.policy.model_dump(mode='json')})")
    if saved.get("outer", {}).get("optimizer") != config.outer.optimizer or saved.get("algorithm") != config.algorithm:
        raise ConfigError(
            f"checkpoint {source} was written by algorithm {saved.get('algorithm')!r} with outer.optimizer "
            f"{saved.get('outer', {}).get('optimizer')!r}; the config asks for {config.algorithm!r} with "
            f"{config.outer.optimizer!r}")


def check_resumable(saved: Config, config: Config, checkpoint_iteration: int, source: str) -> None:
    """Refuse a resume whose config would not continue the same run (naming the fields), or that
    asks for fewer iterations than the checkpoint already holds."""
    changed = config_changes(saved, config, may_change=SAFE_TO_CHANGE)
    if saved.resources.torch_threads != config.resources.torch_threads:
        changed = sorted([*changed, "resources.torch_threads"])
    if changed:
        raise ConfigError(f"--resume {source}: cannot change {', '.join(changed)} (the resumed run would not "
                          f"equal an uninterrupted one); outer.iterations, checkpoint.*, eval.* and resources.* "
                          f"(but torch_threads) may change")
    if config.outer.iterations < checkpoint_iteration:
        raise ConfigError(f"--resume {source}: outer.iterations={config.outer.iterations} is below the "
                          f"{checkpoint_iteration} iterations its checkpoint already holds")


def run_iteration(learner: ray.actor.ActorHandle, family: TaskFamily, config: Config,
                  iteration: int) -> tuple[list[Task], dict[str, Any]]:
    """One iteration; one with too few finite results is retried on a fresh, seeded task draw.

    The draw of attempt k is a function of (seed, iteration, k), so a resumed run repeats
    the same attempts and stays bit-identical.
    """
    res = config.resources
    spent = {"discarded_env_steps": 0, "rejected_results": 0, **dict.fromkeys(FAULT_KEYS, 0)}
    for attempt in range(res.max_iteration_retries + 1):
        tasks = seeding.train_tasks(family, config.seed, iteration, config.outer.meta_batch_size, attempt)
        out = ray.get(learner.step.remote(iteration, tasks, attempt))
        if out["applied"]:  # the metrics row counts what the discarded draws cost too
            counted = {k: out[k] + spent[k] for k in spent if k in out}
            return tasks, {**out, **counted, "discarded_env_steps": spent["discarded_env_steps"],
                           "iteration_attempts": attempt + 1}
        for key in spent:
            spent[key] += out.get(key, 0)
        spent["discarded_env_steps"] += sum(t["env_steps"] + t["metric_env_steps"] for t in out["tasks"])
    raise IterationFailedError(
        f"iteration {iteration}: only {len(tasks) - out['rejected_results']} of {len(tasks)} task results were "
        f"finite in each of {attempt + 1} task draws (resources.min_valid_fraction={res.min_valid_fraction})")


def train(config: Config, run: RunDir, log: Log = print, runner: TaskWorker | None = None,
          resume: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Meta-train on the connected Ray cluster; returns the final params, rows and held-out evaluation.

    With ``resume`` the run continues from the run directory's newest checkpoint; since all
    randomness is a function of (seed, iteration, task), the result is bit-identical to a
    run that was never interrupted. The metrics and task rows (appended as part files) and the
    TensorBoard events are written after every iteration, and compacted into metrics.parquet
    and tasks.parquet when the run ends, also when it fails.
    """
    runner = runner or TaskWorker(config)
    progress = progress or LineProgress(log)
    flat0 = flatten(runner.template).numpy()
    checkpoint = None
    if resume:
        checkpoint = run.latest_checkpoint()
        check_compatible(checkpoint, config, runner.n_params, str(run.checkpoint_files()[-1]))
    tag = uuid.uuid4().hex[:8]
    workers = start_workers(config, name_prefix=f"metaray-worker-{tag}")
    learner = start_learner(config, flat0, workers)
    # The learner lets every worker come up (placed, torch imported; up to 10 s) before cutting
    # the first meta-batch into shares; a later one joins through the pool's pings.
    start_it = 0
    if checkpoint is not None:
        ray.get(learner.set_state.remote(checkpoint))
        start_it = int(checkpoint["iteration"])
        progress.message(f"resuming from iteration {start_it}")
    run.truncate_tables(start_it)  # rows past the checkpoint are re-run (all of them on a fresh start)
    rows = run.read_metrics()
    events = EventLog(run.path, purge_step=start_it if checkpoint is not None else None)
    total_steps = rows[-1]["total_env_steps"] if rows else 0
    progress.message(f"meta-training {config.algorithm} on {config.task.family}: {config.outer.iterations} "
                     f"iterations, {config.outer.meta_batch_size} tasks each, {len(workers)} workers, "
                     f"{flat0.size} parameters")
    progress.start(config.outer.iterations, start_it)
    trained = False
    try:
        for it in range(start_it, config.outer.iterations):
            start = time.perf_counter()
            tasks, out = run_iteration(learner, runner.family, config, it)
            row = iteration_row(it, out, time.perf_counter() - start, total_steps)
            total_steps = row["total_env_steps"]
            rows.append(row)
            run.append_iteration(it, row, task_rows(it, out, tasks))
            events.iteration(row)
            progress.update(row)
            if it + 1 == config.outer.iterations or (it + 1) % config.checkpoint.every == 0:
                run.save_checkpoint(it + 1, ray.get(learner.get_state.remote()), config, config.checkpoint.keep)
        trained = True
        run.compact_tables()
        progress.close()
        final = ray.get(learner.get_state.remote())["params"].numpy()
        result = evaluate(WorkerPool(workers), runner.family, final, config.eval.tasks, config.eval.steps,
                          config.seed)
        save_eval(run, {"metaray": result}, config.outer.iterations, config.seed)
        events.evaluation(config.outer.iterations, result.mean_return)
    finally:
        if not trained:  # a failed run's rows end in the single files too, for readers outside metaray;
            with contextlib.suppress(Exception):  # its parts stay valid, and this must not hide the error
                run.compact_tables()
        progress.close()
        events.close()
        for actor in [*workers, learner]:
            ray.kill(actor, no_restart=True)
        if trained:  # the events and anything else not yet on the store (a failed run's error stands)
            run.flush()
        else:
            with contextlib.suppress(Exception):
                run.flush()
    return {"params": final, "eval": result, "rows": rows}


def eval_run(config: Config, flat_params: np.ndarray, tasks: int, steps: int, seed: int) -> EvalResult:
    return eval_policies(config, {"metaray": flat_params}, tasks, steps, seed)["metaray"]


def eval_policies(config: Config, policies: dict[str, np.ndarray], tasks: int, steps: int,
                  seed: int) -> dict[str, EvalResult]:
    """Evaluate several policies on the same held-out tasks with one pool of workers."""
    runner = TaskWorker(config)
    workers = start_workers(config)
    try:
        return evaluate_many(WorkerPool(workers), runner.family, policies, tasks, steps, seed)
    finally:
        for actor in workers:
            ray.kill(actor, no_restart=True)
