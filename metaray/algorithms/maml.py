"""MAML (Finn et al. 2017): the meta-gradient through the inner steps; FOMAML, its first-order
approximation. Outer optimizer adam, sgd or (MAML only, as in the paper's RL experiments) TRPO."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from metaray.algorithms.adapt import adapt, leaf_params
from metaray.algorithms.base import TaskUpdate
from metaray.algorithms.losses import surrogate_loss
from metaray.algorithms.trpo import TRPOOuter
from metaray.core.policy import Params, flatten
from metaray.core.rollout import Episodes

LossFn = Callable[[Params], torch.Tensor]


def meta_gradient(
    params: Params,
    inner_losses: list[LossFn],
    outer_loss: LossFn,
    lr: float,
    first_order: bool,
) -> tuple[torch.Tensor, torch.Tensor, Params]:
    """Gradient of ``outer_loss(adapt(params))`` with respect to ``params``.

    Second order differentiates through every inner step. First order treats the
    adapted parameters as constants and returns the outer gradient at them. Returns
    (flat gradient, outer loss value, adapted parameters detached).
    """
    theta = leaf_params(params)
    if first_order:
        phi = leaf_params(adapt(theta, inner_losses, lr, create_graph=False))
        loss = outer_loss(phi)
        grads = torch.autograd.grad(loss, list(phi.values()))
    else:
        phi = adapt(theta, inner_losses, lr, create_graph=True)
        loss = outer_loss(phi)
        grads = torch.autograd.grad(loss, list(theta.values()))
    adapted = OrderedDict((k, v.detach()) for k, v in phi.items())
    return flatten(OrderedDict(zip(theta.keys(), grads))).detach(), loss.detach(), adapted


class MAML(TRPOOuter):
    """Worker half: the meta-gradient of the post-adaptation surrogate loss (importance-weighted
    against the log-probabilities recorded at sampling). Learner half: an optimizer step, or TRPO."""

    first_order = False

    def outer_loss(self, phi: Params, valid: Episodes) -> torch.Tensor:
        return surrogate_loss(self.policy, phi, valid, valid.log_probs)

    def task_update(self, theta: Params, inner: list[Episodes], valid: Episodes | None) -> TaskUpdate:
        losses = self.inner_losses(inner)
        vector, loss, phi = meta_gradient(theta, losses, lambda p: self.outer_loss(p, valid), self.lr,
                                          self.first_order)
        return TaskUpdate(vector, float(loss), self.keep(losses, valid, phi))


class FOMAML(MAML):
    """First-order MAML: the outer gradient at the adapted parameters, as if they were constants."""

    first_order = True
    outer_optimizers = ("adam", "sgd")
