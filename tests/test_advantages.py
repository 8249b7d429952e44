"""``discounted_sum``, ``fit_baseline`` and ``compute_advantages`` against plain per-episode loops.

The references here are written independently of the vectorised code: a backwards recursion
over each episode's own steps (its length read from the mask), and the linear feature baseline
as a ridge regression solved with numpy. Batches are built by hand from random data, in float64,
with episodes of different lengths, and with junk past each episode's end, which must not leak.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metaray.core.advantages import compute_advantages, discounted_sum, fit_baseline
from metaray.core.rollout import Episodes

T, N, OBS_DIM = 23, 7, 3
GAMMAS = [0.0, 0.5, 0.9, 0.99, 1.0]
LAMBDAS = [0.0, 0.3, 0.95, 1.0]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lengths_for(seed: int) -> list[int]:
    """Episode lengths in [1, T]: always one full-horizon and one single-step episode."""
    rng = np.random.default_rng(seed)
    return [T, 1, *rng.integers(1, T + 1, size=N - 2).tolist()]


def make_episodes(seed: int, junk: bool = False) -> Episodes:
    """Random padded episodes; with ``junk``, large values past each episode's end instead of zeros."""
    rng = np.random.default_rng(seed)
    lengths = lengths_for(seed)
    mask = np.zeros((T, N))
    for n, length in enumerate(lengths):
        mask[:length, n] = 1.0
    obs = rng.normal(size=(T, N, OBS_DIM))
    rewards = rng.normal(size=(T, N)) + 0.5
    if junk:
        pad = mask == 0
        rewards[pad] = rng.uniform(1e3, 1e4, size=pad.sum())
        obs[pad] = rng.uniform(-50, 50, size=(pad.sum(), OBS_DIM))
    else:
        rewards *= mask
        obs *= mask[..., None]
    return Episodes(
        obs=torch.from_numpy(obs),
        actions=torch.from_numpy(rng.integers(0, 4, size=(T, N))),
        rewards=torch.from_numpy(rewards),
        mask=torch.from_numpy(mask),
    )


def episode_lengths(mask: np.ndarray) -> list[int]:
    lengths = mask.sum(0).astype(int).tolist()
    for n, length in enumerate(lengths):  # padding is a suffix: the mask is 1 then 0
        assert (mask[:length, n] == 1).all() and (mask[length:, n] == 0).all()
    return lengths


# -- plain references -----------------------------------------------------------------------------


def ref_discounted_sum(values: np.ndarray, mask: np.ndarray, discount: float) -> np.ndarray:
    out = np.zeros_like(values)
    for n, length in enumerate(episode_lengths(mask)):
        acc = 0.0
        for t in reversed(range(length)):
            acc = values[t, n] + discount * acc
            out[t, n] = acc
    return out


def ref_baseline(obs: np.ndarray, rewards: np.ndarray, mask: np.ndarray, gamma: float) -> np.ndarray:
    """Duan et al.'s linear feature baseline: ridge regression (1e-5) of returns on features of (obs, t)."""
    rows, targets, where = [], [], []
    returns = ref_discounted_sum(rewards, mask, gamma)
    for n, length in enumerate(episode_lengths(mask)):
        for t in range(length):
            s = t / 100.0
            rows.append(np.concatenate([obs[t, n], obs[t, n] ** 2, [s, s**2, s**3, 1.0]]))
            targets.append(returns[t, n])
            where.append((t, n))
    x, y = np.array(rows), np.array(targets)
    weights = np.linalg.solve(x.T @ x + 1e-5 * np.eye(x.shape[1]), x.T @ y)
    out = np.zeros_like(rewards)
    for (t, n), value in zip(where, x @ weights):
        out[t, n] = value
    return out


