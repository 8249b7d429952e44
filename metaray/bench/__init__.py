"""``metaray bench``: speed against the physical limit, measured in one process, one run.

Every figure is a ratio or a median taken in the same run on the same machine, so the
numbers compare with each other, not with another machine's. ``metaray bench --readme``
renders them into the README's Performance section (:mod:`metaray.bench.markdown`).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from metaray.bench.speed import (
    classic_sampling,
    group_sampling_speed,
    mujoco_sampling,
    training_speed,
    trial_steps_per_s,
    trpo_products,
)
from metaray.bench.tables import table_write_speed
from metaray.config import load_config
from metaray.core.policy import flatten
from metaray.core.task_worker import TaskWorker

__all__ = ["classic_sampling", "group_sampling_speed", "machine", "mujoco_sampling",
           "run_bench", "table_write_speed", "training_speed", "trial_steps_per_s", "trpo_products"]

REFERENCE = {
    "implementation": "pytorch-maml-rl (the MAML-TRPO reference implementation most papers compare with), its own "
                      "configs, one torch thread per process, 2 sampling workers",
    "measured": "once, on a machine of this kind (2 cores, quiet), when issue 15 was filed; bench does not re-run it "
                "(it needs its own environment)",
    "navigation2d_iteration_s": 4.97,
    "halfcheetah_vel_iteration_s": 15.4,
    "halfcheetah_vel_post_return_iterations_1_12": [-110.0, -87.0],
}
"""The reference implementation's figures on the same settings, for the ratios bench reports."""

HALFCHEETAH_VEL_REFERENCE_SETTINGS = [
    "rollout.horizon=100", "policy.hidden_sizes=[64,64]", "policy.activation=tanh", "policy.init=xavier",
    "policy.init_log_std=0", "outer.meta_batch_size=40", "inner.episodes=20", "resources.num_workers=2"]
"""The reference's HalfCheetahVel config: 40 tasks x 20 episodes x 100 steps x 2 batches = 160k steps, and
its policy's start (xavier, std 1), which sets how far the first episodes wander (and what they cost)."""


