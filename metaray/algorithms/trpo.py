"""TRPO as the outer optimizer of MAML and pretrain, both halves in one place.

Learner half: conjugate gradient on Fisher-vector products, then a line search
(:func:`trpo_outer_step`). It only sees callbacks, so the products and the candidate
losses are computed where the episodes live, by the worker half (:class:`TRPOTask`), and
no trajectory travels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property, reduce
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch.distributions import Distribution

from metaray.algorithms.adapt import adapt, leaf_params
from metaray.algorithms.base import Algorithm, OuterContext
from metaray.algorithms.curvature import MLPProducts, Scratch, TaskBatches, jtfj, supports
from metaray.algorithms.losses import PolicyGradientLoss, mean_kl, surrogate_loss
from metaray.core.policy import Params, Policy, unflatten
from metaray.core.rollout import Episodes

if TYPE_CHECKING:
    from metaray.config import TRPOConfig

LossFn = Callable[[Params], torch.Tensor]


class Product(Protocol):
    """A symmetric matrix kept as its product: flat v -> M v."""

    def hvp(self, v: torch.Tensor) -> torch.Tensor: ...


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int, tol: float = 1e-10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve A x = b for symmetric positive-definite A given only x -> A x; returns (x, b - A x)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r @ r
    for _ in range(iters):
        ap = matvec(p)
        alpha = rr / (p @ ap)
        x += alpha * p
        r -= alpha * ap
        rr_new = r @ r
        if rr_new < tol:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, r


@dataclass
class TRPOStep:
    params: torch.Tensor
    accepted: bool
    line_search_steps: int
    loss: float
    kl: float


def trpo_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    old_loss: float,
    hvp: Callable[[torch.Tensor], torch.Tensor],
    loss_and_kl: Callable[[torch.Tensor], tuple[float, float]],
    max_kl: float,
    cg_iters: int,
    cg_damping: float,
    ls_max_steps: int,
    ls_backtrack_ratio: float,
) -> TRPOStep:
    """One natural-gradient step on ``grad`` (a loss gradient) inside the KL ball."""
    damped = lambda v: hvp(v) + cg_damping * v  # noqa: E731
    direction, residual = conjugate_gradient(damped, grad, cg_iters)
    # d^T A d = d^T (b - r): CG's residual saves the extra product (and its round trip).
    shs = 0.5 * (direction @ (grad - residual))
    if not torch.isfinite(shs) or shs <= 0:
        return TRPOStep(params, False, 0, old_loss, 0.0)
    step = direction / torch.sqrt(shs / max_kl)
    fraction = 1.0
    for k in range(ls_max_steps):
        candidate = params - fraction * step
        loss, kl = loss_and_kl(candidate)
        if loss < old_loss and kl <= max_kl:
            return TRPOStep(candidate, True, k + 1, loss, kl)
        fraction *= ls_backtrack_ratio
    return TRPOStep(params, False, ls_max_steps, old_loss, 0.0)


class _GradientGraph:
    """A gradient kept with its graph, so Hessian-vector products cost one backward each."""

    def __init__(self, loss_fn: LossFn, at: Params) -> None:
        self.at = leaf_params(at)
        grads = torch.autograd.grad(loss_fn(self.at), list(self.at.values()), create_graph=True)
        self.grad = torch.cat([g.reshape(-1) for g in grads])

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(self.grad @ v, list(self.at.values()), retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv])


class TRPOTask:
    """Worker half: one task's episodes, kept between its gradient and the outer step.

    ``inner`` are the inner losses (none for pretrain), ``valid`` the post-adaptation
    batch with the log-probabilities recorded when it was sampled, ``phi`` the adapted
    parameters at the sampling meta-parameters theta_old. With ``subsample`` k > 1 the
    products see every k-th episode of each batch (a curvature minibatch; a user's inner loss
    other than ``pg_loss`` is used whole), at the points the whole batches give. For the
    built-in MLP policy with ``pg_loss`` inner steps the products and losses are hand-written
    (:mod:`.curvature`, about twice as fast), their temporaries in ``scratch`` (one for all the
    tasks of a worker, which answers one request at a time), and a worker computes a task
    group's together (:meth:`TRPOOuter.answer_sum`, ``group``); anything else goes through
    autograd, the tests' reference.
    """

    def __init__(self, policy: Policy, template: Params, inner: list[LossFn], lr: float, valid: Episodes,
                 phi: Params, scratch: Scratch | None = None, subsample: int = 1) -> None:
        self.policy, self.template, self.inner, self.lr, self.valid = policy, template, inner, lr, valid
        self.phi, self.dtype, self.scratch = phi, next(iter(template.values())).dtype, scratch or Scratch()
        self.curvature_inner = [replace(f, episodes=f.episodes.every(subsample))
                                if isinstance(f, PolicyGradientLoss) else f for f in inner]
        self.curvature_valid = valid.every(subsample)
        self.handwritten = supports(policy) and all(isinstance(f, PolicyGradientLoss) and f.policy is policy
                                                    for f in inner)
        self.graphs: list[Product] | None = None  # the autograd path's inner-loss Hessians, then the Fisher
        self.group: MLPProducts | None = None  # the products of the task group this task was answered in
        self.slot = -1  # and its place there

    @property
    def batches(self) -> TaskBatches:
        return TaskBatches([f.episodes for f in self.inner], self.valid, self.phi,
                           [f.episodes for f in self.curvature_inner], self.curvature_valid)

    @cached_property
    def fast(self) -> MLPProducts | None:
        """This task's hand-written products alone (None: the autograd path)."""
        if not self.handwritten:
            return None
        return MLPProducts(self.policy, self.template, self.lr, [self.batches], self.scratch)

    @cached_property
    def old_dist(self) -> Distribution:
        """The adapted policy at theta_old on the valid batch (the autograd path's; the fast one has its own)."""
        with torch.no_grad():
            return self.policy.dist(self.valid.obs, self.phi)

    @cached_property
    def curvature_old_dist(self) -> Distribution:
        """``old_dist`` on the episodes the Fisher sees."""
        if self.curvature_valid is self.valid:
            return self.old_dist
        with torch.no_grad():
            return self.policy.dist(self.curvature_valid.obs, self.phi)

    def answer(self, request: str, flat_params: np.ndarray, *args: np.ndarray) -> Any:
        if request == "hvp":
            return self.hvp(flat_params, args[0])
        if request == "loss_kl":
            return np.array(self.loss_kl(flat_params))
        raise ValueError(f"TRPO answers hvp and loss_kl, not {request!r}")

    def _flat(self, flat: np.ndarray) -> torch.Tensor:
        return torch.tensor(np.asarray(flat), dtype=self.dtype)

    def hvp(self, flat_params: np.ndarray, vector: np.ndarray) -> np.ndarray:
        """Hessian at theta_old of KL(adapted at theta_old || adapted at theta), times ``vector``.

        At theta_old the KL's gradient with respect to the adapted parameters is zero, so
        its Hessian is J^T F J: F the Fisher matrix of the adapted policy, J the Jacobian of
        the adaptation, J = (I - lr H_K) ... (I - lr H_1) with H_k the Hessian of the k-th
        inner loss (symmetric, so J^T applies the same factors in reverse). That is three
        plain Hessian-vector products for one inner step instead of a backward pass through
        a third-order graph; tests check it against finite differences of the KL gradient.

        On a curvature minibatch (``subsample`` > 1) it is J_s^T F_s J_s, every factor taken on
        the minibatch at the whole batches' points: an estimate of that Hessian, not the
        Hessian of any function. Its error in J enters twice, so on average it exceeds
        J^T F_s J by lr^2 E[dH F_s dH] (positive semi-definite): the step it scales to max_kl
        is, if anything, shorter than the exact one.
        """
        if self.fast is not None:
            return self.fast.hvp(flat_params, torch.tensor(np.asarray(vector)))[0].detach().numpy()
        if self.graphs is None:  # built once per task and iteration, at theta_old
            self.graphs = self._graphs(self._flat(flat_params))
        return jtfj(self.graphs, self.lr, self._flat(vector)).detach().numpy()

    def _graphs(self, theta: torch.Tensor) -> list[Product]:
        """The autograd products: gradients kept with their graphs, each step of the adaptation taken
        on the whole batch."""
        params, graphs = unflatten(theta, self.template), []
        for loss, curvature in zip(self.inner, self.curvature_inner):
            graphs.append(_GradientGraph(curvature, params))
            params = adapt(leaf_params(params), [loss], self.lr, create_graph=False)
        kl = lambda phi: mean_kl(self.policy, phi, self.curvature_valid, self.curvature_old_dist)  # noqa: E731
        return [*graphs, _GradientGraph(kl, params)]

    def adapted(self, theta: Params, create_graph: bool) -> Params:
        return adapt(theta, self.inner, self.lr, create_graph)

    def loss_kl(self, flat_params: np.ndarray) -> tuple[float, float]:
        """Surrogate loss and KL at candidate meta-parameters, on the kept episodes."""
        if self.fast is not None:
            with torch.no_grad():
                loss, kl = self.fast.loss_kl(self._flat(flat_params))[0].tolist()
            return loss, kl
        phi = self.adapted(leaf_params(unflatten(self._flat(flat_params), self.template)), create_graph=False)
        with torch.no_grad():
            loss = surrogate_loss(self.policy, phi, self.valid, self.valid.log_probs)
            kl = mean_kl(self.policy, phi, self.valid, self.old_dist)
        return float(loss), float(kl)


