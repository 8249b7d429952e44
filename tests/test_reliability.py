"""Faults a long run meets: dead workers, killed drivers, damaged checkpoints, bad results."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import ray
import torch

from metaray.algorithms.maml import MAML
from metaray.config import ConfigError, load_config
from metaray.training.run_dir import RunDir, read_rows
from metaray.training.trainer import train
from tests.conftest import ROOT, run_cli
from tests.forked_cli import ForkedCli

BUSY = ["outer.iterations=6", "outer.meta_batch_size=16", "inner.steps=2", "policy.hidden_sizes=[32]",
        "eval.tasks=2", "checkpoint.every=2"]
_UNDISTURBED: dict[str, np.ndarray] = {}


def _undisturbed(cfg, tmp_path) -> np.ndarray:
    """The final meta-parameters of ``cfg`` trained without faults, on the session's Ray: trained once per
    config for the module (a run is a function of its config, which is the key)."""
    key = cfg.model_dump_json()
    if key not in _UNDISTURBED:
        reference = RunDir(tmp_path / "reference")
        reference.prepare(cfg, overwrite=False)
        _UNDISTURBED[key] = train(cfg, reference, log=lambda _: None)["params"].copy()
    return _UNDISTURBED[key].copy()


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """The CLI for the commands refused before a run starts: see tests/forked_cli.py."""
    with ForkedCli(tmp_path_factory.mktemp("cli")) as forked:
        yield forked


def _wait_for(predicate, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_worker_killed_mid_iteration_changes_nothing(ray_local, tmp_path):
    """ray.kill a worker during iteration 2: the run finishes, every task counted once, same result."""
    cfg = load_config("quickstart", BUSY)
    expected = _undisturbed(cfg, tmp_path)

    run = RunDir(tmp_path / "faulty")
    run.prepare(cfg, overwrite=False)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(train(cfg, run, log=lambda _: None)))
    thread.start()
    _wait_for(lambda: len(run.read_metrics()) >= 1, what="the first iteration")
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("metaray-worker-")]
    victim = ray.get_actor(sorted(names)[0])
    ray.kill(victim, no_restart=False)  # Ray restarts it; its in-flight tasks are lost
    thread.join(timeout=300)
    assert not thread.is_alive() and "params" in outcome

    rows = run.read_metrics()
    assert [r["iteration"] for r in rows] == list(range(6))
    for r in rows:  # each (iteration, task index) result counted exactly once
        assert r["tasks_counted"] == 16 and r["task_indices"] == ",".join(map(str, range(16)))
    assert sum(r["worker_failures"] for r in rows) >= 1
    assert sum(r["task_retries"] for r in rows) >= 1
    print(f"worker failures {sum(r['worker_failures'] for r in rows)}, tasks re-run "
          f"{sum(r['task_retries'] for r in rows)}, restarts {sum(r['worker_restarts'] for r in rows)}")
    assert np.array_equal(outcome["params"], expected), "failover must not change the meta-parameters"


class KillsAWorkerInTheOuterStep(MAML):
    """MAML whose learner half kills worker 0 as iteration 1's outer step begins: Ray restarts it
    without the episodes it kept, so TRPO's requests about its tasks find it gone (or restarted)."""

    def outer_step(self, outer, mean):
        if outer.iteration == 1 and outer.attempt == 0:
            ray.kill(outer.learner.pool.workers[0], no_restart=False)
        return super().outer_step(outer, mean)


