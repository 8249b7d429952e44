"""Advantages from rewards: the per-task linear feature baseline and GAE.

Both act on one task's batch of padded, time-major episodes; nothing here samples.
"""

from __future__ import annotations

import torch

from metaray.core.rollout import Episodes


def _baseline_features(episodes: Episodes) -> torch.Tensor:
    """The linear feature baseline of Duan et al. 2016, as in the MAML reference code."""
    obs = episodes.obs
    t = torch.arange(obs.shape[0], dtype=obs.dtype).view(-1, 1, 1).expand(-1, obs.shape[1], 1) / 100.0
    ones = torch.ones_like(t)
    return torch.cat([obs, obs**2, t, t**2, t**3, ones], dim=2)


def discounted_sum(values: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """out[t] = sum over s >= t of discount^(s-t) values[s], within each episode ([T, N]).

    One triangular matrix product instead of a Python loop over time; ``values`` must be
    zero past each episode's end (the mask guarantees it), so sums never cross episodes.
    """
    steps = values.shape[0]
    exponent = torch.arange(steps, dtype=values.dtype)
    powers = torch.triu(discount ** (exponent.view(1, -1) - exponent.view(-1, 1)).clamp(min=0))
    return (powers @ (values * mask)) * mask


def fit_baseline(episodes: Episodes, gamma: float) -> torch.Tensor:
    """Per-task value estimates [T, N] from a ridge regression on the episodes' returns."""
    feats = _baseline_features(episodes).to(torch.float64)
    mask = episodes.mask.to(torch.float64)
    targets = discounted_sum(episodes.rewards.to(torch.float64), mask, gamma)
    x = (feats * mask.unsqueeze(-1)).reshape(-1, feats.shape[-1])
    y = (targets * mask).reshape(-1, 1)
    xtx, xty = x.T @ x, x.T @ y
    if not (torch.isfinite(xtx).all() and torch.isfinite(xty).all()):
        # Non-finite rewards or observations: let NaN flow into the update, which the
        # learner rejects, instead of crashing the solver on the worker.
        return torch.full_like(episodes.rewards, float("nan"))
    eye = torch.eye(xtx.shape[0], dtype=torch.float64)
    reg = 1e-5
    for _ in range(5):
        # gelsd (SVD), numpy's and so the reference code's driver. Not torch's CPU default gelsy:
        # its column pivoting reads a pivot array torch leaves uninitialised, so its result
        # changed with whatever the allocator handed back (measured: 6 different solutions for
        # one system in 200 calls, and training runs of one config and seed that diverged).
        weights = torch.linalg.lstsq(xtx + reg * eye, xty, driver="gelsd").solution
        if torch.isfinite(weights).all():
            break
        reg *= 10
    else:
        weights = torch.zeros_like(xty)
    return ((feats @ weights).squeeze(-1) * mask).to(episodes.rewards.dtype)


def compute_advantages(episodes: Episodes, gamma: float, gae_lambda: float, normalize: bool) -> Episodes:
    """GAE advantages over the per-task linear baseline, stored on the batch."""
    values = fit_baseline(episodes, gamma)
    mask = episodes.mask
    next_values = torch.cat([values[1:], torch.zeros_like(values[:1])]) * torch.cat(
        [mask[1:], torch.zeros_like(mask[:1])]
    )
    deltas = episodes.rewards + gamma * next_values - values
    adv = discounted_sum(deltas, mask, gamma * gae_lambda)
    if normalize:
        count = mask.sum()
        mean = (adv * mask).sum() / count
        var = (((adv - mean) * mask) ** 2).sum() / count
        adv = (adv - mean) / (var.sqrt() + 1e-8) * mask
    episodes.advantages = adv
    return episodes
