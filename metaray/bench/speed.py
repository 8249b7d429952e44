"""Single-process speed figures: sampling against its physical limit, TRPO's products
against their arithmetic, and real training runs' phase breakdown (on the connected Ray)."""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaray.config import Config
from metaray.core.policy import flatten
from metaray.core.task_worker import Batch, TaskWorker
from metaray.runtime.learner import task_groups
from metaray.training.run_dir import RunDir

Meter = Callable[[float], tuple[int, float]]
"""Measures for about ``seconds`` (at least one whole batch): (env steps done, seconds taken). Made
once, so its set-up (envs, policy, model) is outside every measurement."""


def _run_for(seconds: float, step: Callable[[], int]) -> tuple[int, float]:
    """``step`` (one batch, returning its env steps) until ``seconds`` have passed: whole batches,
    so a rate never counts part of one."""
    steps, start = 0, time.perf_counter()
    while True:
        steps += step()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return steps, elapsed


def interleaved(meters: dict[str, Meter], seconds: float, rounds: int = 3) -> dict[str, dict[str, Any]]:
    """Each meter for ``seconds`` in all, in ``rounds`` turns taken in rotation: a shared VM's speed
    drifts over seconds, and in rotation the drift falls on every meter alike, so their ratios
    measure the code rather than when each ran. Per meter: the total rate and each turn's."""
    taken: dict[str, list[tuple[int, float]]] = {name: [] for name in meters}
    for _ in range(rounds):
        for name, meter in meters.items():
            taken[name].append(meter(seconds / rounds))
    return {name: {"steps_per_s": sum(n for n, _ in turns) / sum(t for _, t in turns),
                   "turns_steps_per_s": [n / t for n, t in turns]} for name, turns in taken.items()}


def _ratios(figures: dict[str, dict[str, Any]], of: str, to: str) -> list[float]:
    """Turn by turn, ``of``'s rate over ``to``'s (the spread the total ratio hides)."""
    return [a / b for a, b in zip(figures[of]["turns_steps_per_s"], figures[to]["turns_steps_per_s"])]


def mj_step_meter(env_id: str, horizon: int = 100) -> Meter:
    """The physics alone: one MjData stepped with the env's frame skip under uniform random
    controls (drawn beforehand), reset every ``horizon`` steps; no observation, reward,
    policy or reset noise. What a MuJoCo sampler on one core could at best approach."""
    import gymnasium as gym
    import mujoco

    from metaray.tasks.mujoco_batched import Physics

    env = gym.make(env_id)
    physics = Physics.from_env(env)
    env.close()
    m, frame_skip = physics.model, physics.frame_skip
    d = mujoco.MjData(m)
    low, high = m.actuator_ctrlrange.T
    controls = itertools.cycle(np.random.default_rng(0).uniform(low, high, size=(8, horizon, m.nu)))

    def episode() -> int:
        mujoco.mj_resetData(m, d)
        for control in next(controls):
            d.ctrl[:] = control
            mujoco.mj_step(m, d, frame_skip)
        return horizon

    return lambda seconds: _run_for(seconds, episode)


def limit_meter(config: Config) -> Meter:
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

    @torch.no_grad()
    def episodes() -> int:
        steps = 0
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
        return steps

    return lambda seconds: _run_for(seconds, episodes)


def classic_sampling(config: Config, seconds: float = 2.0) -> dict[str, Any]:
    """The worker's sampling path on a classic family against its limit, measured interleaved."""
    f = interleaved({"limit": limit_meter(config), "rollout": group_meter(config, 1, 1)}, seconds)
    limit, rollout = f["limit"]["steps_per_s"], f["rollout"]["steps_per_s"]
    return {"parallel_episodes": config.inner.episodes, "limit_steps_per_s": limit, "rollout_steps_per_s": rollout,
            "rollout_vs_limit": rollout / limit, "rollout_vs_limit_turns": _ratios(f, "rollout", "limit")}


def trial_steps_per_s(config: Config, seconds: float = 2.0) -> float:
    """RL²'s sampling path (trials of ``rl2.episodes_per_trial`` episodes, one recurrent step
    per time step for all of a task's trials, GAE), no learning, no Ray."""
    from metaray.core.trial_worker import sample_trials

    runner = TaskWorker(config)
    task = runner.family.sample_tasks(1, np.random.default_rng(0))[0]
    flat, rng = flatten(runner.template).numpy(), np.random.default_rng(0)

    def trials() -> int:
        (sampled,), _ = sample_trials(runner, flat, [(0, task, rng)], config.rl2.episodes_per_trial)
        return sampled.steps

    steps, elapsed = _run_for(seconds, trials)
    return steps / elapsed


