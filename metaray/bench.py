"""``metaray bench``: speed against the physical limit, measured in one process, one run.

Every figure is a ratio or a median taken in the same run on the same machine, so the
numbers compare with each other, not with another machine's.
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaray.config import Config, load_config
from metaray.core.policy import flatten
from metaray.core.task_worker import Batch, TaskWorker
from metaray.training.run_dir import RunDir


def limit_steps_per_s(config: Config, seconds: float = 2.0) -> float:
    """Batched dynamics plus one batched policy forward and action draw per step: no
    learning, no buffers, no Ray. Nothing the rollout does could be faster than this."""
    runner = TaskWorker(config)
    task = runner.family.sample_tasks(1, np.random.default_rng(0))[0]
    env = runner.make_envs(task)
    spec = runner.spec
    forward = runner.policy.sampler([runner.template])  # the fastest forward there is
    std = None if spec.discrete else runner.template["log_std"].exp()
    gen = torch.Generator().manual_seed(0)
    n, horizon = env.num_envs, config.rollout.horizon
    steps, start = 0, time.perf_counter()
    with torch.no_grad():
        while time.perf_counter() - start < seconds:
            obs = spec.encode_obs(env.reset(list(range(n))))
            alive = np.ones(n, dtype=bool)
            for _ in range(horizon):
                out = forward(torch.from_numpy(obs).unsqueeze(0))[0]
                if spec.discrete:
                    action = torch.multinomial(torch.softmax(out, -1), 1, generator=gen).squeeze(-1).numpy()
                else:
                    action = (out + std * torch.randn(out.shape, generator=gen)).numpy()
                raw, _, done = env.step(action, alive)
                steps += int(alive.sum())
                alive &= ~done
                obs = spec.encode_obs(raw)
                if not alive.any():
                    break
    return steps / (time.perf_counter() - start)


def rollout_steps_per_s(config: Config, seconds: float = 2.0) -> float:
    """The worker's real sampling path (episodes, buffers, baseline, advantages), no Ray."""
    runner = TaskWorker(config)
    task = runner.family.sample_tasks(1, np.random.default_rng(0))[0]
    env = runner.make_envs(task)
    rng = np.random.default_rng(0)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = Batch(env, rng)
        runner.sample([runner.template], [batch])
        steps += batch.episodes.steps
    return steps / (time.perf_counter() - start)


def trial_steps_per_s(config: Config, seconds: float = 2.0) -> float:
    """RL²'s sampling path (trials of ``rl2.episodes_per_trial`` episodes, one recurrent step
    per time step for all of a task's trials, GAE), no learning, no Ray."""
    from metaray.core.trial_worker import sample_trials

    runner = TaskWorker(config)
    task = runner.family.sample_tasks(1, np.random.default_rng(0))[0]
    flat, rng = flatten(runner.template).numpy(), np.random.default_rng(0)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        (trials,), _ = sample_trials(runner, flat, [(0, task, rng)], config.rl2.episodes_per_trial)
        steps += trials.steps
    return steps / (time.perf_counter() - start)


