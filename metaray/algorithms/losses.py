"""Policy-gradient objectives on a batch of one task's episodes.

Every objective is a mean over every valid timestep of every episode of the task, as in
the MAML paper's reference code, so published step sizes (inner lr 0.1) carry over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributions import Distribution, kl_divergence

from metaray.core.policy import Params, Policy
from metaray.core.rollout import Episodes


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum()


def log_probs(policy: Policy, params: Params, episodes: Episodes) -> torch.Tensor:
    return policy.dist(episodes.obs, params).log_prob(episodes.actions)


def pg_loss(policy: Policy, params: Params, episodes: Episodes) -> torch.Tensor:
    """REINFORCE with advantages: the inner-loop loss."""
    return -masked_mean(log_probs(policy, params, episodes) * episodes.advantages, episodes.mask)


def surrogate_loss(policy: Policy, params: Params, episodes: Episodes, old_log_probs: torch.Tensor) -> torch.Tensor:
    """Importance-weighted loss; equals pg_loss in value of gradient where params are the sampler's."""
    ratio = torch.exp(log_probs(policy, params, episodes) - old_log_probs)
    return -masked_mean(ratio * episodes.advantages, episodes.mask)


def mean_kl(policy: Policy, params: Params, episodes: Episodes, old_dist: Distribution) -> torch.Tensor:
    """KL(old || new) averaged over the valid timesteps."""
    return masked_mean(kl_divergence(old_dist, policy.dist(episodes.obs, params)), episodes.mask)


@dataclass(frozen=True, eq=False)
class PolicyGradientLoss:
    """``pg_loss`` on one batch, as a value that says what it is: TRPO's worker half takes the
    hand-written path only for inner losses it recognises (a user's ``inner_loss`` may be anything)."""

    policy: Policy
    episodes: Episodes

    def __call__(self, params: Params) -> torch.Tensor:
        return pg_loss(self.policy, params, self.episodes)
