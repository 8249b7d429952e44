"""Built-in task families: real gymnasium envs with the dynamics they claim."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from metaray.tasks import BUILTIN_FAMILIES, make_family


# Meta-World's contract has its own tests (test_metaworld.py): building ML10's tasks takes seconds.
@pytest.mark.parametrize("name", sorted(n for n in BUILTIN_FAMILIES if n != "metaworld-ml10"))
def test_family_contract(name):
    family = make_family(name, {})
    tasks = family.sample_tasks(5, np.random.default_rng(0))
    assert len(tasks) == 5
    assert tasks == family.sample_tasks(5, np.random.default_rng(0)), "tasks must depend only on the rng"
    assert json.loads(json.dumps(tasks)) == tasks, "tasks must be plain serialisable dicts"
    env = family.make_env(tasks[0])
    check_env(env, skip_render_check=True)


def test_navigation2d_matches_the_paper():
    family = make_family("navigation2d", {})
    goals = np.array([t["goal"] for t in family.sample_tasks(2000, np.random.default_rng(1))])
    assert goals.min() >= -0.5 and goals.max() <= 0.5 and abs(goals.mean()) < 0.02
    env = family.make_env({"goal": [0.3, -0.2]})
    obs, _ = env.reset(seed=0)
    assert np.allclose(obs, 0)
    obs, reward, terminated, _, _ = env.step(np.array([5.0, -5.0]))  # clipped to 0.1 per axis
    assert np.allclose(obs, [0.1, -0.1]) and not terminated
    assert reward == pytest.approx(-np.hypot(0.2, 0.1))
    env.step(np.array([0.1, -0.1]))
    _, reward, terminated, _, _ = env.step(np.array([0.1, 0.0]))
    assert terminated and reward == pytest.approx(0.0, abs=1e-6)


def test_cartpole_actuation_sign_flips_the_push():
    family = make_family("cartpole", {"spread": 0.0})
    base = family.sample_tasks(1, np.random.default_rng(0))[0]
    velocities = {}
    for sign in (1, -1):
        env = family.make_env({**base, "actuation_sign": sign})
        env.reset(seed=3)
        obs, *_ = env.step(1)
        velocities[sign] = obs[1]
    assert velocities[1] > 0 > velocities[-1]


def test_cartpole_randomises_physics_and_sign():
    tasks = make_family("cartpole", {"spread": 0.5}).sample_tasks(200, np.random.default_rng(2))
    lengths = [t["length"] for t in tasks]
    assert 0.25 <= min(lengths) and max(lengths) <= 0.75 and np.std(lengths) > 0.05
    assert {t["actuation_sign"] for t in tasks} == {-1, 1}


def test_bandit_pays_each_arm_at_its_rate():
    env = make_family("bandit", {"arms": 3}).make_env({"probs": [0.1, 0.5, 0.9]})
    env.reset(seed=0)
    rates = [np.mean([env.step(arm)[1] for _ in range(4000)]) for arm in range(3)]
    assert np.allclose(rates, [0.1, 0.5, 0.9], atol=0.03)


# Meta-World's batched env (pooled MuJoCo envs) is compared with fresh envs in test_metaworld.py, the
# locomotion families' (MuJoCo on its bindings) with gymnasium's, longer and on more cases, in test_mujoco_batched.py.
LOCOMOTION = {"halfcheetah-vel", "halfcheetah-dir", "ant-dir"}


@pytest.mark.parametrize("name", sorted(n for n, cls in BUILTIN_FAMILIES.items()
                                        if hasattr(cls, "make_batched_env") and not n.startswith("metaworld")
                                        and n not in LOCOMOTION))
def test_batched_dynamics_match_the_gymnasium_envs_step_for_step(name):
    """Speed never changes semantics: same seeds and actions, same observations, rewards, ends."""
    from metaray.tasks.batched import EnvList

    family = make_family(name, {})
    n, horizon = 16, 120
    for task in family.sample_tasks(4, np.random.default_rng(5)):
        reference = EnvList([family.make_env(task) for _ in range(n)])
        fast = family.make_batched_env(task, n, horizon)
        seeds = list(range(1000, 1000 + n))
        assert np.array_equal(reference.reset(seeds), fast.reset(seeds))
        space = reference.envs[0].action_space
        rng = np.random.default_rng(9)
        alive = np.ones(n, dtype=bool)
        steps = 0
        for _ in range(horizon):
            if isinstance(space, gym.spaces.Discrete):
                actions = rng.integers(0, space.n, size=n)
            else:
                actions = rng.normal(0, 0.15, size=(n, *space.shape)).astype(np.float32)
            ref_obs, ref_rew, ref_done = reference.step(actions, alive)
            obs, rew, done = fast.step(actions, alive)
            assert np.array_equal(ref_obs[alive], obs[alive])
            assert np.array_equal(ref_rew[alive], rew[alive])
            assert np.array_equal(ref_done[alive], done[alive])
            steps += int(alive.sum())
            alive &= ~done
            if not alive.any():
                break
        assert steps > 2 * n  # the comparison covered real trajectories


@pytest.mark.parametrize("name,env_id", [("halfcheetah-dir", "HalfCheetah-v5"), ("ant-dir", "Ant-v5")])
def test_locomotion_direction_reward_is_the_v5_reward_with_a_signed_velocity(name, env_id):
    """Forward (+1) is the v5 env's own reward (same costs); backward negates the velocity term only."""
    family = make_family(name, {})
    weight = family.ctrl_cost_weight
    reference = gym.make(env_id, ctrl_cost_weight=weight)
    forward, backward = family.make_env({"direction": 1}), family.make_env({"direction": -1})
    rng = np.random.default_rng(0)
    for env in (reference, forward, backward):
        env.reset(seed=3)
    for _ in range(30):
        action = rng.uniform(-1, 1, size=reference.action_space.shape).astype(np.float32)
        _, r_ref, term_ref, _, info = reference.step(action)
        _, r_fwd, term_fwd, _, _ = forward.step(action)
        _, r_bwd, _, _, _ = backward.step(action)
        assert r_fwd == pytest.approx(r_ref, abs=1e-9) and term_fwd == term_ref
        assert r_bwd == pytest.approx(r_ref - 2 * info["x_velocity"], abs=1e-9)
        if term_ref:
            break


def test_halfcheetah_vel_reward_is_minus_the_velocity_error_minus_control_cost():
    family = make_family("halfcheetah-vel", {})
    goals = [t["velocity"] for t in family.sample_tasks(500, np.random.default_rng(1))]
    assert 0 <= min(goals) and max(goals) <= 2 and abs(np.mean(goals) - 1) < 0.1
    env = family.make_env({"velocity": 1.5})
    env.reset(seed=0)
    action = np.full(env.action_space.shape, 0.5, dtype=np.float32)
    _, reward, _, _, info = env.step(action)
    expected = -abs(info["x_velocity"] - 1.5) - 0.05 * float(np.sum(action**2))
    assert reward == pytest.approx(expected, rel=1e-6)