def group_sampling_speed(config: Config, tasks: int, seconds: float = 2.0) -> dict[str, Any]:
    """The cost of fixed sampling groups (see README, Reproducibility): one worker's share of
    ``tasks`` tasks sampled together, with every task in one policy forward per step (how
    earlier versions sampled, results depending on the share), in groups of the config's
    ``rollout.task_group_size``, and one task per forward. No Ray."""
    runner = TaskWorker(config)
    jobs = [(task, np.random.default_rng(i)) for i, task in
            enumerate(runner.family.sample_tasks(tasks, np.random.default_rng(0)))]
    envs = [runner.make_envs(task) for task, _ in jobs]
    out: dict[str, Any] = {"tasks": tasks, "parallel_episodes": config.inner.episodes}
    sizes = {"one_forward_for_all": tasks, "task_group_size": config.rollout.task_group_size, "one_task_per_forward": 1}
    for name, size in sizes.items():
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            batches = [Batch(env, rng, i // size) for i, (env, (_, rng)) in enumerate(zip(envs, jobs))]
            runner.sample([runner.template] * tasks, batches)
            steps += sum(b.episodes.steps for b in batches)
        out[f"{name}_steps_per_s"] = steps / (time.perf_counter() - start)
    out["task_group_size"] = config.rollout.task_group_size
    out["groups_vs_one_forward"] = out["task_group_size_steps_per_s"] / out["one_forward_for_all_steps_per_s"]
    return out


def training_speed(config: Config, iterations: int, warmup: int) -> dict[str, Any]:
    """Median iteration time and phase breakdown of a real run on the connected Ray."""
    from metaray.training.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(Path(tmp) / "run")
        run.prepare(config, overwrite=False)
        rows = train(config, run, log=lambda _: None)["rows"][warmup:]
    workers = config.resources.num_workers
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    iteration = med("time_iteration_s")
    sampling = statistics.median(r["time_sample_s"] / workers for r in rows)
    adaptation = statistics.median(r["time_adapt_s"] / workers for r in rows)
    outer = med("time_outer_s")
    overhead = statistics.median(
        r["time_iteration_s"] - (r["time_sample_s"] + r["time_adapt_s"]) / workers - r["time_outer_s"] for r in rows)
    return {
        "iterations_measured": len(rows),
        "iteration_s": iteration,
        "train_steps_per_s": statistics.median(r["env_steps"] / r["time_iteration_s"] for r in rows),
        "phase_s": {
            "sampling": sampling,
            "adaptation_and_meta_gradient": adaptation,
            "outer_step": outer,
            "ray_overhead": overhead,
        },
        "ray_overhead_fraction": overhead / iteration,
    }


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


def run_bench(iterations: int = 7, warmup: int = 2, quick: bool = False) -> dict[str, Any]:
    import os

    import ray

    from metaray.runtime.cluster import ray_session

    short = [f"outer.iterations={iterations}", "eval.tasks=2", "eval.steps=1", "checkpoint.every=1000"]
    if quick:  # a smoke run of the benchmark itself: tiny budgets, figures meaningless
        short += ["outer.meta_batch_size=4", "inner.episodes=4"]
    maml = load_config("navigation2d-maml", short)
    reptile = load_config("cartpole-reptile", short)
    rl2 = load_config("navigation2d-rl2", short)
    out: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__},
        "settings": {"navigation2d_maml_trpo": "navigation2d-maml preset: meta-batch 20, 20 episodes per inner step, "
                     "horizon 100, one inner step, hidden 64x64, TRPO", "cartpole_reptile": "cartpole-reptile preset",
                     "navigation2d_rl2": "navigation2d-rl2 preset: meta-batch 20, 20 trials of 2 episodes of 100 "
                     "steps per task, GRU 128, PPO 4 epochs x 2 minibatches",
                     "iterations": iterations, "warmup": warmup},
        "rollout": {},
    }
    torch.set_num_threads(1)
    for name, cfg in (("navigation2d", maml), ("cartpole", reptile)):
        limit, rollout = limit_steps_per_s(cfg), rollout_steps_per_s(cfg)
        out["rollout"][name] = {"parallel_episodes": cfg.inner.episodes, "limit_steps_per_s": limit,
                                "rollout_steps_per_s": rollout, "rollout_vs_limit": rollout / limit}
    trials = trial_steps_per_s(rl2)
    out["rollout"]["navigation2d_rl2"] = {
        "parallel_trials": rl2.inner.episodes, "trial_steps_per_s": trials,
        "vs_mlp_rollout": trials / out["rollout"]["navigation2d"]["rollout_steps_per_s"]}
    # One worker's share of the paper settings' meta-batch (20 tasks over 2 workers).
    out["sampling_groups"] = group_sampling_speed(maml, max(1, maml.outer.meta_batch_size // 2))
    with ray_session(None, 2):
        out["navigation2d_maml_trpo"] = training_speed(maml, iterations, warmup)
        out["cartpole_reptile"] = training_speed(reptile, iterations, warmup)
        out["navigation2d_rl2"] = training_speed(rl2, iterations, warmup)
        one = training_speed(load_config("navigation2d-maml", [*short, "resources.num_workers=1"]), iterations, warmup)
    two = out["navigation2d_maml_trpo"]["train_steps_per_s"]
    out["workers_scaling"] = {"setting": "navigation2d_maml_trpo", "1": one["train_steps_per_s"], "2": two,
                              "speedup": two / one["train_steps_per_s"]}
    out["parameters"] = int(flatten(TaskWorker(maml).template).numel())
    out["table_writes"] = table_write_speed(iterations=60 if quick else 2000)
    return out
