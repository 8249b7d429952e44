"""MAML's meta-gradient (second order) and its first-order approximation (FOMAML)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from metaray.algorithms.adapt import adapt
from metaray.core.policy import Params, flatten

LossFn = Callable[[Params], torch.Tensor]


def leaf_params(params: Params) -> Params:
    return OrderedDict((k, v.detach().clone().requires_grad_(True)) for k, v in params.items())


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
