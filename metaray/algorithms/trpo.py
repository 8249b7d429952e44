"""TRPO's outer step: conjugate gradient on Fisher-vector products, then a line search.

The step only sees callbacks, so the products and the candidate losses can be computed
wherever the episodes live (on the workers) and never travel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


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
