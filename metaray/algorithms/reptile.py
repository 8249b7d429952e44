"""Reptile (Nichol et al. 2018): move the meta-parameters towards the adapted ones.

The worker half returns phi - theta; the learner half hands theta - phi (a pseudo-gradient)
to an ordinary torch optimizer, so SGD at lr eps is theta += eps * mean(phi - theta) and
Adam and schedules come for free.
"""

from __future__ import annotations

from typing import Any

import torch

from metaray.algorithms.adapt import adapt, leaf_params
from metaray.algorithms.base import Algorithm, OuterContext, TaskUpdate
from metaray.algorithms.maml import LossFn
from metaray.core.policy import Params, flatten
from metaray.core.rollout import Episodes


def reptile_delta(params: Params, inner_losses: list[LossFn], lr: float) -> tuple[torch.Tensor, Params]:
    """(flat phi - theta, phi) after one plain SGD step per loss function."""
    phi = params
    for loss_fn in inner_losses:
        phi = adapt(leaf_params(phi), [loss_fn], lr, create_graph=False)
    phi = {k: v.detach() for k, v in phi.items()}
    return flatten(phi) - flatten(params), phi


def pseudo_gradient(mean_delta: torch.Tensor) -> torch.Tensor:
    """theta - phi: with SGD at lr eps the outer step is theta += eps * (phi - theta)."""
    return -mean_delta


class Reptile(Algorithm):
    post_batch_for_metrics_only = True

    @property
    def samples_post_batch(self) -> bool:
        """Reptile trains on its inner batches only; a batch at phi just measures the
        post-adaptation return (outer.reptile.post_batch), so it is off by default."""
        return self.config.outer.reptile.post_batch

    def task_update(self, theta: Params, inner: list[Episodes], valid: Episodes | None) -> TaskUpdate:
        delta, _ = reptile_delta(theta, self.inner_losses(inner), self.lr)
        return TaskUpdate(delta)

    def outer_step(self, outer: OuterContext, mean: torch.Tensor) -> dict[str, Any]:
        return super().outer_step(outer, pseudo_gradient(mean))
