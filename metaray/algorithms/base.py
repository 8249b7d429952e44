"""The interface every meta-learning algorithm fills in, and the registry that names them.

An algorithm has two halves. The worker half turns one task's batches of episodes into
that task's contribution (a meta-gradient, or Reptile's delta) and may keep state on the
worker for later rounds. The learner half takes the outer step from the mean of the
contributions, and may send requests to the worker halves that keep the tasks' episodes
(TRPO's products, ProMP's further steps). Neither half knows Ray: the learner hands the
learner half an :class:`OuterContext`, and a worker calls the worker half directly.

A user's algorithm plugs in by import path, like a task family: ``algorithm: pkg.mod:Class``.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch

from metaray.algorithms.adapt import adapt
from metaray.algorithms.losses import PolicyGradientLoss, pg_loss
from metaray.core.policy import Params, Policy, SpaceSpec, build_policy, unflatten
from metaray.core.rollout import Episodes

if TYPE_CHECKING:
    from torch import nn

    from metaray.config import Config


@dataclass
class TaskUpdate:
    """What the worker half computes for one task."""

    vector: torch.Tensor  # flat, the task's contribution to the outer step
    loss: float = float("nan")  # the task's outer loss, for metrics (and TRPO's line search)
    kept: Any = None  # kept on the worker, keyed by (iteration, task), for the learner half's requests


class OuterContext(Protocol):
    """What the learner gives an algorithm's learner half for one outer step."""

    params: torch.nn.Parameter  # the flat meta-parameters, updated in place
    losses: list[float]  # the counted tasks' outer losses, in task order
    rejected: int  # non-finite answers so far this iteration; add the ones the algorithm drops

    def apply(self, gradient: torch.Tensor) -> None:
        """One step of the configured torch optimizer (outer.optimizer adam or sgd)."""

    def ask(self, request: str, *args: np.ndarray) -> list[Any]:
        """``worker_half.answer(kept, request, *args)`` for every counted task, in task order."""

    def ask_mean(self, request: str, *args: np.ndarray) -> np.ndarray:
        """The mean over the counted tasks of answers that are arrays of one shape, summed on the
        workers (one vector per task group comes back), for requests asked many times a step."""


def finite_mean(outer: OuterContext, parts: list[np.ndarray], config: Config) -> torch.Tensor | None:
    """The mean of the finite answers to a gradient request, the others counted as rejected;
    None when fewer than ``resources.min_valid_fraction`` of the meta-batch answered finitely
    (take no step on them), the rule of an iteration's first step."""
    finite = [p for p in parts if np.isfinite(p).all()]
    outer.rejected += len(parts) - len(finite)  # rejected and counted like the first step's
    if len(finite) < config.resources.min_valid_fraction * config.outer.meta_batch_size:
        return None
    return torch.as_tensor(np.mean(finite, axis=0))