def group_meter(config: Config, tasks: int, size: int) -> Meter:
    """The worker's real sampling path (episodes, buffers, baseline, advantages; no Ray) on ``tasks``
    tasks, ``size`` of them in each policy forward: one task's batch with (1, 1), a worker's share."""
    runner = TaskWorker(config)
    jobs = [(task, np.random.default_rng(i)) for i, task in
            enumerate(runner.family.sample_tasks(tasks, np.random.default_rng(0)))]
    envs = [runner.make_envs(task) for task, _ in jobs]

    def share() -> int:
        batches = [Batch(env, rng, i // size) for i, (env, (_, rng)) in enumerate(zip(envs, jobs))]
        runner.sample([runner.template] * tasks, batches)
        return sum(b.episodes.steps for b in batches)

    return lambda seconds: _run_for(seconds, share)


def group_sampling_speed(config: Config, tasks: int, seconds: float = 2.0) -> dict[str, Any]:
    """The cost of fixed sampling groups (see README, Reproducibility): one worker's share of
    ``tasks`` tasks sampled together, with every task in one policy forward per step (how
    earlier versions sampled, results depending on the share), in groups of the config's
    ``rollout.task_group_size``, and one task per forward. No Ray."""
    sizes = {"one_forward_for_all": tasks, "task_group_size": config.rollout.task_group_size, "one_task_per_forward": 1}
    f = interleaved({name: group_meter(config, tasks, size) for name, size in sizes.items()}, seconds)
    out: dict[str, Any] = {"tasks": tasks, "parallel_episodes": config.inner.episodes}
    out.update({f"{name}_steps_per_s": f[name]["steps_per_s"] for name in sizes})
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


def mujoco_sampling(config: Config, env_id: str, seconds: float = 2.0) -> dict[str, Any]:
    """The worker's sampling path on a MuJoCo family against the physics alone: a plain
    ``mj_step`` loop on one core with the env's frame skip (no observation, reward or policy),
    measured interleaved."""
    from metaray.runtime.learner import split_calls

    groups = task_groups(config.outer.meta_batch_size, config.rollout.task_group_size)
    share = max(map(len, split_calls(groups, config.resources.num_workers, config.resources.batch_tasks)))
    f = interleaved({"limit": mj_step_meter(env_id, horizon=config.rollout.horizon),
                     "rollout": group_meter(config, 1, 1),
                     # As training samples: a worker's share of the meta-batch stepped together, a policy
                     # forward per task group (one task alone pays a whole forward per step by itself).
                     "share": group_meter(config, share, config.rollout.task_group_size)}, seconds)
    limit, rollout, worker = (f[k]["steps_per_s"] for k in ("limit", "rollout", "share"))
    return {"env": env_id, "parallel_episodes": config.inner.episodes, "mj_step_limit_steps_per_s": limit,
            "rollout_steps_per_s": rollout, "rollout_vs_limit": rollout / limit,
            "rollout_vs_limit_turns": _ratios(f, "rollout", "limit"),
            "worker_share_tasks": share, "task_group_size": config.rollout.task_group_size,
            "worker_share_steps_per_s": worker, "worker_share_vs_limit": worker / limit,
            "worker_share_vs_limit_turns": _ratios(f, "share", "limit")}


def _best_s(fn: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _matmul_gflops(rows: int, width: int, repeats: int = 30) -> float:
    """This core's rate on the products' largest matrix shape: the floor's yardstick."""
    a, w = torch.randn(rows, width), torch.randn(width, width)
    return 2 * rows * width * width / _best_s(lambda: a @ w, repeats) / 1e9


def trpo_products(config: Config, tasks: int, repeats: int = 10) -> dict[str, Any]:
    """What one conjugate-gradient round and one line-search round cost a worker holding
    ``tasks`` tasks, a group's computed together (in process, no Ray), against their arithmetic floor: the FLOPs of the
    matrix products an exact product needs at minimum (R-op: 3 per layer forward and back
    for each inner Hessian, Gauss-Newton Fisher: 2 per layer, the first layer's input
    terms dropped), at the rate this core reaches on the largest layer's shape."""
    torch.set_num_threads(1)
    runner = TaskWorker(config)
    flat = flatten(runner.template).numpy()
    rng = np.random.default_rng(0)
    jobs = [(i, task, np.random.SeedSequence(i)) for i, task in enumerate(runner.family.sample_tasks(tasks, rng))]
    v = rng.standard_normal(flat.size).astype(np.float32)
    candidate = flat + 1e-3 * v
    groups = task_groups(tasks, config.rollout.task_group_size)
    for iteration in (0, 1):  # the first iteration warms up (allocations, first calls); measure the second
        runner.run_tasks(flat, jobs, iteration)
        hvp = lambda it=iteration: [runner.answer_sum(it, g, "hvp", flat, v) for g in groups]  # noqa: E731
        first = _best_s(hvp, 1)  # builds what the later rounds reuse
    loss_kl = lambda: [runner.answer_sum(1, g, "loss_kl", candidate) for g in groups]  # noqa: E731
    cg_round, ls_round = _best_s(hvp, repeats), _best_s(loss_kl, repeats)
    samples = config.rollout.horizon * config.inner.episodes
    shapes = [(m.in_features, m.out_features) for m in runner.policy.modules() if isinstance(m, torch.nn.Linear)]
    mm = [2 * samples * i * o for i, o in shapes]  # one [samples x in] @ [in x out]
    hessian = sum(6 * f for f in mm) - 3 * mm[0]  # R-forward 2, R-backward 4; none needs the input's tangent
    fisher = sum(4 * f for f in mm) - 2 * mm[0]
    grad = sum(3 * f for f in mm) - mm[0]  # forward, backward (no input gradient)
    steps = config.inner.steps
    rate = _matmul_gflops(samples, max(max(s) for s in shapes)) * 1e9
    hvp_floor = tasks * (2 * steps * hessian + fisher) / rate
    ls_floor = tasks * (steps * grad + 2 * sum(mm)) / rate  # adapt at the candidate, then loss and KL
    return {"tasks": tasks, "samples_per_batch": samples, "matmul_gflops": rate / 1e9,
            "first_cg_round_s": first, "cg_round_s": cg_round, "cg_round_floor_s": hvp_floor,
            "cg_round_vs_floor": cg_round / hvp_floor, "line_search_round_s": ls_round,
            "line_search_round_floor_s": ls_floor, "line_search_round_vs_floor": ls_round / ls_floor}
