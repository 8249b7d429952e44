"""The run directory's per-iteration write cost, early and late in a long run."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from metaray.config import load_config
from metaray.training.run_dir import RunDir


def table_write_speed(iterations: int = 2000, window: int = 21) -> dict[str, Any]:
    """Seconds to write one iteration's metrics and task rows near iteration 10 and near the
    last iteration of a long run: train()'s rows and write path into a temporary run
    directory, without Ray (the learner's results are synthetic). A ratio near 1 means the
    cost does not grow with the run's length."""
    from metaray.core import seeding
    from metaray.tasks import make_family
    from metaray.training.progress import FAULT_KEYS
    from metaray.training.run_dir import read_rows, write_rows
    from metaray.training.trainer import iteration_row, task_rows

    config = load_config("quickstart", [f"outer.iterations={iterations}"])
    family = make_family(config.task.family, config.task.options)
    n, rng = config.outer.meta_batch_size, np.random.default_rng(0)
    seconds: list[float] = []
    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(Path(tmp) / "run")
        run.prepare(config, overwrite=False)
        run.truncate_tables(0)
        for it in range(iterations):
            tasks = seeding.train_tasks(family, config.seed, it, n)
            out = {"tasks": [{"task_index": i, "worker": f"metaray-worker-{i % 2}@127.0.0.1",
                              "pre_return": float(rng.normal()), "post_return": float(rng.normal()),
                              "outer_loss": float(rng.normal()), "env_steps": 2000, "metric_env_steps": 2000,
                              "rejected": False, "sample_s": float(rng.random()), "adapt_s": float(rng.random())}
                             for i in range(n)],
                   "gather_s": 0.01, "outer_s": 0.1, "grad_norm": float(rng.random()), "trpo_kl": None,
                   "rejected_results": 0, "iteration_attempts": 1, **dict.fromkeys(FAULT_KEYS, 0)}
            row = iteration_row(it, out, 1.0, total)
            total = row["total_env_steps"]
            per_task = task_rows(it, out, tasks)
            start = time.perf_counter()
            run.append_iteration(it, row, per_task)
            seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        run.compact_tables()
        compact = time.perf_counter() - start
        metrics, task_table = run.read_metrics(), read_rows(run.tasks_path)
        assert [r["iteration"] for r in metrics] == list(range(iterations)) and len(task_table) == n * iterations
        start = time.perf_counter()  # what the last iteration cost when both tables were rewritten whole
        write_rows(run.metrics_path, metrics)
        write_rows(run.tasks_path, task_table)
        whole = time.perf_counter() - start
    early = statistics.median(seconds[max(0, 10 - window // 2): 10 + window // 2 + 1])
    late = statistics.median(seconds[-window:])
    half = iterations // 2
    return {
        "iterations": iterations, "metrics_columns": len(row), "task_rows_per_iteration": n,
        "task_columns": len(per_task[0]),
        "median_write_s_at_10": early, f"median_write_s_at_{iterations}": late, "ratio": late / early,
        # means include the occasional merge of part files: the amortized cost
        "mean_write_s_first_half": statistics.fmean(seconds[:half]),
        "mean_write_s_second_half": statistics.fmean(seconds[half:]),
        "max_write_s": max(seconds), "final_compaction_s": compact,
        f"whole_rewrite_s_at_{iterations}": whole,
    }