class Algorithm:
    """Base class: MAML's sampling scheme and a plain optimizer step; override what differs."""

    outer_optimizers: ClassVar[tuple[str, ...]] = ("adam", "sgd")
    """Values of outer.optimizer this algorithm supports (trpo needs the worker half's products)."""
    adapts_while_sampling: ClassVar[bool] = True
    """Batch k+1 is sampled at the parameters after k inner steps; False: every batch at theta."""
    post_batch_for_metrics_only: ClassVar[bool] = False
    """The post-adaptation batch is not training data (its env steps are counted apart)."""
    memory_based: ClassVar[bool] = False
    """Adapts in a recurrent policy's state over a trial of episodes (RL²), not by inner steps:
    the worker samples trials, and "adaptation step k" means the trial's k-th episode."""

    @classmethod
    def check_config(cls, config: Config) -> None:
        """Raise ValueError naming the fields when ``config`` does not fit this algorithm."""

    @classmethod
    def make_policy(cls, spec: SpaceSpec, config: Config) -> nn.Module:
        """The policy this algorithm trains; its initial weights depend only on the config's seed."""
        return build_policy(spec, config.policy, config.seed)

    @classmethod
    def no_adaptation(cls, config: Config) -> Config:
        """The config of the "pretrained" baseline: the same budget with nothing learnt to adapt."""
        return config.model_copy(update={"algorithm": "pretrain"}, deep=True)

    def __init__(self, config: Config, policy: Policy | None, template: Params | None) -> None:
        """On a worker ``policy`` and ``template`` (the parameter names and shapes) are set; the
        learner builds its instance with both None, since the learner half needs neither."""
        self.config, self.policy, self.template = config, policy, template
        self.lr = config.inner.lr

    # -- worker half ---------------------------------------------------------------------------

    @property
    def samples_post_batch(self) -> bool:
        """Whether a batch is sampled at the adapted parameters (passed as ``valid``)."""
        return True

    def inner_loss(self, params: Params, episodes: Episodes) -> torch.Tensor:
        """The adaptation objective; evaluation and the service adapt with it too."""
        return pg_loss(self.policy, params, episodes)

    def inner_losses(self, batches: Sequence[Episodes]) -> list:
        """One loss per batch. The stock loss comes as :class:`PolicyGradientLoss` values, which
        TRPO's hand-written products recognise; an overridden ``inner_loss`` as plain closures."""
        if type(self).inner_loss is Algorithm.inner_loss:
            return [PolicyGradientLoss(self.policy, b) for b in batches]
        return [lambda p, b=b: self.inner_loss(p, b) for b in batches]

    def adapt(self, params: Params, batches: Sequence[Episodes], create_graph: bool = False) -> Params:
        """One inner step per batch, in order."""
        return adapt(params, self.inner_losses(batches), self.lr, create_graph)

    def task_update(self, theta: Params, inner: list[Episodes], valid: Episodes | None) -> TaskUpdate:
        """The task's contribution from its inner batches and its post-adaptation batch."""
        raise NotImplementedError

    def answer(self, kept: Any, request: str, *args: np.ndarray) -> Any:
        """A learner-half request about a task whose state this worker kept."""
        raise ValueError(f"{type(self).__name__} answers no request {request!r}")

    def answer_sum(self, kept: list[Any], request: str, *args: np.ndarray) -> np.ndarray:
        """The in-order sum of :meth:`answer` (arrays of one shape) over a task group's kept states; an
        algorithm may compute a group's answers together."""
        return functools.reduce(np.add, (np.asarray(self.answer(k, request, *args)) for k in kept))

    def params_from(self, flat: np.ndarray | torch.Tensor) -> Params:
        return unflatten(torch.tensor(np.asarray(flat), dtype=torch.float32), self.template)

    # -- learner half --------------------------------------------------------------------------

    def outer_step(self, outer: OuterContext, mean: torch.Tensor) -> dict[str, Any]:
        """From the mean of the counted tasks' vectors; returns metrics (grad_norm at least)."""
        outer.apply(mean)
        return {"grad_norm": float(mean.norm())}


ALGORITHMS: dict[str, str] = {
    "maml": "metaray.algorithms.maml:MAML",
    "fomaml": "metaray.algorithms.maml:FOMAML",
    "reptile": "metaray.algorithms.reptile:Reptile",
    "promp": "metaray.algorithms.promp:ProMP",
    "pretrain": "metaray.algorithms.pretrain:Pretrain",
    "rl2": "metaray.algorithms.rl2:RL2",
}
"""Built-in algorithms by name; anything else is an import path ``module:Class``."""


def resolve_algorithm(name: str) -> type[Algorithm]:
    """The class named by ``name``; ValueError naming the allowed values otherwise.

    An import path is imported: a config naming one is as trusted as the Python file it names.
    """
    from metaray.limits import one_line, short_repr

    path = ALGORITHMS.get(name, name)
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"unknown algorithm {short_repr(name)}: use one of {', '.join(ALGORITHMS)} or an import "
                         "path module:Class")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except Exception as err:  # a user module may fail to import in any way: one line, exit 2
        raise ValueError(f"cannot import algorithm {short_repr(name)}: {type(err).__name__}: "
                         f"{one_line(err, 300)}") from None
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise ValueError(f"algorithm {short_repr(name)} is not a subclass of metaray.algorithms.base.Algorithm")
    return cls


def make_algorithm(config: Config, policy: Policy, template: Params) -> Algorithm:
    return resolve_algorithm(config.algorithm)(config, policy, template)
