"""The inner-loop primitive: one gradient step on a loss, as a value.

It knows nothing of sampling or distribution. With ``create_graph`` the step stays
differentiable, which is what makes MAML's meta-gradient second order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from metaray.core.policy import Params


def leaf_params(params: Params) -> Params:
    """Detached copies that require grad: the start of a differentiable computation."""
    return OrderedDict((k, v.detach().clone().requires_grad_(True)) for k, v in params.items())


def inner_step(params: Params, loss: torch.Tensor, lr: float, create_graph: bool) -> Params:
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
    return OrderedDict((name, p - lr * g) for (name, p), g in zip(params.items(), grads))


def adapt(
    params: Params,
    losses: list[Callable[[Params], torch.Tensor]],
    lr: float,
    create_graph: bool,
) -> Params:
    """Apply one inner step per loss function, in order (losses[k] sees the k-th params)."""
    for loss_fn in losses:
        params = inner_step(params, loss_fn(params), lr, create_graph)
    return params
