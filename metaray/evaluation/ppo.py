"""What a user would do without meta-learning: RLlib's PPO from scratch on each held-out task.

The figure that matters is sample efficiency: how many env steps PPO needs to reach the
return metaray's meta-policy reaches after K adaptation steps on the same task, against
the env steps those K steps sampled. PPO's batch is one metaray batch (inner.episodes x
horizon); its other settings are RLlib's PPO defaults with lr 3e-4, 10 epochs, minibatch 256.
Needs the ``rllib`` extra (``ray[rllib]``).
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import ray

from metaray.config import Config, ConfigError
from metaray.core import seeding
from metaray.tasks import Task


def _steps_to_target(config: dict[str, Any], task: Task, target: float, budget: int, seed: int) -> dict[str, Any]:
    """Train PPO on one task until its mean episode return reaches ``target`` or ``budget`` steps pass."""
    import gymnasium as gym
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.tune.registry import register_env

    from metaray.config import validate
    from metaray.tasks import make_family

    cfg = validate(config)
    family = make_family(cfg.task.family, cfg.task.options)
    env_name = f"metaray-task-{seed}"
    register_env(env_name, lambda _: gym.wrappers.TimeLimit(family.make_env(task), cfg.rollout.horizon))
    batch = cfg.inner.episodes * cfg.rollout.horizon
    algo = (PPOConfig().environment(env_name)
            .env_runners(num_env_runners=0, rollout_fragment_length="auto")
            .training(train_batch_size_per_learner=batch, minibatch_size=min(256, batch), num_epochs=10, lr=3e-4,
                      gamma=cfg.rollout.gamma)
            .learners(num_learners=0)
            .reporting(metrics_num_episodes_for_smoothing=cfg.inner.episodes)
            .debugging(seed=seed)).build_algo()
    curve: list[tuple[int, float]] = []
    reached = None
    try:
        while not curve or curve[-1][0] < budget:
            result = algo.train()
            steps = int(result["num_env_steps_sampled_lifetime"])
            ret = float(result["env_runners"].get("episode_return_mean", float("nan")))
            curve.append((steps, ret))
            if ret >= target:
                reached = steps
                break
    finally:
        algo.stop()
    return {"target_return": target, "reached": reached is not None, "env_steps_to_target": reached,
            "final_return": curve[-1][1], "env_steps": curve[-1][0], "curve": curve}


def ppo_baseline(config: Config, tasks: list[Task], targets: list[float], adapt_steps: list[int], budget: int,
                 seed: int) -> dict[str, Any]:
    """PPO from scratch on each task (one Ray task each); summary plus per-task rows."""
    try:  # the rllib extra is optional; ray ships the package without its dependencies
        importlib.import_module("ray.rllib.algorithms.ppo")
    except ImportError as err:
        raise ConfigError(f"--baselines ppo needs RLlib ({err}): pip install 'metaray[rllib]'") from None
    run = ray.remote(num_cpus=1)(_steps_to_target)
    dumped = config.model_dump(mode="json")
    per_task = ray.get([
        run.remote(dumped, task, target, budget, int(seeding.eval_episode_seed(seed, i).generate_state(1)[0]))
        for i, (task, target) in enumerate(zip(tasks, targets))
    ])
    reached = [r["env_steps_to_target"] for r in per_task if r["reached"]]
    # Tasks PPO never solved count at the budget: the ratio is then a lower bound.
    needed = [r["env_steps_to_target"] if r["reached"] else budget for r in per_task]
    metaray_steps = float(np.median(adapt_steps))
    return {
        "tasks": len(per_task),
        "budget_env_steps": budget,
        "reached": len(reached),
        "median_env_steps_to_target": float(np.median(needed)),
        "metaray_adaptation_env_steps": metaray_steps,
        "sample_efficiency_ratio": float(np.median(needed)) / metaray_steps if metaray_steps else None,
        "ratio_is_lower_bound": len(reached) < len(per_task),
        "per_task": [{k: v for k, v in r.items() if k != "curve"} for r in per_task],
        "curves": [r["curve"] for r in per_task],
    }