def test_worker_lost_in_the_trpo_outer_step_changes_nothing(ray_local, tmp_path):
    """The conjugate-gradient and line-search requests of a lost worker's tasks: their groups are
    sampled again on the live worker from the same seeds, and the step is bit-identical."""
    overrides = ["outer.iterations=3", "outer.meta_batch_size=8", "rollout.task_group_size=2", "inner.episodes=6",
                 "rollout.horizon=30", "policy.hidden_sizes=[16]", "eval.tasks=2", "outer.optimizer=trpo"]
    expected = _undisturbed(load_config("quickstart", overrides), tmp_path)
    cfg = load_config("quickstart", [*overrides, "algorithm=tests.test_reliability:KillsAWorkerInTheOuterStep"])
    run = RunDir(tmp_path / "faulty")
    run.prepare(cfg, overwrite=False)
    outcome = train(cfg, run, log=lambda _: None)
    rows = run.read_metrics()
    print({k: rows[1][k] for k in ("worker_failures", "task_retries", "worker_restarts")})
    assert rows[1]["worker_failures"] + rows[1]["task_retries"] >= 1, rows[1]
    assert rows[1]["task_retries"] >= 4, "the lost worker's groups are sampled again"
    assert all(r["tasks_counted"] == 8 for r in rows)
    assert np.array_equal(outcome["params"], expected), "a loss in the outer step must not change the result"


class StallsOneAnswer(MAML):
    """MAML whose worker half hangs once, for ``task.options.stall_s``, in the first answer to a
    learner request of the test (the marker file ``task.options.stall_marker`` makes it once)."""

    def _stall_once(self):
        options = self.config.task.options
        try:
            os.close(os.open(options["stall_marker"], os.O_CREAT | os.O_EXCL))
            time.sleep(options["stall_s"])
        except FileExistsError:
            pass

    def answer(self, kept, request, *args):
        self._stall_once()
        return super().answer(kept, request, *args)

    def answer_sum(self, kept, request, *args):  # TRPO's products: a group's answered together
        self._stall_once()
        return super().answer_sum(kept, request, *args)


def test_worker_hung_in_the_trpo_outer_step_is_timed_out(ray_local, tmp_path):
    """A worker that does not answer a TRPO request within resources.task_timeout_s: its tasks'
    groups are sampled again on the other worker and the run goes on, bit-identical."""
    marker = tmp_path / "stalled"
    overrides = ["task.family=tests.custom_family:GoalLine", f"task.options.stall_marker={str(marker)!r}",
                 "task.options.stall_s=60", "outer.iterations=3", "outer.meta_batch_size=8",
                 "rollout.task_group_size=2", "inner.episodes=6", "rollout.horizon=30", "policy.hidden_sizes=[16]",
                 "eval.tasks=2", "outer.optimizer=trpo", "resources.task_timeout_s=3"]
    expected = _undisturbed(load_config("quickstart", overrides), tmp_path)
    assert not marker.exists(), "the undisturbed run must not stall"
    cfg = load_config("quickstart", [*overrides, "algorithm=tests.test_reliability:StallsOneAnswer"])
    run = RunDir(tmp_path / "faulty")
    run.prepare(cfg, overwrite=False)
    start = time.monotonic()
    outcome = train(cfg, run, log=lambda _: None)
    rows = run.read_metrics()
    assert marker.exists() and time.monotonic() - start < 50, "the run must not wait for the hung worker"
    assert rows[0]["task_timeouts"] >= 1 and rows[0]["task_retries"] >= 2, rows[0]
    assert all(r["tasks_counted"] == 8 for r in rows)
    assert np.array_equal(outcome["params"], expected), "a hung worker must not change the result"


def test_straggler_is_redispatched_after_the_task_timeout(ray_local, tmp_path):
    """One task stalls once for 6s; with a 1s timeout its twin answers on the other worker."""
    from metaray.core import seeding
    from metaray.tasks import make_family

    base = ["task.family=tests.custom_family:GoalLine", "outer.iterations=2", "outer.meta_batch_size=4",
            "rollout.task_group_size=2",
            "inner.episodes=3", "rollout.horizon=10", "eval.tasks=2"]
    targets = [t["target"] for t in seeding.train_tasks(make_family("tests.custom_family:GoalLine", {}), 0, 0, 4)]
    stall = targets[2]  # task 2 of iteration 0
    cfg = load_config("quickstart", base)
    reference = RunDir(tmp_path / "reference")
    reference.prepare(cfg, overwrite=False)
    expected = train(cfg, reference, log=lambda _: None)["params"]
    cfg = load_config("quickstart", [*base, "resources.task_timeout_s=1", f"task.options.stall_target={stall!r}",
                                     "task.options.stall_s=6", f"task.options.stall_marker={tmp_path / 'stalled'}"])
    run = RunDir(tmp_path / "run")
    run.prepare(cfg, overwrite=False)
    out = train(cfg, run, log=lambda _: None)
    rows = run.read_metrics()
    # The stalled task and the one queued behind it on the same worker are both re-dispatched.
    assert rows[0]["task_timeouts"] >= 1  # (iteration 1 may also route around the still-stalled worker)
    assert all(r["task_indices"] == "0,1,2,3" for r in rows)
    # Without the twin the iteration would take the 6s stall longer than the reference's.
    slower = rows[0]["time_iteration_s"] - reference.read_metrics()[0]["time_iteration_s"]
    assert slower < 4.0, f"the twin, not the straggler, must finish the iteration ({slower:.1f}s slower)"
    assert np.array_equal(out["params"], expected)