def ref_gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float,
            normalize: bool) -> np.ndarray:
    adv = np.zeros_like(rewards)
    for n, length in enumerate(episode_lengths(mask)):
        running = 0.0
        for t in reversed(range(length)):
            next_value = values[t + 1, n] if t + 1 < length else 0.0  # the episode's end is terminal
            delta = rewards[t, n] + gamma * next_value - values[t, n]
            running = delta + gamma * lam * running
            adv[t, n] = running
    if normalize:
        valid = [adv[t, n] for n, length in enumerate(episode_lengths(mask)) for t in range(length)]
        mean, std = np.mean(valid), np.std(valid)
        for n, length in enumerate(episode_lengths(mask)):
            adv[:length, n] = (adv[:length, n] - mean) / (std + 1e-8)
    return adv


def np64(t: torch.Tensor) -> np.ndarray:
    assert t.dtype == torch.float64
    return t.numpy()


# -- discounted_sum ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("discount", [*GAMMAS, 0.3 * 0.95])
def test_discounted_sum_matches_a_backwards_loop(seed, discount):
    eps = make_episodes(seed)
    values = torch.from_numpy(np.random.default_rng(seed + 100).normal(size=(T, N))) * eps.mask
    got = discounted_sum(values, eps.mask, discount)
    want = ref_discounted_sum(values.numpy(), eps.mask.numpy(), discount)
    np.testing.assert_allclose(np64(got), want, rtol=1e-12, atol=1e-12)


def test_discounted_sum_special_discounts():
    eps = make_episodes(7)
    v, m = eps.rewards, eps.mask
    torch.testing.assert_close(discounted_sum(v, m, 0.0), v * m, rtol=0, atol=0)
    reverse_cumsum = torch.flip(torch.cumsum(torch.flip(v * m, [0]), 0), [0]) * m
    torch.testing.assert_close(discounted_sum(v, m, 1.0), reverse_cumsum, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("discount", [0.5, 0.99, 1.0])
def test_discounted_sum_never_crosses_an_episode_end(discount):
    clean, junk = make_episodes(3), make_episodes(3, junk=True)
    assert not torch.equal(clean.rewards, junk.rewards)
    got_clean = discounted_sum(clean.rewards, clean.mask, discount)
    got_junk = discounted_sum(junk.rewards, junk.mask, discount)
    torch.testing.assert_close(got_junk, got_clean, rtol=0, atol=1e-9)
    assert (got_junk[junk.mask == 0] == 0).all()
    # a reward on an episode's last step reaches back through that episode only
    v = torch.zeros(T, N, dtype=torch.float64)
    lengths = episode_lengths(clean.mask.numpy())
    for n, length in enumerate(lengths):
        v[length - 1, n] = 1.0
    out = discounted_sum(v, clean.mask, discount)
    for n, length in enumerate(lengths):
        expected = torch.tensor([discount ** (length - 1 - t) for t in range(length)], dtype=torch.float64)
        torch.testing.assert_close(out[:length, n], expected, rtol=1e-12, atol=1e-12)
        assert (out[length:, n] == 0).all()


def test_columns_are_independent():
    eps = make_episodes(5)
    whole = discounted_sum(eps.rewards, eps.mask, 0.9)
    for n in range(N):
        alone = discounted_sum(eps.rewards[:, n : n + 1], eps.mask[:, n : n + 1], 0.9)
        torch.testing.assert_close(whole[:, n : n + 1], alone, rtol=1e-13, atol=1e-13)


# -- fit_baseline -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("gamma", [0.0, 0.9, 0.99, 1.0])
def test_fit_baseline_is_the_ridge_regression_of_returns(seed, gamma):
    eps = make_episodes(seed)
    got = fit_baseline(eps, gamma)
    want = ref_baseline(eps.obs.numpy(), eps.rewards.numpy(), eps.mask.numpy(), gamma)
    np.testing.assert_allclose(np64(got), want, rtol=1e-7, atol=1e-7)
    assert (got[eps.mask == 0] == 0).all()


def test_fit_baseline_ignores_padding():
    clean, junk = make_episodes(4), make_episodes(4, junk=True)
    torch.testing.assert_close(fit_baseline(junk, 0.99), fit_baseline(clean, 0.99), rtol=1e-9, atol=1e-9)


def test_fit_baseline_does_not_depend_on_what_memory_held_before():
    """The same batch, the same bits, whatever the allocator hands back: freed blocks of nonzero
    integers (what an uninitialised pivot array would read) between fits. torch's default CPU
    lstsq driver (gelsy) fails this (14-25 different solutions in 200 fits, measured); the
    features include t, t^2, t^3 and obs^2, so the system is ill-conditioned and pivots matter."""
    eps = make_episodes(7)
    first = fit_baseline(eps, 0.99)
    for fill in range(200):
        held = [torch.full((int(size),), fill % 7 + 1, dtype=dtype)
                for size in (4, 8, 9, 16, 64) for dtype in (torch.int32, torch.int64)]
        del held
        assert torch.equal(fit_baseline(eps, 0.99), first), f"fit {fill} differs"


def test_fit_baseline_nan_for_non_finite_rewards():
    eps = make_episodes(6)
    eps.rewards[2, 0] = float("nan")
    assert torch.isnan(fit_baseline(eps, 0.99)).all()


# -- compute_advantages -----------------------------------------------------------------------------


@pytest.mark.parametrize("gae_lambda", LAMBDAS)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_gae_matches_a_backwards_loop(gamma, gae_lambda):
    for normalize in (False, True):
        eps = make_episodes(11)
        values = fit_baseline(eps, gamma).numpy()  # the baseline is checked on its own above
        out = compute_advantages(eps, gamma, gae_lambda, normalize)
        assert out is eps and eps.advantages is not None
        want = ref_gae(eps.rewards.numpy(), values, eps.mask.numpy(), gamma, gae_lambda, normalize)
        np.testing.assert_allclose(np64(eps.advantages), want, rtol=1e-10, atol=1e-10, err_msg=f"{normalize=}")
        assert (eps.advantages[eps.mask == 0] == 0).all()


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("normalize", [False, True])
def test_advantages_end_to_end_against_independent_baseline(seed, normalize):
    gamma, lam = 0.99, 0.95
    eps = make_episodes(seed)
    compute_advantages(eps, gamma, lam, normalize)
    values = ref_baseline(eps.obs.numpy(), eps.rewards.numpy(), eps.mask.numpy(), gamma)
    want = ref_gae(eps.rewards.numpy(), values, eps.mask.numpy(), gamma, lam, normalize)
    np.testing.assert_allclose(np64(eps.advantages), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.5, 0.99, 1.0])
