"""The scaling bench (metaray/bench/scaling.py): its quick run on a real three-node loopback
cluster returns sane figures and leaves no process behind; its reaper stops a cluster whose
starter was killed; its cost fit recovers a known model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from metaray.bench.scaling import fit_cost
from metaray.runtime.reaper import alive, cluster_processes


@pytest.fixture(scope="module")
def quick():
    """run_scaling(quick=True) in a process of its own: it must be its process's only Ray connection,
    and other tests here connect to theirs."""
    code = "import json; from metaray.bench.scaling import run_scaling; print('RESULT', json.dumps(run_scaling(True)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ), cwd=Path(__file__).parents[1])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_quick_run_reports_every_figure(quick):
    training = quick["training"]
    assert set(training["train_steps_per_s"]) == {"1", "2", "3"}
    assert all(v > 0 for v in training["train_steps_per_s"].values())
    assert training["speedup"]["1"] == 1.0 and all(v > 0 for v in training["speedup"].values())
    assert quick["cluster"]["nodes"] == ["127.0.0.50", "127.0.0.51", "127.0.0.52"]
    assert quick["cluster"]["cpus_per_node"] == 1 and quick["cluster"]["token_auth"]
    assert any("oversubscribed" in c for c in quick["caveats"]) and quick["settings"]["quick"]

    learner = quick["learner"]
    assert sorted(learner["worker_nodes"]) == ["127.0.0.50", "127.0.0.51", "127.0.0.52"]  # spread, one per node
    assert {(p["meta_batch"], p["workers"]) for p in learner["points"]} == {
        (n, w) for n in (5, 10, 20) for w in (1, 2, 3)}
    assert all(p["applied"] and p["thread_cpu_s"] > 0 and p["process_cpu_s"] > 0 for p in learner["points"])

    memory = learner["memory"]
    for key in ("python_heap_peak_growth_bytes", "rows_bytes", "rss_peak_growth_bytes"):
        assert set(memory[key]) == {"5", "10", "20"}
    assert all(v > 0 for v in memory["python_heap_peak_growth_bytes"].values())
    assert memory["rows_bytes"]["20"] > memory["rows_bytes"]["5"] > 0  # one row per task, kept for tasks.parquet
    assert memory["python_heap_peak_ratio_20_vs_5"] > 0 and isinstance(memory["explanation"], str)
    assert memory["beyond_rows_bytes"] == {n: memory["python_heap_peak_growth_bytes"][n] - memory["rows_bytes"][n]
                                           for n in ("5", "10", "20")}
    assert memory["flat"] == (memory["beyond_rows_bytes"]["20"] < 1.5 * memory["beyond_rows_bytes"]["5"])


def test_the_fit_reproduces_its_inputs_within_its_residuals(quick):
    for key, fit in quick["learner"]["fit"].items():
        measured = {(p["meta_batch"], p["workers"]): p[key] for p in quick["learner"]["points"]}
        assert len(fit["points"]) == len(measured) == 9
        for p in fit["points"]:
            model = fit["a_s"] + fit["b_s_per_task"] * p["meta_batch"] + fit["c_s_per_worker"] * p["workers"]
            assert p["predicted"] == pytest.approx(model, rel=1e-9, abs=1e-12)
            assert p["measured"] == measured[p["meta_batch"], p["workers"]]
            assert abs(p["measured"] - p["predicted"]) <= fit["max_abs_residual"] * (1 + 1e-9) + 1e-15
            assert p["measured"] == pytest.approx(p["predicted"] + p["residual"], rel=1e-9, abs=1e-15)


def test_no_process_of_the_cluster_survives(quick):
    cluster = quick["cluster"]
    assert len(cluster["stopped_pids"]) >= 6  # at least a `ray start` and a raylet per node
    assert not [pid for pid in cluster["stopped_pids"] if alive(pid)]
    assert not alive(cluster["reaper_pid"])
    assert not cluster_processes(cluster["marker"], set(), {os.getpid()})


def test_fit_recovers_a_known_model():
    points = [{"meta_batch": n, "workers": w, "cost": 0.002 + 3e-5 * n + 4e-4 * w}
              for n in (20, 200, 2000) for w in (1, 2, 3)]
    fit = fit_cost(points, "cost")
    assert (fit["a_s"], fit["b_s_per_task"], fit["c_s_per_worker"]) == pytest.approx((0.002, 3e-5, 4e-4))
    assert fit["max_abs_residual"] < 1e-12 and fit["r2"] == pytest.approx(1.0)


STARTER = textwrap.dedent("""
    import os, subprocess, sys, time
    from metaray.runtime.reaper import register, start_reaper
    marker, log = sys.argv[1], sys.argv[2]
    reaper = start_reaper(marker, __import__("pathlib").Path(log))
    name, value = marker.split("=", 1)
    # a stand-in for `ray start --block`: the leader of a session of its own, with a child
    node = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300"], start_new_session=True,
                            env={**os.environ, name: value})
    register(reaper, node.pid)
    print(reaper.pid, node.pid, flush=True)
    time.sleep(300)
""")


def test_the_reaper_stops_the_nodes_of_a_killed_starter(tmp_path):
    """The bench killed by SIGKILL, no teardown run: its reaper stops what it registered."""
    marker = f"METARAY_SCALING_CLUSTER={uuid.uuid4().hex}"
    starter = subprocess.Popen([sys.executable, "-c", STARTER, marker, str(tmp_path / "reaper.log")],
                               stdout=subprocess.PIPE, text=True)
    try:
        reaper, node = (int(x) for x in starter.stdout.readline().split())
        deadline = time.monotonic() + 20
        while len(cluster_processes(marker, set(), set())) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        started = cluster_processes(marker, set(), set())
        assert node in started and len(started) >= 3  # sh and its two sleeps
    finally:
        starter.send_signal(signal.SIGKILL)
        starter.wait(timeout=10)
    deadline = time.monotonic() + 30
    while (alive(reaper) or cluster_processes(marker, set(), set())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not cluster_processes(marker, set(), set()) and not alive(reaper), Path(tmp_path / "reaper.log").read_text()