def test_nan_results_are_rejected_and_never_applied(ray_local, tmp_path):
    overrides = ["task.family=tests.custom_family:GoalLine", "task.options.nan_every=3", "outer.iterations=2",
                 "outer.meta_batch_size=6", "inner.episodes=3", "rollout.horizon=10", "eval.tasks=2"]
    cfg = load_config("quickstart", overrides)
    run = RunDir(tmp_path / "run")
    run.prepare(cfg, overwrite=False)
    out = train(cfg, run, log=lambda _: None)
    assert np.isfinite(out["params"]).all()
    assert [r["rejected_results"] for r in run.read_metrics()] == [2, 2]  # tasks 0 and 3 of 6

    cfg = load_config("quickstart", [*overrides, "task.options.nan_every=1", "resources.max_iteration_retries=1"])
    run = RunDir(tmp_path / "all-nan")
    run.prepare(cfg, overwrite=False)
    with pytest.raises(Exception, match="only 0 of 6 task results were finite in each of 2 task draws"):
        train(cfg, run, log=lambda _: None)
    assert not run.checkpoint_files(), "nothing broken may be saved"


def test_iteration_with_too_few_finite_results_is_retried_on_a_fresh_task_draw(ray_local, tmp_path):
    """Tasks drawn with a negative target give NaN: a draw is retried until all are finite,
    every draw seeded by (seed, iteration, attempt), so a second run repeats it bit for bit."""
    from metaray.core import seeding
    from metaray.tasks import make_family

    overrides = ["task.family=tests.custom_family:GoalLine", "task.options.nan_negative=true", "outer.iterations=3",
                 "outer.meta_batch_size=2", "inner.episodes=3", "rollout.horizon=10", "eval.tasks=2",
                 "resources.min_valid_fraction=1.0", "resources.max_iteration_retries=20"]
    cfg = load_config("quickstart", overrides)
    outs = []
    for name in ("a", "b"):
        run = RunDir(tmp_path / name)
        run.prepare(cfg, overwrite=False)
        outs.append(train(cfg, run, log=lambda _: None))
    rows, tasks = run.read_metrics(), read_rows(run.tasks_path)
    attempts = [r["iteration_attempts"] for r in rows]
    assert max(attempts) > 1, f"the seed must exercise a retry: {attempts}"
    assert not any(t["rejected"] for t in tasks), "only a draw with every result finite is applied"
    for r in rows:  # what the discarded draws cost is counted in the row
        assert (r["rejected_results"] > 0) == (r["iteration_attempts"] > 1)
        applied = 2 * 2 * 3 * 10  # 2 tasks x 2 batches x 3 episodes x 10 steps
        assert r["env_steps"] >= applied and (r["env_steps"] > applied) == (r["iteration_attempts"] > 1), r
    family = make_family("tests.custom_family:GoalLine", {"nan_negative": True})
    for r in rows:  # the recorded tasks are the accepted draw's, all finite
        expected = seeding.train_tasks(family, 0, r["iteration"], 2, r["iteration_attempts"] - 1)
        got = [t for t in tasks if t["iteration"] == r["iteration"]]
        assert [t["task_target"] for t in got] == [e["target"] for e in expected]
        assert {t["attempt"] for t in got} == {r["iteration_attempts"] - 1}
    assert np.isfinite(outs[0]["params"]).all() and np.array_equal(outs[0]["params"], outs[1]["params"])