def test_lambda_limits(gamma):
    """lambda=1: discounted return minus the baseline; lambda=0: the one-step TD error."""
    eps = make_episodes(13)
    values = fit_baseline(eps, gamma).numpy()
    rewards, mask = eps.rewards.numpy(), eps.mask.numpy()
    one = compute_advantages(make_episodes(13), gamma, 1.0, False).advantages.numpy()
    np.testing.assert_allclose(one, (ref_discounted_sum(rewards, mask, gamma) - values) * mask,
                               rtol=1e-10, atol=1e-10)
    zero = compute_advantages(make_episodes(13), gamma, 0.0, False).advantages.numpy()
    next_values = np.vstack([values[1:], np.zeros((1, N))]) * np.vstack([mask[1:], np.zeros((1, N))])
    np.testing.assert_allclose(zero, (rewards + gamma * next_values - values) * mask, rtol=1e-10, atol=1e-10)


def test_normalized_advantages_have_zero_mean_unit_std_over_real_steps():
    eps = compute_advantages(make_episodes(17), 0.99, 0.95, True)
    valid = eps.advantages[eps.mask == 1]
    assert abs(valid.mean().item()) < 1e-12
    assert valid.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("gae_lambda", [0.0, 0.95, 1.0])
def test_advantages_never_cross_an_episode_end(gae_lambda, normalize):
    """Junk rewards and observations past each episode's end change nothing, and padding stays zero."""
    clean = compute_advantages(make_episodes(19), 0.99, gae_lambda, normalize)
    junk = compute_advantages(make_episodes(19, junk=True), 0.99, gae_lambda, normalize)
    torch.testing.assert_close(junk.advantages, clean.advantages, rtol=1e-8, atol=1e-8)
    assert (junk.advantages[junk.mask == 0] == 0).all()
