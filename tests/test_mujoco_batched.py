"""The locomotion families' batched MuJoCo dynamics against their gymnasium envs.

Exact equality throughout: the batched env takes the same MuJoCo steps on the same model
and computes observations, rewards and ends with gymnasium's float operations in its
order, so any difference is a bug, not rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metaray.bench.speed import mj_step_meter
from metaray.config import load_config
from metaray.core.rollout import collect
from metaray.core.task_worker import TaskWorker
from metaray.tasks import make_family
from metaray.tasks.batched import EnvList
from metaray.tasks.mujoco_batched import BatchedLocomotion


def _policy_like_actions(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """What an untrained Gaussian policy sends after the rollout's clipping: N(0, 1) in
    [-1, 1], float32. Large enough that Ants flip and their episodes end."""
    return np.clip(rng.normal(0.0, 1.0, size=(n, dim)), -1, 1).astype(np.float32)


def _run_both(name: str, task: dict, n: int, horizon: int, seeds: list[int]) -> np.ndarray:
    """Step the family's gymnasium envs and its batched env side by side; assert every
    observation, reward and end equal, and finished episodes frozen. Returns each
    episode's length."""
    family = make_family(name, {})
    reference = EnvList([family.make_env(task) for _ in range(n)])
    fast = family.make_batched_env(task, n, horizon)
    assert isinstance(fast, BatchedLocomotion)
    first = fast.reset(seeds)
    assert first.dtype == np.float64 and np.array_equal(reference.reset(seeds), first)
    dim = reference.envs[0].action_space.shape[0]
    rng = np.random.default_rng(7)
    alive = np.ones(n, dtype=bool)
    lengths = np.full(n, horizon)
    last_obs = first
    for t in range(horizon):
        actions = _policy_like_actions(rng, n, dim)
        ref_obs, ref_rew, ref_done = reference.step(actions, alive)
        obs, rew, done = fast.step(actions, alive)
        assert np.array_equal(ref_obs[alive], obs[alive]), f"observations differ at step {t}"
        assert np.array_equal(ref_rew[alive], rew[alive]), f"rewards differ at step {t}"
        assert np.array_equal(ref_done[alive], done[alive]), f"ends differ at step {t}"
        # Finished episodes are frozen: same observation, no reward, no new end.
        assert np.array_equal(obs[~alive], last_obs[~alive])
        assert not rew[~alive].any() and not done[~alive].any()
        lengths[alive & done] = t + 1
        alive &= ~done
        last_obs = obs
        if not alive.any():
            break
    return lengths


@pytest.mark.parametrize("name,task", [("halfcheetah-vel", {"velocity": 1.3}), ("halfcheetah-dir", {"direction": -1})])
def test_halfcheetah_equals_gymnasium_to_its_time_limit(name, task):
    """A whole gymnasium episode: 1000 steps, where gym.make's TimeLimit ends it."""
    lengths = _run_both(name, task, n=3, horizon=1001, seeds=[11, 12, 13])
    assert lengths.tolist() == [1000, 1000, 1000]


def test_ant_equals_gymnasium_through_its_terminations():
    """Episodes that end when the Ant is unhealthy, at different steps, while others go on."""
    lengths = _run_both("ant-dir", {"direction": 1}, n=8, horizon=200, seeds=list(range(100, 108)))
    assert (lengths < 200).sum() >= 3, "too few Ants fell: terminations went untested"
    assert len(set(lengths.tolist())) >= 3, "episodes should end at different steps"


@pytest.mark.parametrize("name", ["halfcheetah-vel", "ant-dir"])
def test_reset_with_the_same_seeds_reproduces_the_episodes(name):
    family = make_family(name, {})
    task = family.sample_tasks(1, np.random.default_rng(0))[0]
    env = family.make_batched_env(task, 4, 50)
    dim = env.physics.model.nu

    def episode(seeds: list[int]) -> list[np.ndarray]:
        rng = np.random.default_rng(3)
        out = [env.reset(seeds)]
        alive = np.ones(4, dtype=bool)
        for _ in range(30):
            obs, rew, done = env.step(_policy_like_actions(rng, 4, dim), alive)
            out += [obs, rew, done]
            alive &= ~done
        return out

    first = episode([1, 2, 3, 4])
    assert not np.array_equal(first[0][0], first[0][1]), "different seeds start from different states"
    again = episode([1, 2, 3, 4])
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    other = episode([5, 2, 3, 4])
    assert not np.array_equal(other[0][0], first[0][0]) and np.array_equal(other[0][1:], first[0][1:])


def test_the_worker_samples_the_same_episodes_as_with_gymnasium_envs():
    """End to end: the rollout on the batched env gives the episodes it gives on EnvList."""
    config = load_config("halfcheetah-vel", ["inner.episodes=5", "rollout.horizon=60",
                                             "policy.hidden_sizes=[16,16]"])
    worker = TaskWorker(config)
    task = worker.family.sample_tasks(1, np.random.default_rng(0))[0]
    batched = worker.make_envs(task)
    assert isinstance(batched, BatchedLocomotion)
    reference = EnvList([worker.make_env(task) for _ in range(5)])
    seeds = [21, 22, 23, 24, 25]
    params = {k: v.detach() for k, v in worker.template.items()}
    fast = collect(worker.policy, params, batched, 60, seeds, torch.Generator().manual_seed(4))
    slow = collect(worker.policy, params, reference, 60, seeds, torch.Generator().manual_seed(4))
    for field in ("obs", "actions", "rewards", "mask", "log_probs"):
        assert torch.equal(getattr(fast, field), getattr(slow, field)), field
    assert fast.steps == 5 * 60


def test_only_halfcheetah_and_ant_are_batched():
    """Physics is read off HalfCheetah-v5 / Ant-v5 envs; any other env is refused, not guessed."""
    import gymnasium as gym

    from metaray.tasks.mujoco_batched import Physics

    with pytest.raises(TypeError, match="Hopper"):
        Physics.from_env(gym.make("Hopper-v5"))


@pytest.mark.parametrize("env_id", ["HalfCheetah-v5", "Ant-v5"])
def test_mj_step_meter_measures(env_id):
    """At least one whole episode a turn however short the turn, and the time it took."""
    meter = mj_step_meter(env_id, horizon=7)
    for _ in range(2):
        steps, seconds = meter(0.0)
        assert steps == 7 and seconds > 0