def test_driver_killed_then_resumed_is_bit_identical(ray_local, ray_address, tmp_path):
    """SIGKILL the driver between checkpoints; --resume ends where an uninterrupted run ends."""
    overrides = [*BUSY, "outer.optimizer=adam"]  # quickstart's optimizer: the worker-kill test's config
    cfg = load_config("quickstart", overrides)
    expected = _undisturbed(cfg, tmp_path)

    out = tmp_path / "run"
    sets = [arg for o in overrides for arg in ("--set", o)]
    driver = subprocess.Popen([sys.executable, "-m", "metaray.cli", "train", "quickstart", *sets, "--output",
                               str(out), "--address", ray_address], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    run = RunDir(out)
    try:
        _wait_for(lambda: out.exists() and len(run.read_metrics()) >= 3, what="iteration 3")  # checkpoint 2 exists
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.wait()
    done = [r["iteration"] for r in run.read_metrics()]
    assert 3 <= len(done) < 6, "the driver was meant to die mid-run"
    # Every completed iteration kept its rows: metrics contiguous, each with all its task rows
    # (tasks.parquet is written first, so it may hold one iteration more).
    assert done == list(range(len(done)))
    per_task = read_rows(run.tasks_path)
    kept = sorted({r["iteration"] for r in per_task})
    assert kept[: len(done)] == done and len(kept) - len(done) <= 1
    assert all(sum(r["iteration"] == i for r in per_task) == cfg.outer.meta_batch_size for i in kept)
    proc = run_cli("train", "--resume", str(out), "--address", ray_address)
    assert proc.returncode == 0, proc.stderr
    assert "resuming from iteration" in proc.stdout
    assert np.array_equal(run.latest_checkpoint()["params"].numpy(), expected)
    assert [r["iteration"] for r in run.read_metrics()] == list(range(6))
    assert sorted(r["iteration"] for r in read_rows(run.tasks_path)) == sorted(
        list(range(6)) * cfg.outer.meta_batch_size), "resuming drops the killed iteration's rows, then re-runs it"


def test_truncated_checkpoint_is_refused_on_resume(tmp_path, cli):
    cfg = load_config("quickstart", ["policy.hidden_sizes=[4]"])
    run = RunDir(tmp_path / "run")
    run.prepare(cfg, overwrite=False)
    for it in (2, 4):
        run.save_checkpoint(it, {"params": torch.zeros(3), "optimizer": None}, cfg, keep=3)
    newest = run.checkpoint_files()[-1]
    newest.write_bytes(newest.read_bytes()[:-100])
    config_before = run.config_path.read_text()
    with pytest.raises(ConfigError, match=r"checkpoint_000004\.pt is corrupt.*delete it to resume from"):
        run.latest_checkpoint()
    (proc,) = cli(("train", "--resume", str(run.path)))
    assert proc.returncode == 2 and "is corrupt: its checksum does not match" in proc.stderr
    assert run.config_path.read_text() == config_before


def test_incompatible_checkpoint_or_diverging_resume_is_refused(ray_address, tmp_path, cli):
    out = tmp_path / "run"
    proc = run_cli("train", "quickstart", "--output", str(out), "--set", "outer.iterations=2", "--set",
                   "outer.meta_batch_size=2", "--set", "inner.episodes=2", "--set", "rollout.horizon=5",
                   "--set", "eval.tasks=1", "--address", ray_address)
    assert proc.returncode == 0, proc.stderr
    before = (out / "config.yaml").read_text()
    # The refused resumes side by side, each in a run directory of its own (a resume locks it): two in copies,
    # the last in the run itself, which is then resumed.
    copies = [tmp_path / f"run-{i}" for i in range(2)]
    for copy in copies:
        shutil.copytree(out, copy)
    refused = cli(("train", "--resume", str(copies[0]), "--set", "policy.hidden_sizes=[32]"),
                  # What would make the resumed run differ from an uninterrupted one is named and refused.
                  ("train", "--resume", str(copies[1]), "--set", "seed=7", "--set", "inner.lr=0.2",
                   "--set", "resources.torch_threads=2"),
                  ("train", "--resume", str(out), "--set", "outer.iterations=1"))
    proc = refused[0]
    assert proc.returncode == 2 and "holds a policy of 4484 parameters" in proc.stderr
    proc = refused[1]
    assert proc.returncode == 2 and "cannot change inner.lr, resources.torch_threads, seed" in proc.stderr
    proc = refused[2]
    assert proc.returncode == 2 and "below the 2 iterations its checkpoint already holds" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    for run in (*copies, out):
        assert (run / "config.yaml").read_text() == before
    # What may change does: more iterations, another evaluation size, other resources.
    proc = run_cli("train", "--resume", str(out), "--set", "outer.iterations=3", "--set", "eval.tasks=2",
                   "--set", "resources.num_workers=1", "--address", ray_address)
    assert proc.returncode == 0, proc.stderr
    assert RunDir(out).latest_checkpoint()["iteration"] == 3


def test_non_finite_parameters_are_never_checkpointed_nor_evaluated(tmp_path, cli):
    import hashlib
    import io

    from metaray.training.run_dir import _MAGIC, NonFiniteParamsError

    cfg = load_config("quickstart")
    run = RunDir(tmp_path / "run")
    run.prepare(cfg, overwrite=False)
    with pytest.raises(NonFiniteParamsError, match="not finite"):
        run.save_checkpoint(1, {"params": torch.tensor([1.0, float("nan")]), "optimizer": None}, cfg, keep=3)
    assert not run.checkpoint_files()
    # One written by something else (valid checksum, NaN inside): eval refuses it in one line.
    from metaray.core.task_worker import TaskWorker

    n = TaskWorker(cfg).n_params
    buf = io.BytesIO()
    torch.save({"format": 1, "iteration": 1, "config": cfg.model_dump(mode="json"),
                "params": torch.full((n,), float("inf")), "optimizer": None}, buf)
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    raw = buf.getvalue()
    (run.checkpoints / "checkpoint_000001.pt").write_bytes(_MAGIC + hashlib.sha256(raw).digest() + raw)
    (proc,) = cli(("eval", str(run.path), "--tasks", "2", "--steps", "1"))
    assert proc.returncode == 2 and "non-finite (NaN or inf) parameters" in proc.stderr
    assert "Traceback" not in proc.stderr and not run.eval_path.exists()


def test_kill_during_checkpoint_write_leaves_no_valid_looking_file(tmp_path):
    """A writer SIGKILLed mid-write leaves only its hidden temporary file, never a bad checkpoint."""
    script = (
        "import sys, torch; from metaray.config import load_config; from metaray.training.run_dir import RunDir\n"
        "run = RunDir(sys.argv[1]); cfg = load_config('quickstart')\n"
        "run.save_checkpoint(1, {'params': torch.ones(10), 'optimizer': None}, cfg, keep=5)\n"
        "print('first', flush=True)\n"
        "run.save_checkpoint(2, {'params': torch.randn(200_000_000), 'optimizer': None}, cfg, keep=5)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    assert writer.stdout.readline().strip() == "first"
    run = RunDir(tmp_path)
    _wait_for(lambda: any(p.stat().st_size > 0 for p in run.checkpoints.glob(".checkpoint_000002.pt.*.tmp")),
              what="the second checkpoint's write")
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert [p.name for p in run.checkpoint_files()] == ["checkpoint_000001.pt"]
    assert run.latest_checkpoint()["params"].tolist() == [1.0] * 10


@pytest.mark.parametrize("address", ["127.0.0.2:1", "ray://127.0.0.2:1"])
def test_unreachable_address_fails_fast_naming_it(tmp_path, address, cli):
    start = time.monotonic()
    (proc,) = cli(("train", "quickstart", "--output", str(tmp_path / "run"), "--address", address))
    assert proc.returncode == 1
    assert f"cannot reach the Ray cluster at {address}" in proc.stderr
    assert time.monotonic() - start < 30
    assert not (tmp_path / "run").exists()
