"""Autoscaling on a real multi-node Ray on loopback: workers that appear after start-up join the run.

KubeRay's in-tree autoscaler adds worker pods while a run is going. The pool asks for
``resources.num_workers`` actors at start-up; those that cannot be placed yet stay pending
in Ray, and the run proceeds on the ones that can. When a node with room joins, Ray places
a pending worker there, it answers the pool's ping, and the following iterations give it its
share of the meta-batch: the shares are cut by the configured worker count, never by the
live one, so the meta-parameters are those of a run that had every node from the start.

This module is also imported by the workers, for its task family: it imports nothing from
the test harness at module level.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.custom_family import GoalLine

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
HEAD, FIRST, LATE = "127.0.0.40", "127.0.0.41", "127.0.0.42"
STORE = 80 * 1024**2  # object store per node: a run puts a few KiB of parameters per iteration
ITERATIONS = 24


class SlowGoalLine(GoalLine):
    """GoalLine whose simulator takes ``delay_s`` of wall time, not CPU, to start: an iteration
    long enough for a node to join mid-run, that leaves this 2-core machine's CPUs to the
    joining node. The results are GoalLine's."""

    def __init__(self, delay_s: float = 0.0, **options) -> None:
        super().__init__(**options)
        self.delay_s = delay_s

    def make_env(self, task: dict):
        time.sleep(self.delay_s)
        return super().make_env(task)


# Two workers of 1 CPU each; the cluster starts with one 1-CPU node (the head has none), so the
# second worker cannot be placed until LATE joins. Two groups of two tasks: one call per worker,
# 2 x 4 envs of 50 ms each, so an iteration takes ~0.8 s on one worker and ~0.4 s on two.
OVERRIDES = [f"task.family={__name__}:SlowGoalLine", "task.options.delay_s=0.05", f"outer.iterations={ITERATIONS}",
             "outer.meta_batch_size=4", "rollout.task_group_size=2", "inner.episodes=4", "rollout.horizon=20",
             "policy.hidden_sizes=[16]", "eval.tasks=2", "checkpoint.every=1000",
             "resources.num_workers=2", "resources.cpus_per_worker=1"]


@pytest.fixture(scope="module")
def cluster():
    """A head without CPUs (the learner's home) and one 1-CPU worker node; the test adds the next."""
    from tests.loopback import LoopbackCluster, node_env

    cluster = LoopbackCluster(Path(tempfile.mkdtemp(prefix="mr-autoscale-", dir="/tmp")), head_ip=HEAD,
                              env=node_env(), remove_temp_dir=True)
    try:
        cluster.start_head({"num-cpus": "0", "dashboard-host": HEAD}, object_store_bytes=STORE)
        cluster.add_node(FIRST, {"num-cpus": "1"}, object_store_bytes=STORE)
        wait_until(lambda: FIRST in cluster.alive_ips(), 60, f"node {FIRST} did not join")
        yield cluster
    finally:
        cluster.stop()  # every node SIGKILLed at once
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def wait_until(condition, timeout: float, message: str, proc: subprocess.Popen | None = None) -> float:
    """Poll ``condition`` until true (returning when, on the monotonic clock); fail after ``timeout``
    or once ``proc`` has exited."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"{message}: the run exited ({proc.returncode})"
        assert time.monotonic() < deadline, message
        time.sleep(0.1)
    return time.monotonic()


def start_train(out: Path, address: str, *overrides: str) -> subprocess.Popen:
    """``metaray train`` in a subprocess (OVERRIDES, then ``overrides``), its output in a file next to the run."""
    sets = [a for o in (*OVERRIDES, *overrides) for a in ("--set", o)]
    with (out.parent / f"{out.name}.log").open("w") as log:
        return subprocess.Popen([sys.executable, "-m", "metaray.cli", "train", "quickstart", *sets, "--output",
                                 str(out), "--address", address], cwd=ROOT, env=dict(os.environ), stdout=log,
                                stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, out: Path, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    log = (out.parent / f"{out.name}.log").read_text()
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{log[-4000:]}"


def nodes_by_iteration(out: Path) -> dict[int, set[str]]:
    """The nodes that ran each iteration's tasks, from tasks.parquet (its parts, mid-run)."""
    from metaray.training.run_dir import RunDir, read_rows

    found: dict[int, set[str]] = {}
    for row in read_rows(RunDir(out).tasks_path):
        found.setdefault(row["iteration"], set()).add(row["node"])
    return found


def test_a_node_added_mid_run_takes_work_and_the_result_is_unchanged(cluster, tmp_path):
    import torch

    from metaray.training.run_dir import RunDir

    t0 = time.monotonic()
    out = tmp_path / "scaled"
    proc = start_train(out, cluster.address)
    try:
        # Two workers, one CPU: the run proceeds on the worker that could be placed.
        first = wait_until(lambda: out.exists() and nodes_by_iteration(out), 120,
                           "no iteration finished on the worker that could be placed", proc) - t0
        done_before = len(nodes_by_iteration(out))
        cluster.add_node(LATE, {"num-cpus": "1"}, object_store_bytes=STORE)
        alive = wait_until(lambda: LATE in cluster.alive_ips(), 60, f"node {LATE} did not join") - t0
        used = wait_until(lambda: any(LATE in n for n in nodes_by_iteration(out).values()), 120,
                          f"the worker on {LATE} never took a task", proc) - t0
        finish(proc, out, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    ended = time.monotonic() - t0
    nodes = nodes_by_iteration(out)
    assert sorted(nodes) == list(range(ITERATIONS))
    joined = min(i for i in nodes if LATE in nodes[i])
    print(f"\nautoscale: iteration 0 done {first:.1f}s after launch; {LATE} added after iteration "
          f"{done_before - 1}, alive at {alive:.1f}s; its worker's first tasks in iteration {joined} "
          f"(seen at {used:.1f}s); run of {ITERATIONS} iterations ended at {ended:.1f}s")
    assert nodes[0] == {FIRST} and joined > 0
    assert all(nodes[i] == {FIRST, LATE} for i in range(joined, ITERATIONS)), \
        f"once joined, the new worker takes its share of every iteration: {nodes}"
    rows = RunDir(out).read_metrics()
    assert all(r["task_indices"] == "0,1,2,3" and r["worker_failures"] == 0 for r in rows)
    assert rows[0]["workers_per_node"] == f"{FIRST}=1" and rows[0]["tasks_per_node"] == f"{FIRST}=4"
    assert rows[-1]["workers_per_node"] == f"{FIRST}=1,{LATE}=1"

    reference = tmp_path / "reference"
    t1 = time.monotonic()
    # Without the simulator's delay, which is there only to keep the scaled run going until a node has
    # joined: it changes nothing else (the results are GoalLine's).
    finish(start_train(reference, cluster.address, "task.options.delay_s=0"), reference, timeout=120)
    print(f"reference run, both nodes from the start: {time.monotonic() - t1:.1f}s")
    assert all(n == {FIRST, LATE} for n in nodes_by_iteration(reference).values())
    assert torch.equal(RunDir(out).latest_checkpoint()["params"], RunDir(reference).latest_checkpoint()["params"])
