"""Evaluation protocol, baselines, Parquet and TensorBoard output, plots and progress display."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, run_cli

TINY = ["-s", "outer.iterations=3", "-s", "outer.meta_batch_size=4", "-s", "inner.episodes=4",
        "-s", "rollout.horizon=20", "-s", "policy.hidden_sizes=[16]", "-s", "eval.tasks=3"]


def test_eval_baselines_json_and_meta_policy_beats_them(nav_run, ray_address):
    """MAML paper protocol: 40 held-out tasks, 0..3 steps; after one step meta-learning must win by a margin."""
    proc = run_cli("eval", str(nav_run), "--baselines", "--json", "--tasks", "40", "--steps", "3",
                   "--address", ray_address)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # stdout is the JSON alone: the pretrained run's progress went to stderr
    assert set(out["baselines"]) == {"random", "pretrained"}
    for curve in [out, *out["baselines"].values()]:
        assert curve["tasks"] == 40 and len(curve["mean_return"]) == 4 and len(curve["std_return"]) == 4
        assert len(curve["stderr_return"]) == 4
    meta, random, pretrained = out["mean_return"], out["baselines"]["random"], out["baselines"]["pretrained"]
    print(f"after 1 step: metaray {meta[1]:.2f}  pretrained {pretrained['mean_return'][1]:.2f}  "
          f"random {random['mean_return'][1]:.2f}")
    margin = 5.0  # measured: -21.4 vs pretrained -31.5 vs random -144.8 (stderr ~2 each)
    assert meta[1] > pretrained["mean_return"][1] + margin
    assert meta[1] > random["mean_return"][1] + margin

    # The pretrained baseline is a real run with the same budget and no adaptation in its objective.
    base = Path(pretrained["run_dir"])
    assert base == nav_run / "baselines" / "pretrained"
    import yaml

    ours, theirs = (yaml.safe_load((d / "config.yaml").read_text()) for d in (nav_run, base))
    assert theirs.pop("algorithm") == "pretrain" and ours.pop("algorithm") == "maml" and ours == theirs
    assert len(pq.read_table(base / "metrics.parquet")) == 30

    # eval.parquet: one row per policy x task x adaptation steps, all on the same tasks.
    table = pq.read_table(nav_run / "eval.parquet").to_pylist()
    assert len(table) == 3 * 40 * 4
    tasks = {p: [r["task"] for r in table if r["policy"] == p and r["adaptation_steps"] == 0]
             for p in ("metaray", "random", "pretrained")}
    assert tasks["metaray"] == tasks["random"] == tasks["pretrained"]

    # A second call reuses the trained baseline instead of training it again.
    again = run_cli("eval", str(nav_run), "--baselines", "pretrained", "--tasks", "4", "--steps", "1",
                    "--address", ray_address)
    assert again.returncode == 0 and "reusing" in again.stdout, again.stderr

    # report: two PNGs of the stated size; runs compare: both runs side by side.
    from PIL import Image

    rep = run_cli("report", str(nav_run))
    assert rep.returncode == 0, rep.stderr
    for name in ("learning_curve.png", "adaptation_curve.png"):
        assert f"wrote {nav_run / name}" in rep.stdout
        with Image.open(nav_run / name) as img:
            assert img.format == "PNG" and img.size == (700, 450)
    cmp = run_cli("runs", "compare", str(nav_run), str(base), "--json")
    assert cmp.returncode == 0, cmp.stderr
    compared = json.loads(cmp.stdout)
    assert [r["algorithm"] for r in compared] == ["maml", "pretrain"]
    assert compared[0]["pretrained"] and len(compared[0]["return"]) == 2  # the last eval: 4 tasks, 1 step
    table_out = run_cli("runs", "compare", str(nav_run), str(base))
    assert table_out.returncode == 0 and "pretrain" in table_out.stdout and "maml" in table_out.stdout


def test_run_writes_per_task_rows_and_tensorboard_tags(nav_run):
    tasks = pq.read_table(nav_run / "tasks.parquet").to_pylist()
    assert len(tasks) == 30 * 20, "one row per task of every iteration"
    assert {r["iteration"] for r in tasks} == set(range(30))
    first = tasks[0]
    assert len(first["task_goal"]) == 2 and json.loads(first["task"])["goal"] == first["task_goal"]
    assert first["node"] == "127.0.0.2" and first["worker"].startswith("worker-")
    assert all(r["env_steps"] > 0 and r["pre_return"] < 0 for r in tasks)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(nav_run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"returns/pre_adaptation", "returns/post_adaptation", "perf/env_steps_per_s",
            "losses/outer", "losses/grad_norm"} <= tags
    post = events.Scalars("returns/post_adaptation")
    metrics = pq.read_table(nav_run / "metrics.parquet").to_pylist()
    assert [e.step for e in post] == list(range(30))
    assert [round(e.value, 3) for e in post] == [round(r["post_return"], 3) for r in metrics]


def test_ppo_baseline_reports_steps_to_reach_the_adapted_return(nav_run, ray_address):
    """RLlib PPO from scratch on each held-out task (real RLlib, real envs), small budget."""
    proc = run_cli("eval", str(nav_run), "--baselines", "ppo", "--json", "--tasks", "2", "--steps", "1",
                   "--ppo-budget", "6000", "--address", ray_address)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    ppo = out["baselines"]["ppo"]
    assert ppo["tasks"] == 2 and ppo["budget_env_steps"] == 6000
    assert ppo["metaray_adaptation_env_steps"] > 0  # one batch of 20 episodes
    adapted = [r["return"] for r in pq.read_table(nav_run / "eval.parquet").to_pylist()
               if r["policy"] == "metaray" and r["adaptation_steps"] == 1]
    for task, target in zip(ppo["per_task"], adapted):
        assert task["target_return"] == pytest.approx(target), "the target is metaray's return on that task"
        if task["reached"]:
            assert task["final_return"] >= target and task["env_steps_to_target"] <= 6000 + 2000
        else:
            assert task["env_steps"] >= 6000 and task["final_return"] < target
    needed = [t["env_steps_to_target"] if t["reached"] else 6000 for t in ppo["per_task"]]
    assert ppo["sample_efficiency_ratio"] == pytest.approx(
        (needed[0] + needed[1]) / 2 / ppo["metaray_adaptation_env_steps"])
    assert ppo["ratio_is_lower_bound"] == (not all(t["reached"] for t in ppo["per_task"]))
    rows = [r for r in pq.read_table(nav_run / "eval.parquet").to_pylist() if r["policy"] == "ppo"]
    assert [r["target_return"] for r in rows] == pytest.approx(adapted)
    assert [r["env_steps"] for r in rows] == [t["env_steps_to_target"] for t in ppo["per_task"]]


def test_unknown_baseline_is_one_clear_error(nav_run):
    proc = run_cli("eval", str(nav_run), "--baselines", "random,ppo2")
    assert proc.returncode == 2
    assert "unknown baseline ppo2" in proc.stderr and "allowed: random, pretrained, ppo" in proc.stderr


def _train_args(out: Path) -> list[str]:
    return [sys.executable, "-m", "metaray.cli", "train", "quickstart", *TINY, "--output", str(out)]


def test_progress_is_live_on_a_terminal_and_plain_lines_otherwise(tmp_path, ray_address):
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    # stdout to a file: one plain line per iteration, no control codes.
    with open(tmp_path / "log.txt", "w") as log:
        done = subprocess.run([*_train_args(tmp_path / "plain"), "--address", ray_address], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.PIPE, timeout=300)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "log.txt").read_text()
    assert "\x1b[" not in text and "\r" not in text
    lines = [line for line in text.splitlines() if line.startswith("iter ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("pre" in line and "post" in line and "steps/s" in line and "eta" in line for line in lines)

    # stdout a pseudo-terminal: rich's live display (cursor control, a bar redrawn in place).
    leader, follower = pty.openpty()
    proc = subprocess.Popen([*_train_args(tmp_path / "live"), "--address", ray_address], cwd=ROOT, env=env,
                            stdout=follower, stderr=subprocess.PIPE)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=300)
    os.close(leader)
    assert proc.returncode == 0, proc.stderr.read()
    screen = b"".join(chunks).decode(errors="replace")
    assert "\x1b[?25l" in screen, "the live display hides the cursor while it redraws"
    assert "meta-training" in screen and "3/3" in screen and "steps/s" in screen and "eta" in screen
    assert "iter    1/3" not in screen, "no plain per-iteration lines on a terminal"