def machine() -> dict[str, Any]:
    """What the figures were measured on: they hold for this machine only."""
    model, memory = platform.processor() or platform.machine(), None
    cpuinfo, meminfo = Path("/proc/cpuinfo"), Path("/proc/meminfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    if meminfo.exists():
        total = [line.split()[1] for line in meminfo.read_text().splitlines() if line.startswith("MemTotal:")]
        memory = round(int(total[0]) / 2**20, 1) if total else None
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    import ray

    out = {"platform": platform.platform(), "processor": model, "cpus": os.cpu_count(), "memory_gib": memory,
           "avx512": " avx512f" in flags, "accelerator": None, "torch": torch.__version__, "ray": ray.__version__}
    try:
        import mujoco

        out["mujoco"] = mujoco.__version__
    except ImportError:
        out["mujoco"] = None
    return out


def run_bench(iterations: int = 7, warmup: int = 2, quick: bool = False) -> dict[str, Any]:
    from metaray.bench.scaling import run_scaling
    from metaray.runtime.cluster import ray_session

    short = [f"outer.iterations={iterations}", "eval.tasks=2", "eval.steps=1", "checkpoint.every=1000"]
    if quick:  # a smoke run of the benchmark itself: tiny budgets, figures meaningless
        short += ["outer.meta_batch_size=4", "inner.episodes=4"]
    maml = load_config("navigation2d-maml", short)
    reptile = load_config("cartpole-reptile", short)
    rl2 = load_config("navigation2d-rl2", short)
    cheetah = load_config("halfcheetah-vel", [*HALFCHEETAH_VEL_REFERENCE_SETTINGS, *short])
    ant = load_config("ant-dir", [*HALFCHEETAH_VEL_REFERENCE_SETTINGS, *short])
    seconds = 0.5 if quick else 2.0
    # TRPO's products on a curvature minibatch (outer.trpo.curvature_subsample), Baselines' every 5th;
    # --quick has 4 episodes a batch.
    every = 2 if quick else 5
    curvature = [f"outer.trpo.curvature_subsample={every}"]
    maml_minibatch = load_config("navigation2d-maml", [*short, *curvature])
    out: dict[str, Any] = {
        "machine": machine(),
        "settings": {"navigation2d_maml_trpo": "navigation2d-maml preset: meta-batch 20, 20 episodes per inner step, "
                     "horizon 100, one inner step, hidden 64x64 tanh, TRPO",
                     "cartpole_reptile": "cartpole-reptile preset",
                     "navigation2d_rl2": "navigation2d-rl2 preset: meta-batch 20, 20 trials of 2 episodes of 100 "
                     "steps per task, GRU 128, PPO 4 epochs x 2 minibatches",
                     "halfcheetah_vel_trpo": "the reference's HalfCheetahVel config on the halfcheetah-vel preset: "
                     "meta-batch 40, 20 episodes, horizon 100, one inner step, 64x64 tanh, TRPO (160k steps per "
                     "iteration)", "curvature_subsample": f"the *_curvature_subsample rows: the same settings with "
                     f"TRPO's Fisher-vector products on every k-th episode of each batch, k = {every} "
                     f"(outer.trpo.curvature_subsample={every}; the default, 1, is exact), so not the reference's "
                     "algorithm: no speed-up over it is reported",
                     "iterations": iterations, "warmup": warmup, "quick": quick},
        "reference": REFERENCE,
        "rollout": {},
    }
    torch.set_num_threads(1)
    for name, cfg in (("navigation2d", maml), ("cartpole", reptile)):
        out["rollout"][name] = classic_sampling(cfg, seconds)
    out["rollout"]["halfcheetah"] = mujoco_sampling(cheetah, "HalfCheetah-v5", seconds)
    out["rollout"]["ant"] = mujoco_sampling(ant, "Ant-v5", seconds)
    trials = trial_steps_per_s(rl2, seconds)
    out["rollout"]["navigation2d_rl2"] = {
        "parallel_trials": rl2.inner.episodes, "trial_steps_per_s": trials,
        "vs_mlp_rollout": trials / out["rollout"]["navigation2d"]["rollout_steps_per_s"]}
    # One worker's share of the paper settings' meta-batch (20 tasks over 2 workers).
    share = max(1, maml.outer.meta_batch_size // 2)
    out["sampling_groups"] = group_sampling_speed(maml, share, seconds)
    out["trpo_products"] = trpo_products(maml, share, repeats=3 if quick else 10)
    sub = trpo_products(maml_minibatch, share, repeats=3 if quick else 10)
    out["trpo_products"]["curvature_subsample"] = {
        "every": every, "first_cg_round_s": sub["first_cg_round_s"], "cg_round_s": sub["cg_round_s"],
        "cg_round_vs_exact": sub["cg_round_s"] / out["trpo_products"]["cg_round_s"]}
    with ray_session(None, 2):
        out["navigation2d_maml_trpo"] = training_speed(maml, iterations, warmup)
        out["cartpole_reptile"] = training_speed(reptile, iterations, warmup)
        out["navigation2d_rl2"] = training_speed(rl2, iterations, warmup)
        out["halfcheetah_vel_trpo"] = training_speed(cheetah, iterations, warmup)
        out["navigation2d_maml_trpo_curvature_subsample"] = training_speed(maml_minibatch, iterations, warmup)
        out["halfcheetah_vel_trpo_curvature_subsample"] = training_speed(
            load_config("halfcheetah-vel", [*HALFCHEETAH_VEL_REFERENCE_SETTINGS, *short, *curvature]), iterations,
            warmup)
        one = training_speed(load_config("navigation2d-maml", [*short, "resources.num_workers=1"]), iterations, warmup)
    two = out["navigation2d_maml_trpo"]["train_steps_per_s"]
    out["workers_scaling"] = {"setting": "navigation2d_maml_trpo", "1": one["train_steps_per_s"], "2": two,
                              "speedup": two / one["train_steps_per_s"]}
    out["vs_reference"] = {
        "navigation2d_speedup": REFERENCE["navigation2d_iteration_s"] / out["navigation2d_maml_trpo"]["iteration_s"],
        "halfcheetah_vel_speedup": REFERENCE["halfcheetah_vel_iteration_s"]
        / out["halfcheetah_vel_trpo"]["iteration_s"]}
    # A three-node cluster takes half a minute to start: --quick leaves it to tests/test_bench_scaling.py.
    out["scaling"] = {"skipped": "quick run"} if quick else run_scaling()
    out["parameters"] = int(flatten(TaskWorker(maml).template).numel())
    out["table_writes"] = table_write_speed(iterations=60 if quick else 2000)
    return out
