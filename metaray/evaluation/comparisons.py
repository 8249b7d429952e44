"""The baselines a meta-learned policy is judged against, on the same held-out tasks.

- random: the policy metaray started from (seeded from the config), adapted the same way.
- pretrained: one policy trained jointly on all training tasks with no adaptation in its
  objective (``algorithm: pretrain``), with the run's budget (iterations, tasks, episodes),
  then adapted the same way; for RL², the same recurrent policy and PPO with its memory
  off (``rl2.memory: false``). It is trained once into RUN_DIR/baselines/pretrained and
  reused (or resumed, if a previous attempt was interrupted).
- ppo: RLlib's PPO from scratch on each held-out task (see metaray.evaluation.ppo).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from metaray.algorithms.base import resolve_algorithm
from metaray.config import Config, ConfigError
from metaray.core.policy import flatten
from metaray.core.task_worker import TaskWorker
from metaray.evaluation.evaluate import EvalResult
from metaray.training.progress import Progress
from metaray.training.run_dir import RunDir
from metaray.training.trainer import eval_policies, train

NAMES = ("random", "pretrained", "ppo")
DEFAULT = ("random", "pretrained")


def parse_names(value: str) -> list[str]:
    """``random,pretrained,ppo`` (or ``all``) -> names in canonical order; ConfigError otherwise."""
    names = {n.strip() for n in value.split(",") if n.strip()}
    if "all" in names:
        names = (names - {"all"}) | set(NAMES)
    unknown = sorted(names - set(NAMES))
    if unknown or not names:
        raise ConfigError(f"--baselines {value!r}: unknown baseline {', '.join(unknown) or '(none)'}; "
                          f"allowed: {', '.join(NAMES)} or all, comma-separated")
    return [n for n in NAMES if n in names]


def random_params(config: Config) -> np.ndarray:
    return flatten(TaskWorker(config).template).numpy()


def pretrain_config(config: Config) -> Config:
    """The run's config with nothing learnt to adapt, same budget, same optimizer: the
    pretrain objective for the gradient-based algorithms, the memoryless policy for RL²."""
    return resolve_algorithm(config.algorithm).no_adaptation(config)


def pretrained_params(config: Config, run: RunDir, progress: Progress) -> tuple[np.ndarray, str]:
    """Train (or reuse, or finish) the pretrained baseline of ``run``; its final params."""
    base = run.child("baselines", "pretrained")
    cfg = pretrain_config(config)
    files = base.checkpoint_files() if base.config_path.is_file() else []
    if files:
        if base.load_config() != cfg:
            raise ConfigError(f"{base.where} was trained with another config than "
                              f"{run.shown(str(run.config_path))} implies; delete it to train the pretrained "
                              "baseline again")
        checkpoint = base.latest_checkpoint()
        if checkpoint["iteration"] >= cfg.outer.iterations:
            progress.message(f"pretrained baseline: reusing {base.where}")
            return checkpoint["params"].numpy(), base.where
        progress.message(f"pretrained baseline: resuming {base.where} at iteration {checkpoint['iteration']}")
        return train(cfg, base, progress=progress, resume=True)["params"], base.where
    progress.message(f"pretrained baseline: training algorithm pretrain with the run's budget into {base.where}")
    base.prepare(cfg, overwrite=True)
    return train(cfg, base, progress=progress)["params"], base.where


def evaluate_with_baselines(
    config: Config, run: RunDir, params: np.ndarray, names: list[str], tasks: int, steps: int, seed: int,
    progress: Progress, ppo_budget: int, ppo_tasks: int | None,
) -> tuple[dict[str, EvalResult], dict[str, Any], list[dict[str, Any]]]:
    """The meta-policy and the named baselines on the same held-out tasks.

    Returns the adaptation curves by policy, the baselines' JSON summary, and the PPO rows
    for eval.parquet. Pretraining runs first, then one worker pool evaluates every
    policy (RL²'s memoryless baseline in a pool of its own config), then (its workers
    gone) PPO gets the cluster's CPUs.
    """
    policies = {"metaray": params}
    summary: dict[str, Any] = {}
    if "random" in names:
        policies["random"] = random_params(config)
    if "pretrained" in names:
        policies["pretrained"], path = pretrained_params(config, run, progress)
        summary["pretrained"] = {"run_dir": str(path)}
    own = {}  # a baseline whose policy is not the run's (RL² without memory) runs as it was trained
    if "pretrained" in policies and resolve_algorithm(config.algorithm).memory_based:
        own["pretrained"] = policies.pop("pretrained")
    results = eval_policies(config, policies, tasks, steps, seed)
    if own:  # the same held-out tasks and episode seeds: both come from ``seed`` alone
        results.update(eval_policies(pretrain_config(config), own, tasks, steps, seed))
        policies.update(own)
    for name in policies.keys() - {"metaray"}:
        summary[name] = {**results[name].to_json(), **summary.get(name, {})}
    rows: list[dict[str, Any]] = []
    if "ppo" in names:
        from metaray.evaluation.ppo import ppo_baseline

        meta, n = results["metaray"], min(tasks, ppo_tasks or tasks)
        progress.message(f"ppo baseline: RLlib PPO from scratch on {n} held-out tasks, up to {ppo_budget} env "
                         f"steps each")
        ppo = ppo_baseline(config, meta.tasks[:n], meta.returns[:n, steps].tolist(),
                           meta.env_steps[:n, :steps].sum(1).tolist(), ppo_budget, seed)
        summary["ppo"] = {k: v for k, v in ppo.items() if k != "curves"}
        rows = [{"policy": "ppo", "task_index": i, "task": None, "adaptation_steps": None,
                 "return": r["final_return"], "env_steps": r["env_steps_to_target"],
                 "target_return": r["target_return"]} for i, r in enumerate(ppo["per_task"])]
    return results, {n: summary[n] for n in NAMES if n in summary}, rows
