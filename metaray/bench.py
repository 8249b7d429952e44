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
from metaray.core.task_worker import EpisodeLoss, TaskRunner
from metaray.training.run_dir import RunDir


def limit_steps_per_s(config: Config, seconds: float = 2.0) -> float:
    """Batched dynamics plus one batched policy forward and action draw per step: no
    learning, no buffers, no Ray. Nothing the rollout does could be faster than this."""
    runner = TaskRunner(config)
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
    runner = TaskRunner(config)
    task = runner.family.sample_tasks(1, np.random.default_rng(0))[0]
    env = runner.make_envs(task)
    rng = np.random.default_rng(0)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        steps += EpisodeLoss(runner, env, rng).sample(runner.template).steps
    return steps / (time.perf_counter() - start)


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


def run_bench(iterations: int = 7, warmup: int = 2, quick: bool = False) -> dict[str, Any]:
    import os

    import ray

    from metaray.runtime.cluster import ray_session

    short = [f"outer.iterations={iterations}", "eval.tasks=2", "eval.steps=1", "checkpoint.every=1000"]
    if quick:  # a smoke run of the benchmark itself: tiny budgets, figures meaningless
        short += ["outer.meta_batch_size=4", "inner.episodes=4"]
    maml = load_config("navigation2d-maml", short)
    reptile = load_config("cartpole-reptile", short)
    out: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__},
        "settings": {"navigation2d_maml_trpo": "navigation2d-maml preset: meta-batch 20, 20 episodes per inner step, "
                     "horizon 100, one inner step, hidden 64x64, TRPO", "cartpole_reptile": "cartpole-reptile preset",
                     "iterations": iterations, "warmup": warmup},
        "rollout": {},
    }
    torch.set_num_threads(1)
    for name, cfg in (("navigation2d", maml), ("cartpole", reptile)):
        limit, rollout = limit_steps_per_s(cfg), rollout_steps_per_s(cfg)
        out["rollout"][name] = {"parallel_episodes": cfg.inner.episodes, "limit_steps_per_s": limit,
                                "rollout_steps_per_s": rollout, "rollout_vs_limit": rollout / limit}
    with ray_session(None, 2):
        out["navigation2d_maml_trpo"] = training_speed(maml, iterations, warmup)
        out["cartpole_reptile"] = training_speed(reptile, iterations, warmup)
        one = training_speed(load_config("navigation2d-maml", [*short, "resources.num_workers=1"]), iterations, warmup)
    two = out["navigation2d_maml_trpo"]["train_steps_per_s"]
    out["workers_scaling"] = {"setting": "navigation2d_maml_trpo", "1": one["train_steps_per_s"], "2": two,
                              "speedup": two / one["train_steps_per_s"]}
    out["parameters"] = int(flatten(TaskRunner(maml).template).numel())
    return out