def trpo_outer_step(outer: OuterContext, grad: torch.Tensor, cfg: TRPOConfig) -> dict[str, Any]:
    """Learner half: the natural-gradient step, products and losses averaged over the tasks."""
    params = outer.params.detach()

    def hvp(vector: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(outer.ask_mean("hvp", params.numpy(), vector.numpy()))

    def loss_and_kl(candidate: torch.Tensor) -> tuple[float, float]:
        loss, kl = outer.ask_mean("loss_kl", candidate.numpy())
        return float(loss), float(kl)

    result = trpo_step(params, grad, float(np.mean(outer.losses)), hvp, loss_and_kl, cfg.max_kl, cfg.cg_iters,
                       cfg.cg_damping, cfg.ls_max_steps, cfg.ls_backtrack_ratio)
    with torch.no_grad():
        outer.params.copy_(result.params)
    return {"grad_norm": float(grad.norm()), "trpo_accepted": result.accepted,
            "trpo_ls_steps": result.line_search_steps, "trpo_kl": result.kl}


class TRPOOuter(Algorithm):
    """An algorithm whose outer optimizer may be TRPO: it keeps a :class:`TRPOTask` per task."""

    outer_optimizers = ("adam", "sgd", "trpo")

    def keep(self, inner: list[LossFn], valid: Episodes, phi: Params) -> TRPOTask | None:
        if self.config.outer.optimizer != "trpo":
            return None
        return TRPOTask(self.policy, self.template, inner, self.lr, valid, phi, self.scratch,
                        self.config.outer.trpo.curvature_subsample)

    @cached_property
    def scratch(self) -> Scratch:
        """The hand-written products' temporaries, shared by the tasks this worker keeps."""
        return Scratch()

    def answer(self, kept: TRPOTask, request: str, *args: np.ndarray) -> Any:
        return kept.answer(request, *args)

    def answer_sum(self, kept: list[Any], request: str, *args: np.ndarray) -> np.ndarray:
        """A task group's products and line-search losses computed together, one batched product per
        layer for all its tasks (the group is the unit: its sum does not depend on the worker)."""
        if request not in ("hvp", "loss_kl") or not all(isinstance(k, TRPOTask) and k.handwritten for k in kept):
            return super().answer_sum(kept, request, *args)
        group = kept[0].group
        if group is None or group.tasks != len(kept) or any(k.group is not group or k.slot != t
                                                            for t, k in enumerate(kept)):
            first = kept[0]
            group = MLPProducts(first.policy, first.template, first.lr, [k.batches for k in kept], first.scratch)
            for t, k in enumerate(kept):
                k.group, k.slot = group, t
        if request == "hvp":
            each = group.hvp(args[0], torch.tensor(np.asarray(args[1]))).detach().numpy()
        else:
            with torch.no_grad():
                each = group.loss_kl(torch.tensor(np.asarray(args[0]))).numpy().astype(np.float64)
        return reduce(np.add, each)  # in task order, as the per-task answers are summed

    def outer_step(self, outer: OuterContext, mean: torch.Tensor) -> dict[str, Any]:
        if self.config.outer.optimizer == "trpo":
            return trpo_outer_step(outer, mean, self.config.outer.trpo)
        return super().outer_step(outer, mean)
