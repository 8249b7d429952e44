"""Meta-World families (ML1, ML10) and the success-rate metric, from env to run directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from metaray.config import ConfigError, load_config
from metaray.core import seeding
from metaray.core.policy import flatten
from metaray.core.task_worker import Batch, TaskWorker
from metaray.evaluation.evaluate import EvalResult
from metaray.tasks import make_family
from metaray.tasks.base import task_problems
from metaray.tasks.batched import EnvList
from tests.conftest import run_cli

metaworld = pytest.importorskip("metaworld")


@pytest.fixture(scope="module")
def ml1():
    return make_family("metaworld-ml1", {"env_name": "reach-v3"})


# -- the family contract ----------------------------------------------------------------------


def test_tasks_come_from_the_rng_alone_train_and_test_apart(ml1):
    ml10 = make_family("metaworld-ml10", {})
    for family in (ml1, ml10):
        tasks = family.sample_tasks(20, np.random.default_rng(3))
        assert tasks == family.sample_tasks(20, np.random.default_rng(3)), "tasks must depend only on the rng"
        assert tasks != family.sample_tasks(20, np.random.default_rng(4))
        assert json.loads(json.dumps(tasks)) == tasks, "tasks are plain serialisable dicts"
        held_out = family.sample_eval_tasks(50, np.random.default_rng(3))
        assert {t["split"] for t in tasks} == {"train"} and {t["split"] for t in held_out} == {"test"}
        assert all(task_problems(family, t) == [] for t in tasks + held_out)
        assert seeding.eval_tasks(family, 0, 5) == family.sample_eval_tasks(5, np.random.default_rng([0, 2]))
    # ML1: one class, 50 variants per split; a draw of 50 visits each once (each test goal, at eval)
    assert {t["env_name"] for t in ml1.sample_tasks(50, np.random.default_rng(0))} == {"reach-v3"}
    assert sorted(t["variant"] for t in ml1.sample_eval_tasks(50, np.random.default_rng(0))) == list(range(50))
    # ML10: the 10 train classes in training, the 5 test classes held out, balanced in a draw
    train = ml10.sample_tasks(20, np.random.default_rng(0))
    test = ml10.sample_eval_tasks(250, np.random.default_rng(0))
    assert sorted({t["env_name"] for t in train}) == sorted(metaworld.env_dict.ML10_V3["train"])
    assert sorted({t["env_name"] for t in test}) == sorted(metaworld.env_dict.ML10_V3["test"])
    assert not set(metaworld.env_dict.ML10_V3["train"]) & set(metaworld.env_dict.ML10_V3["test"])
    assert all(sum(t["env_name"] == name for t in train) == 2 for name in metaworld.env_dict.ML10_V3["train"])
    assert len({(t["env_name"], t["variant"]) for t in test}) == 250  # every test task once


def test_unknown_tasks_and_options_are_refused_naming_what_is_allowed(ml1):
    good = {"env_name": "reach-v3", "split": "test", "variant": 49}
    assert task_problems(ml1, good) == []
    for bad, words in [({**good, "env_name": "push-v3"}, "not a test class of ML1; allowed: reach-v3"),
                       ({**good, "split": "valid"}, "split must be one of train, test"),
                       ({**good, "variant": 50}, "variant=50 is outside [0, 49]"),
                       ({**good, "variant": 2.5}, "variant must be an integer"),
                       ({**good, "variant": True}, "variant must be an integer")]:
        problems = task_problems(ml1, bad)
        assert len(problems) == 1 and words in problems[0], (bad, problems)
        if bad["variant"] != 50:
            with pytest.raises(ValueError, match=words.split(";")[0]):
                ml1.make_env(bad)
    ml10 = make_family("metaworld-ml10", {})
    assert "not a train class of ML10" in task_problems(ml10, {**good, "env_name": "drawer-open-v3",
                                                               "split": "train"})[0]
    with pytest.raises(ValueError, match=r"env_name 'reach-v9' is not a Meta-World v3 env; allowed: .*push-v3"):
        make_family("metaworld-ml1", {"env_name": "reach-v9"})
    with pytest.raises(ConfigError, match="benchmark_seed"):
        load_config("ml1-reach-maml", ["task.options.benchmark_seed=-1"])


def test_the_service_takes_meta_world_tasks_and_refuses_bad_ones(ml1):
    from fastapi import HTTPException

    from metaray.service.serve import RequestChecker

    checker = RequestChecker(ml1, "metaworld-ml1", ml1.sample_tasks(1, np.random.default_rng(0))[0])
    task = {"env_name": "reach-v3", "split": "test", "variant": 7}
    assert checker.parse(json.dumps({"task": task}).encode()).task == task
    for bad, words in [({**task, "env_name": 3}, "task.env_name: expected a string"),
                       ({**task, "env_name": "pick-place-v3"}, "not a test class"),
                       ({**task, "variant": 99}, "outside [0, 49]")]:
        with pytest.raises(HTTPException) as caught:
            checker.parse(json.dumps({"task": bad}).encode())
        assert caught.value.status_code == 422 and words in caught.value.detail, caught.value.detail


def test_the_tasks_are_metaworlds_own(ml1):
    """One split at a time, exactly what metaworld.ML1 builds (seed for train, seed + 1 for test)."""
    reference = metaworld.ML1("reach-v3", seed=0)
    assert ml1.benchmark_tasks("train") == reference.train_tasks
    assert ml1.benchmark_tasks("test") == reference.test_tasks


# -- episodes ---------------------------------------------------------------------------------


def _goal_seeking(env: gym.Env, obs: np.ndarray) -> np.ndarray:
    """An oracle: move the hand straight to the (hidden) goal."""
    action = np.zeros(4, dtype=np.float32)
    action[:3] = np.clip((env.unwrapped._target_pos - obs[:3]) * 30, -1, 1)
    return action


def test_success_is_the_benchmarks_at_any_step_of_an_episode(ml1):
    """reach-v3: the oracle succeeds, standing still does not; the flag stays set, reset clears it."""
    task = {"env_name": "reach-v3", "split": "test", "variant": 0}
    envs = ml1.make_batched_env(task, 2, 120)
    obs = envs.reset([0, 1])
    assert envs.success is None  # nothing reported yet
    alive = np.ones(2, dtype=bool)
    reached = None
    for t in range(120):
        actions = np.stack([_goal_seeking(envs.envs[0], obs[0]), np.zeros(4, dtype=np.float32)])
        obs, _, _ = envs.step(actions, alive)
        if reached is None and envs.success[0]:
            reached = t
    assert reached is not None and reached < 100 and envs.success.tolist() == [True, False]
    alive[0] = False  # the oracle's episode ends; its flag stands
    envs.step(np.zeros((2, 4), dtype=np.float32), alive)
    assert envs.success.tolist() == [True, False]
    envs.reset([0, 1])
    assert envs.success.tolist() == [False, False]
    envs.close()


def test_an_episode_is_a_function_of_the_task_and_seeds_on_reused_envs(ml1):
    """Pooled instances (set_task per task, reset per episode) give what fresh envs give, and
    the same task and seeds give the same episodes."""
    cfg = load_config("ml1-reach-maml", ["inner.episodes=2", "rollout.horizon=25", "policy.hidden_sizes=[8]"])
    worker = TaskWorker(cfg, family=ml1)
    theta = worker.params_from(flatten(worker.template).numpy())
    task, other = ml1.sample_tasks(2, np.random.default_rng(0))

    def episodes(envs):
        batch = Batch(envs, np.random.default_rng(7))
        worker.sample([theta], [batch])
        envs.close()
        return batch.episodes

    first = episodes(worker.make_envs(task))
    episodes(worker.make_envs(other))  # the pool's instances now hold another goal's state
    again = episodes(worker.make_envs(task))
    fresh = episodes(EnvList([ml1.make_env(task) for _ in range(2)]))
    assert ml1._pool.built == 2, "the pool reuses its instances"
    for eps in (again, fresh):
        for name in ("obs", "actions", "rewards", "mask", "success"):
            assert torch.equal(getattr(first, name), getattr(eps, name)), name
    assert first.steps == 50 and first.success is not None


def test_the_env_pool_never_holds_more_than_was_ever_in_use_at_once():
    from metaray.tasks.metaworld import _Pool

    class Fake(gym.Env):
        closed = 0

        def close(self):
            Fake.closed += 1

    pool = _Pool()
    first = pool.acquire("a", Fake, 4) + pool.acquire("b", Fake, 2)  # 6 in use: the peak
    pool.release("a", first[:4])
    pool.release("b", first[4:])
    again = pool.acquire("a", Fake, 3)  # reused
    assert pool.built == 6 and all(any(e is f for f in first[:4]) for e in again)
    pool.release("a", again)
    for name in "cdc":  # other classes: idle instances of the rest make room
        pool.release(name, pool.acquire(name, Fake, 5))
        held = sum(len(v) for v in pool.idle.values())
        assert held <= 6 and pool.in_use == 0, (name, held)
    assert held == 6 and Fake.closed == pool.built - 6 and len(pool.idle["c"]) == 5  # what is dropped is closed


# -- the success metric on any family ----------------------------------------------------------


class _Flagged(gym.Env):
    """Reports info["success"] at step 2 only, where the task (or the seed's parity) says so."""

    observation_space = gym.spaces.Box(-1, 1, shape=(1,), dtype=np.float32)
    action_space = gym.spaces.Box(-1, 1, shape=(1,), dtype=np.float32)

    def __init__(self, succeed: str, report: bool = True) -> None:
        self.succeed, self.report, self.t, self.seed_ = succeed, report, 0, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.seed_ = 0, seed
        return np.zeros(1, dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        hit = self.t == 2 and (self.succeed == "always" or (self.succeed == "even" and self.seed_ % 2 == 0))
        info = {"success": float(hit)} if self.report else {}
        return np.zeros(1, dtype=np.float32), 0.0, False, False, info


class _FlaggedFamily:
    def sample_tasks(self, n, rng):
        return [{"succeed": "never"} for _ in range(n)]

    def make_env(self, task):
        return _Flagged(task["succeed"], report=task["succeed"] != "silent")


def test_envlist_tracks_success_at_any_step_until_reset():
    envs = EnvList([_Flagged("even") for _ in range(4)])
    envs.reset([0, 1, 2, 3])
    assert envs.success is None
    alive = np.array([True, True, True, False])  # env 3's episode ended: it is never stepped
    flags = []
    for _ in range(4):
        envs.step(np.zeros((4, 1), dtype=np.float32), alive)
        flags.append(envs.success.tolist())
    assert flags[0] == [False] * 4 and flags[1:] == [[True, False, True, False]] * 3
    envs.reset([1, 1, 1, 1])
    assert envs.success.tolist() == [False] * 4
    silent = EnvList([_Flagged("always", report=False)])
    silent.reset([0])
    silent.step(np.zeros((1, 1), dtype=np.float32), np.ones(1, dtype=bool))
    assert silent.success is None


def test_success_reaches_episodes_task_results_and_held_out_evaluation():
    cfg = load_config("quickstart", ["inner.episodes=4", "rollout.horizon=5", "policy.hidden_sizes=[4]"])
    worker = TaskWorker(cfg, family=_FlaggedFamily())
    flat = flatten(worker.template).numpy()
    # Episodes: one flag per episode, from the env's own seeds
    envs = worker.make_envs({"succeed": "even"})
    batch = Batch(envs, np.random.default_rng(0))
    worker.sample([worker.params_from(flat)], [batch])
    expected = [float(s % 2 == 0) for s in batch.env_seeds]
    assert batch.episodes.success.tolist() == expected and 0 < sum(expected) < 4
    assert batch.episodes.success_rate == pytest.approx(np.mean(expected))
    # TaskResult: the rates before and after adaptation; NaN where the env reports none
    jobs = [(i, {"succeed": s}, np.random.SeedSequence(i)) for i, s in enumerate(["always", "never", "silent"])]
    results = worker.run_tasks(flat, jobs)
    assert [(r.pre_success, r.post_success) for r in results[:2]] == [(1.0, 1.0), (0.0, 0.0)]
    assert math.isnan(results[2].pre_success) and math.isnan(results[2].post_success)
    # held-out evaluation: one rate per adaptation step, NaN where the family reports none
    evals = {s: worker.evaluate(flat, {"succeed": s}, 2, np.random.SeedSequence(0)) for s in ("always", "silent")}
    assert evals["always"][2] == [1.0, 1.0, 1.0] and all(math.isnan(v) for v in evals["silent"][2])
    result = EvalResult(np.array([evals["always"][0]]), np.array([evals["always"][1]]), [{"succeed": "always"}],
                        np.array([evals["always"][2]]))
    assert result.to_json()["mean_success"] == [1.0, 1.0, 1.0] and [r["success"] for r in result.rows("m")] == [1.0] * 3
    silent = EvalResult(np.array([evals["silent"][0]]), np.array([evals["silent"][1]]), [{"succeed": "silent"}])
    assert "mean_success" not in silent.to_json() and math.isnan(silent.rows("m")[0]["success"])


# -- a shipped preset through the CLI ---------------------------------------------------------


def test_ml1_preset_trains_and_records_success_rates(ray_address, tmp_path: Path):
    """ml1-reach-maml shrunk to fit CI: real Meta-World rollouts, TRPO; success in every table."""
    from metaray.evaluation.report import report
    from metaray.training.run_dir import RunDir, read_rows

    out = tmp_path / "run"
    proc = run_cli("train", "ml1-reach-maml", "-s", "outer.iterations=2", "-s", "outer.meta_batch_size=2",
                   "-s", "inner.episodes=2", "-s", "rollout.horizon=20", "-s", "policy.hidden_sizes=[16]",
                   "-s", "eval.tasks=2", "-s", "eval.steps=1", "--output", str(out), "--address", ray_address)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "iter    2/2" in proc.stdout and "success 0.00/0.00" in proc.stdout, proc.stdout
    run = RunDir(out)
    metrics, tasks = run.read_metrics(), read_rows(run.tasks_path)
    assert [r["pre_success_rate"] for r in metrics] == [0.0, 0.0]  # 20 random steps never reach the goal
    assert all(r["post_success_rate"] == 0.0 for r in metrics)
    assert {t["task_split"] for t in tasks} == {"train"} and all(t["pre_success_rate"] == 0.0 for t in tasks)
    evals = pq.read_table(out / "eval.parquet").to_pylist()
    assert len(evals) == 4 and all(r["success"] == 0.0 for r in evals)
    assert {json.loads(r["task"])["split"] for r in evals} == {"test"}, "held out: the test goals"
    assert [Path(p).name for p in report(run)] == ["learning_curve.png", "adaptation_curve.png",
                                                  "success_curve.png"]
