"""Run in a subprocess by test_determinism.py, so each kernel path is forced from process start.

For each torch thread count given, every family/algorithm of CASES runs the same 7 tasks as
1, 2 and 3 workers would get them (the learner's own split into whole groups, a fresh
TaskWorker per worker), plus each group alone (a failover re-run), TRPO's answers per group
included, and prints one JSON line:
{"capability": ..., "threads": {t: {case: {arrangement: sha256 of every result}}}}.
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import torch

from metaray.config import load_config
from metaray.core.policy import flatten
from metaray.core.seeding import train_episode_seed, train_tasks
from metaray.core.task_worker import TaskWorker
from metaray.runtime.learner import split_calls, task_groups

CASES = {"navigation2d-maml": ["task.family=navigation2d", "algorithm=maml"],
         "cartpole-reptile": ["task.family=cartpole", "algorithm=reptile", "outer.optimizer=sgd",
                              "outer.reptile.post_batch=true"],
         "bandit-fomaml": ["task.family=bandit", "algorithm=fomaml"],
         # TRPO's worker half: each group's products and line-search losses, computed together
         "cartpole-maml-trpo-minibatch": ["task.family=cartpole", "algorithm=maml", "outer.optimizer=trpo",
                                          "outer.trpo.curvature_subsample=2"]}
TASKS, ITERATION = 7, 3


def _digest(results, answers: dict[int, list[np.ndarray]]) -> str:
    h = hashlib.sha256()
    for r in sorted(results, key=lambda r: r.task_index):
        h.update(np.ascontiguousarray(r.vector).tobytes())
        h.update(np.array([r.pre_return, r.post_return, r.outer_loss, r.env_steps], dtype=np.float64).tobytes())
    for group in sorted(answers):
        for answer in answers[group]:
            h.update(np.ascontiguousarray(answer).tobytes())
    return h.hexdigest()


def _run(cfg, flat: np.ndarray, jobs: dict, groups: list[list[int]], call: list[int], results: list,
         answers: dict[int, list[np.ndarray]]) -> None:
    """One worker's call; for TRPO, then its groups' answers to a product and a line-search request."""
    worker = TaskWorker(cfg)
    results += worker.run_tasks(flat, [jobs[i] for i in call], ITERATION)
    if cfg.outer.optimizer != "trpo":
        return
    v = np.random.default_rng(0).standard_normal(flat.size).astype(np.float32)
    for group in (g for g in groups if g[0] in call):
        answers[group[0]] = [worker.answer_sum(ITERATION, group, "hvp", flat, v),
                             worker.answer_sum(ITERATION, group, "loss_kl", flat + 0.01 * v)]


def run_case(overrides: list[str]) -> dict[str, str]:
    cfg = load_config("quickstart", [*overrides, "inner.steps=2", "inner.episodes=5", "rollout.horizon=25",
                                     "rollout.task_group_size=2"])
    probe = TaskWorker(cfg)
    flat = flatten(probe.template).numpy()
    tasks = train_tasks(probe.family, cfg.seed, ITERATION, TASKS)
    jobs = {i: (i, task, train_episode_seed(cfg.seed, ITERATION, i)) for i, task in enumerate(tasks)}
    groups = task_groups(TASKS, cfg.rollout.task_group_size)
    out = {}
    for workers in (1, 2, 3):
        results, answers = [], {}
        for call in split_calls(groups, workers, batch_tasks=True):
            _run(cfg, flat, jobs, groups, call, results, answers)
        out[f"{workers} workers"] = _digest(results, answers)
    results, answers = [], {}
    for group in groups:
        _run(cfg, flat, jobs, groups, group, results, answers)
    out["each group alone"] = _digest(results, answers)
    return out


def main() -> None:
    report = {"capability": torch.backends.cpu.get_cpu_capability(), "threads": {}}
    for threads in map(int, sys.argv[1:]):
        torch.set_num_threads(threads)
        report["threads"][threads] = {name: run_case(overrides) for name, overrides in CASES.items()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
