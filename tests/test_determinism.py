"""Same config and seed, same bits: for any number of workers, any spread of tasks over them,
a failover re-run, and under every torch thread count and kernel path this machine can force.

The kernel-path checks run tests/determinism_probe.py in a subprocess per path, since
ATEN_CPU_CAPABILITY and MKL_ENABLE_INSTRUCTIONS are read once at process start. Results
differ between thread counts and kernel paths (that is not promised); within each, every
arrangement of the tasks over workers must give the same digest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from metaray.config import load_config
from metaray.training.run_dir import RunDir
from metaray.training.trainer import train
from tests.conftest import ROOT

PATHS = {
    "native": ({}, None),
    "aten-avx2": ({"ATEN_CPU_CAPABILITY": "avx2"}, "AVX2"),
    "aten-default": ({"ATEN_CPU_CAPABILITY": "default"}, "DEFAULT"),
    "mkl-avx2": ({"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, None),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_results_do_not_depend_on_the_spread_of_tasks_over_workers(path):
    env_vars, capability = PATHS[path]
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")}
    proc = subprocess.run([sys.executable, "-m", "tests.determinism_probe", "1", "2", "4"], cwd=ROOT,
                          env={**env, **env_vars}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if capability is not None:  # the path was really forced
        assert report["capability"] == capability
    for threads, cases in report["threads"].items():
        for case, digests in cases.items():
            assert len(set(digests.values())) == 1, f"{path}, {threads} threads, {case}: {digests}"


ISSUE = ["outer.meta_batch_size=5", "inner.steps=2", "inner.episodes=6", "rollout.horizon=40", "outer.iterations=3",
         "eval.tasks=3", "checkpoint.every=100", "rollout.task_group_size=2"]


def _final_state(tmp_path, name: str, overrides: list[str]) -> dict:
    cfg = load_config("quickstart", overrides)
    run = RunDir(tmp_path / name)
    run.prepare(cfg, overwrite=False)
    train(cfg, run, log=lambda _: None)
    return run.latest_checkpoint()


def _same_state(a: dict, b: dict) -> bool:
    if not torch.equal(a["params"], b["params"]):
        return False
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    return all(torch.equal(sa[k][f], sb[k][f]) for k in sa for f in ("exp_avg", "exp_avg_sq", "step"))


@pytest.mark.parametrize("threads", [1, 2])
def test_checkpoints_are_bit_identical_for_1_2_3_workers_and_any_cpus_per_worker(ray_local, tmp_path, threads):
    """The issue's reproduction (2-thread workers, meta-batch 5) on a real embedded Ray."""
    base = [*ISSUE, f"resources.torch_threads={threads}"]
    states = {(w, c): _final_state(tmp_path, f"w{w}-c{c}", [*base, f"resources.num_workers={w}",
                                                             f"resources.cpus_per_worker={c}"])
              for w, c in [(1, 2), (2, 1), (3, 0.5)]}
    (first, reference), *others = states.items()
    for key, state in others:
        assert _same_state(state, reference), f"{key} differs from {first}"
    assert state["iteration"] == 3 and not np.allclose(reference["params"].numpy(), 0)
