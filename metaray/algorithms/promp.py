"""ProMP (Rothfuss et al., 2019): proximal meta-policy search.

Two changes to MAML's objective, both pure functions of episodes already sampled:

- the inner step uses the low-variance curvature (LVC) objective, the likelihood ratio
  pi_theta / pi_theta_o times the advantage, with pi_theta_o the policy that sampled the
  batch (a constant): at theta = theta_o it has the policy-gradient loss's value and
  gradient, but its Hessian drops the high-variance score-function terms, so the
  meta-gradient through the inner step has far lower variance (this is also how the
  ProMP reference code writes it, which keeps later outer steps correct off theta_o);
- the outer objective is PPO's clipped likelihood ratio on the post-adaptation episodes,
  plus a KL penalty between the pre-update policies that sampled each inner batch and the
  current ones, so several outer steps can be taken on one batch of samples.

All objectives are means over every valid timestep, like every loss in metaray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.distributions import Distribution

from metaray.algorithms.adapt import inner_step
from metaray.algorithms.base import Algorithm, OuterContext, TaskUpdate, finite_mean
from metaray.algorithms.losses import log_probs, masked_mean, mean_kl
from metaray.core.policy import Params, Policy, flatten
from metaray.core.rollout import Episodes


def lvc_loss(policy: Policy, params: Params, episodes: Episodes, sampler_log_probs: torch.Tensor) -> torch.Tensor:
    """The LVC inner objective (as a loss): -mean(pi_theta / pi_theta_o * A)."""
    ratio = torch.exp(log_probs(policy, params, episodes) - sampler_log_probs)
    return -masked_mean(ratio * episodes.advantages, episodes.mask)


def clipped_loss(policy: Policy, params: Params, episodes: Episodes, old_log_probs: torch.Tensor,
                 clip: float) -> torch.Tensor:
    """PPO's clipped surrogate (as a loss) against the policy that sampled ``episodes``."""
    ratio = torch.exp(log_probs(policy, params, episodes) - old_log_probs)
    adv = episodes.advantages
    return -masked_mean(torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv), episodes.mask)


def promp_loss(policy: Policy, theta: Params, inner: list[Episodes], inner_old: list[Distribution],
               valid: Episodes, valid_old_log_probs: torch.Tensor, lr: float, clip: float,
               kl_coef: float) -> torch.Tensor:
    """The ProMP objective of one task (as a loss), differentiable with respect to ``theta``.

    ``inner_old[k]`` is the distribution of the policy that sampled ``inner[k]`` (on its
    observations); ``valid_old_log_probs`` those of the adapted policy that sampled ``valid``.
    """
    params, kl = theta, torch.zeros(())
    for episodes, old in zip(inner, inner_old):
        kl = kl + mean_kl(policy, params, episodes, old)
        sampler_log_probs = old.log_prob(episodes.actions).detach()
        params = inner_step(params, lvc_loss(policy, params, episodes, sampler_log_probs), lr, create_graph=True)
    return clipped_loss(policy, params, valid, valid_old_log_probs, clip) + kl_coef * kl


def promp_gradient(policy: Policy, theta: Params, inner: list[Episodes], inner_old: list[Distribution],
                   valid: Episodes, valid_old_log_probs: torch.Tensor, lr: float, clip: float,
                   kl_coef: float) -> tuple[torch.Tensor, float]:
    """(flat meta-gradient, loss) of :func:`promp_loss` at ``theta``."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
    loss = promp_loss(policy, leaves, inner, inner_old, valid, valid_old_log_probs, lr, clip, kl_coef)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return flatten(dict(zip(leaves, grads))).detach(), float(loss.detach())


@dataclass
class ProMPTask:
    """A task's samples, kept on the worker for the outer steps after the first."""

    inner: list[Episodes]
    inner_old: list[Distribution]  # the policies that sampled the inner batches, on their observations
    valid: Episodes


class ProMP(Algorithm):
    """Worker half: the ProMP objective's gradient, at theta and then at the learner's current
    parameters on the same samples. Learner half: outer.promp.steps optimizer steps."""

    def _gradient(self, kept: ProMPTask, theta: Params) -> tuple[torch.Tensor, float]:
        p = self.config.outer.promp
        return promp_gradient(self.policy, theta, kept.inner, kept.inner_old, kept.valid, kept.valid.log_probs,
                              self.lr, p.clip, p.kl_coef)

    def task_update(self, theta: Params, inner: list[Episodes], valid: Episodes | None) -> TaskUpdate:
        with torch.no_grad():
            inner_old = [self.policy.dist(b.obs, b.params) for b in inner]
        kept = ProMPTask(inner, inner_old, valid)
        vector, loss = self._gradient(kept, theta)
        return TaskUpdate(vector, loss, kept)

    def answer(self, kept: ProMPTask, request: str, *args: np.ndarray) -> Any:
        if request != "gradient":
            return super().answer(kept, request, *args)
        return self._gradient(kept, self.params_from(args[0]))[0].numpy()

    def outer_step(self, outer: OuterContext, mean: torch.Tensor) -> dict[str, Any]:
        outer.apply(mean)
        for _ in range(self.config.outer.promp.steps - 1):
            parts = outer.ask("gradient", outer.params.detach().numpy().copy())
            gradient = finite_mean(outer, parts, self.config)
            if gradient is None:
                break  # too few tasks left to stand for the meta-batch: stop this batch's steps
            outer.apply(gradient)
        return {"grad_norm": float(mean.norm())}
