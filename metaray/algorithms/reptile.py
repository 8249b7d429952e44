"""Reptile (Nichol et al. 2018): move the meta-parameters towards the adapted ones."""

from __future__ import annotations

import torch

from metaray.algorithms.adapt import adapt
from metaray.algorithms.maml import LossFn, leaf_params
from metaray.core.policy import Params, flatten


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
