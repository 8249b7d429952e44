"""TRPO's worker-side products for the built-in MLP policy, written out by hand.

Conjugate gradient asks each task for J^T F J v about ten times per outer step (see
:meth:`metaray.algorithms.trpo.TRPOTask.hvp`). Autograd's double backward through retained
graphs spends that time on elementwise bookkeeping rather than on matrix products. Here what
does not change between rounds (activations, their derivatives, the backprop signals, the
loss's second derivatives in the outputs) is computed once per task and iteration, and a
product is only its tangent computation: Pearlmutter's R-op through the MLP.

A worker computes the tasks of a group together: every tensor has a leading task dimension
and each layer's product is one batched matrix product for all of them, rows padded to the
group's longest batch with rows of weight zero. At 2,000 rows per task a product is bound by
its matrix products and passes over memory and batching changes little; at 400 (a curvature
minibatch), where per-call overhead dominates, it cuts a round by a third, and a line-search
round by a fifth at either size (bench: ``trpo_products``). A group, not whatever a worker
holds, is batched: its tasks are fixed by the config, so its sums have the same bits on any
worker.

Only the MLP is hand-written. A loss's derivatives in the body's output (logits or means)
and the log-std come from autograd on the small [rows x outputs] graph, through
``policy.head``, so Categorical and Gaussian policies share the code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.distributions import Distribution, kl_divergence

from metaray.core.policy import Params, Policy, flatten
from metaray.core.rollout import Episodes

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # (weight [out, in], bias [out]) of each Linear
OutputLoss = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
"""A loss as a function of the body's output [rows, outputs] and the log-std [rows, act_dim]
(None for Categorical), a sum over the rows."""


def supports(policy: nn.Module) -> bool:
    """Whether ``policy`` is the built-in MLP policy: Linear, activation, ..., Linear."""
    if type(policy) is not Policy:  # a subclass may change the forward
        return False
    modules = list(policy.body)
    activations = {type(m) for m in modules[1::2]}
    return (len(modules) % 2 == 1 and all(isinstance(m, nn.Linear) for m in modules[::2])
            and (activations <= {nn.Tanh} or activations <= {nn.ReLU}))


class Scratch:
    """Buffers reused from call to call, by name and dtype, for results used only within a call. A fresh
    [2000, 64] float32 tensor costs about what the arithmetic on it costs: blocks that size go back
    to the OS when freed, and each new one is page-faulted in again (measured: the products 2-3x
    slower with fresh tensors). A name's buffer is one flat block kept at the largest size asked
    for and served as a view of the shape asked for (a batch's rows vary with where episodes end,
    a group's tasks with the config), so the memory held is bounded by the largest request, not
    by how many shapes occur."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def __call__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        size = math.prod(shape)
        buffer = self.buffers.get((name, dtype))
        if buffer is None or buffer.numel() < size:
            buffer = self.buffers[(name, dtype)] = torch.empty(size, dtype=dtype)
        return buffer[:size].view(shape)


def _out(scratch: Scratch | None, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """Where an op writes: a scratch buffer, or (None) a fresh tensor for results that are kept."""
    return None if scratch is None else scratch(name, shape, dtype)


class MLP:
    """The built-in policy's body on flat parameters with a leading task dimension ([tasks, P]):
    where each Linear's weight and bias and the log-std sit, the forward, and the activation's
    derivatives written in its output h."""

    def __init__(self, policy: Policy, template: Params) -> None:
        self.template = template
        self.linear = [(f"body.{i}.weight", f"body.{i}.bias") for i, m in enumerate(policy.body)
                       if isinstance(m, nn.Linear)]
        self.log_std = "log_std" if "log_std" in template else None
        self.tanh = not any(isinstance(m, nn.ReLU) for m in policy.body)
        self.slices, offset = {}, 0
        for name, t in template.items():
            self.slices[name] = (offset, offset + t.numel(), t.shape)
            offset += t.numel()

    def split(self, flat: torch.Tensor) -> tuple[Layers, torch.Tensor | None]:
        """Views of ``flat`` [tasks, P]: (weight [tasks, out, in], bias [tasks, out]) per Linear, and the
        log-std [tasks, 1, act_dim] (broadcasting over a batch's rows) or None."""
        part = lambda name: flat[:, self.slices[name][0]:self.slices[name][1]].view(  # noqa: E731
            len(flat), *self.slices[name][2])
        layers = [(part(w), part(b)) for w, b in self.linear]
        return layers, part(self.log_std).unsqueeze(1) if self.log_std else None

    def join(self, layers: Layers, log_std: torch.Tensor | None) -> torch.Tensor:
        parts = {name: t for names, ts in zip(self.linear, layers) for name, t in zip(names, ts)}
        if self.log_std:
            parts[self.log_std] = log_std
        return torch.cat([parts[name].reshape(len(layers[0][0]), -1) for name in self.template], 1)

    @property
    def scale(self) -> float:
        """What the forward's matrix products scale a hidden layer's pre-activation by: 2 for tanh, see
        :meth:`activate_` (scaling by 2 is exact, so a product with alpha = beta = 2 is 2a to the bit)."""
        return 2.0 if self.tanh else 1.0

    def activate_(self, a: torch.Tensor) -> torch.Tensor:
        """sigma of the pre-activation, in place, from ``scale`` times it. tanh(a) = 2 sigmoid(2a) - 1
        (within 2e-7 in float32): torch.tanh was 3.5x slower on the AMD EPYC CPU this project has
        run on (320 vs 90 us for [2000, 64] float32, one thread), and every forward pays it.
        -1 + 2 s is one pass, and the same bits as 2 s - 1 (2 s is exact)."""
        if not self.tanh:
            return a.relu_()
        return torch.add(torch.tensor(-1.0, dtype=a.dtype), a.sigmoid_(), alpha=2, out=a)

    def slope(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """sigma'(a) from h = sigma(a): 1 - h^2 for tanh, [h > 0] (= sign h) for relu."""
        return torch.mul(h, h, out=out).neg_().add_(1) if self.tanh else torch.sign(h, out=out)

    def forward(self, layers: Layers, obs: torch.Tensor, scratch: Scratch | None = None) -> list[torch.Tensor]:
        """[obs, h_1, ..., h_{L-1}, out], each [tasks, rows, width]: the input of every Linear, then the
        body's output."""
        hs = [obs]
        for k, (w, b) in enumerate(layers):
            hidden = k < len(layers) - 1
            a = _affine(hs[-1], w, b, lambda shape, k=k: _out(scratch, f"a{k}", shape, obs.dtype),
                        self.scale if hidden else 1.0)
            hs.append(self.activate_(a) if hidden else a)
        return hs


NARROW = 2
"""Outputs up to this wide are computed transposed, [tasks, out, rows]: BLAS is slow at a product whose
last dimension is that narrow ([2000, 64] @ [64, 2]: 2.4x slower than [2, 64] @ [64, 2000]; no gain
from 4 outputs on)."""


def _affine(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
            out: Callable[[tuple[int, ...]], torch.Tensor | None], scale: float = 1.0,
            plus: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """scale (h W^T + b) for each task, plus h2 W2^T for ``plus`` = (h2, W2), [tasks, rows, out] (a
    transposed view where out <= NARROW), written where ``out(shape)`` says."""
    (tasks, rows, _), width = h.shape, w.shape[1]
    if width <= NARROW:
        a = torch.baddbmm(b.unsqueeze(2), w, h.transpose(1, 2), beta=scale, alpha=scale,
                          out=out((tasks, width, rows)))
        if plus is not None:
            a.baddbmm_(plus[1], plus[0].transpose(1, 2))
        return a.transpose(1, 2)
    a = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2), beta=scale, alpha=scale, out=out((tasks, rows, width)))
    return a if plus is None else a.baddbmm_(plus[0], plus[1].transpose(1, 2))


def _outer(*pairs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The sum of delta^T h over (delta [tasks, rows, out], h [tasks, rows, in]) pairs: each task's
    weight gradient, [tasks, out, in]. Computed as (h^T delta)^T where in < out: BLAS is slow at a
    product whose last dimension is narrow (7x for the first layer, [64, 2000] @ [2000, 2])."""
    flip = pairs[0][1].shape[2] < pairs[0][0].shape[2]
    g = None
    for delta, h in pairs:
        a, b = (h, delta) if flip else (delta, h)
        g = torch.bmm(a.transpose(1, 2), b) if g is None else g.baddbmm_(a.transpose(1, 2), b)
    return g.transpose(1, 2) if flip else g


def _backward(layers: Layers, hs: list[torch.Tensor], slopes: list[torch.Tensor], g_out: torch.Tensor,
              scratch: Scratch | None = None) -> tuple[Layers, list[torch.Tensor], list[torch.Tensor]]:
    """Backprop of dloss/dout through the MLP: the layers' gradients (delta_l^T h_{l-1}, sum delta_l),
    each layer's delta_l = dloss/da_l, and e_l = dloss/dh_l of each hidden output."""
    grads: Layers = []
    deltas, es = [g_out], []
    for k in reversed(range(len(layers))):
        delta = deltas[0]
        grads.insert(0, (_outer((delta, hs[k])), delta.sum(1)))
        if k:
            es.insert(0, torch.bmm(delta, layers[k][0], out=_out(scratch, f"e{k}", hs[k].shape, delta.dtype)))
            deltas.insert(0, torch.mul(slopes[k - 1], es[0], out=_out(scratch, f"d{k}", hs[k].shape, delta.dtype)))
    return grads, deltas, es


def _output_terms(loss: OutputLoss, out: torch.Tensor, log_std: torch.Tensor | None,
                  hessian: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """dloss/dout [tasks, rows, O], dloss/dlog_std [tasks, act_dim] (None for Categorical) and, with
    ``hessian``, the second derivatives in z = (out_n, log_std) row by row, [tasks, rows, O+S, O+S].

    The loss is a sum over tasks and rows of functions of (out_n, log_std), so with the log-std
    given a copy per row its Hessian is block-diagonal: the blocks' columns are one batched double
    backward."""
    with torch.enable_grad():
        leaves = [out.detach().requires_grad_(True)]
        if log_std is not None:
            leaves.append(log_std.detach().expand(*out.shape[:2], -1).clone().requires_grad_(True))
        value = loss(leaves[0], leaves[1] if log_std is not None else None)
        grads = torch.autograd.grad(value, leaves, create_graph=hessian)
        g_s = grads[1].detach().sum(1) if log_std is not None else None
        if not hessian:
            return grads[0].detach(), g_s, None
        g = torch.cat(grads, 2)
        z = g.shape[2]
        units = torch.eye(z, dtype=g.dtype).view(z, 1, 1, z).expand(-1, *g.shape[:2], -1)  # column j: e_j per row
        cols = torch.autograd.grad(g, leaves, units, is_grads_batched=True, materialize_grads=True)
    return grads[0].detach(), g_s, torch.cat(cols, 3).permute(1, 2, 0, 3).contiguous().detach()


def gradient(mlp: MLP, flat: torch.Tensor, obs: torch.Tensor, loss: OutputLoss,
             scratch: Scratch) -> torch.Tensor:
    """Each task's flat gradient of ``loss`` of the policy's outputs on ``obs``, at ``flat`` [tasks, P]."""
    layers, log_std = mlp.split(flat)
    hs = mlp.forward(layers, obs, scratch)
    g_out, g_s, _ = _output_terms(loss, hs[-1], log_std, hessian=False)
    slopes = [mlp.slope(h, scratch(f"s{k}", h.shape, h.dtype)) for k, h in enumerate(hs[1:-1])]
    grads, _, _ = _backward(layers, hs, slopes, g_out, scratch)
    return mlp.join(grads, g_s)


class Curvature:
    """The Hessian of a loss of the outputs on a batch, at one point, as a product v -> H v.

    R-op, with R(x) = d/de x(theta + e v):
      forward   R a_l = R h_{l-1} W_l^T + h_{l-1} dW_l^T + db_l,  R h_l = sigma'_l R a_l
      output    R delta_L = H_out (R out, dlog_std), the log-std's product its other rows
      backward  R dW_l = R delta_l^T h_{l-1} + delta_l^T R h_{l-1},  R db_l = sum R delta_l,
                R delta_{l-1} = sigma'_{l-1} (R delta_l W_l + delta_l dW_l) + sigma''_{l-1} R a_{l-1} e_{l-1}
    ``exact=False`` drops the delta terms: the Gauss-Newton product J^T H_out J, the exact
    Hessian where dloss/dout is zero (a KL at its minimum: the Fisher matrix at phi_old).
    Everything but the tangents is computed here, once; the tangents go to ``scratch``.
    """

    def __init__(self, mlp: MLP, flat: torch.Tensor, obs: torch.Tensor, loss: OutputLoss, exact: bool,
                 scratch: Scratch) -> None:
        self.mlp, self.exact, self.scratch = mlp, exact, scratch
        self.layers, log_std = mlp.split(flat)
        self.hs = mlp.forward(self.layers, obs)
        self.slopes = [mlp.slope(h) for h in self.hs[1:-1]]
        g_out, g_s, self.h_out = _output_terms(loss, self.hs[-1], log_std, hessian=True)
        self.grad = None
        if exact:
            grads, self.deltas, es = _backward(self.layers, self.hs, self.slopes, g_out)
            self.grad = mlp.join(grads, g_s)
            # sigma'' e, with sigma'' = -2 h (1 - h^2), written over e (needed no more)
            self.curls = [e.mul_(h).mul_(s).mul_(-2) if mlp.tanh else None
                          for h, s, e in zip(self.hs[1:-1], self.slopes, es)]

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H v for each task, v [tasks, P]."""
        dlayers, dlog_std = self.mlp.split(v)
        last, (tasks, rows), dtype = len(self.layers) - 1, self.hs[0].shape[:2], v.dtype
        ra, rh = [], [None]  # R a_l; R h_l (R of the observations: none)
        for k, ((w, _), (dw, db)) in enumerate(zip(self.layers, dlayers)):
            a = _affine(self.hs[k], dw, db, lambda shape, k=k: self.scratch(f"ra{k}", shape, dtype),
                        plus=(rh[k], w) if k else None)
            ra.append(a)
            if k < last:
                rh.append(torch.mul(self.slopes[k], a, out=self.scratch(f"rh{k}", a.shape, dtype)))
        outputs = ra[-1].shape[2]
        z = ra[-1] if dlog_std is None else torch.cat([ra[-1], dlog_std.expand(-1, rows, -1)], 2)
        hz = torch.bmm(self.h_out.view(tasks * rows, *self.h_out.shape[2:]), z.reshape(tasks * rows, -1, 1))
        hz = hz.view(tasks, rows, -1)
        rdelta, grads = hz[:, :, :outputs], []
        for k in reversed(range(len(self.layers))):
            pairs = [(rdelta, self.hs[k])] + ([(self.deltas[k], rh[k])] if self.exact and k else [])
            grads.insert(0, (_outer(*pairs), rdelta.sum(1)))
            if k:
                re = torch.bmm(rdelta, self.layers[k][0], out=self.scratch(f"re{k}", self.hs[k].shape, dtype))
                if self.exact:
                    re.baddbmm_(self.deltas[k], dlayers[k][0])
                rdelta = re.mul_(self.slopes[k - 1])
                if self.exact and self.curls[k - 1] is not None:
                    rdelta.addcmul_(self.curls[k - 1], ra[k - 1])
        return self.mlp.join(grads, None if dlog_std is None else hz[:, :, outputs:].sum(1))


def _steps(t: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor | None:
    """A batch's [T, N, ...] field as rows [T * N, ...], only those ``keep`` marks. None keeps all
    without indexing: a boolean index is a ``nonzero`` and a gather copy for every field, which
    took half the rows' set-up where no episode ends early (7 -> 3 ms a worker's first round)."""
    if t is None:
        return None
    t = t.flatten(0, 1)
    return t if keep is None else t[keep]


@dataclass
class Rows:
    """Each task's batch as rows [tasks, rows, ...]: a batch's padding steps dropped and the tasks'
    rows padded to the longest with rows of weight zero (they add exact zeros to every sum);
    ``weights`` are each task's masked mean's, so a loss is a weighted sum over the rows."""

    obs: torch.Tensor
    actions: torch.Tensor
    advantages: torch.Tensor
    weights: torch.Tensor
    log_probs: torch.Tensor | None

    @classmethod
    def of(cls, batches: list[Episodes]) -> Rows:
        kept = []
        for episodes in batches:
            mask = episodes.mask.reshape(-1)
            keep = None if bool(mask.all()) else mask != 0
            kept.append((_steps(episodes.obs, keep), _steps(episodes.actions, keep),
                         _steps(episodes.advantages, keep), (mask if keep is None else mask[keep]) / mask.sum(),
                         _steps(episodes.log_probs, keep)))
        longest = max(len(k[0]) for k in kept)

        def stack(field: int) -> torch.Tensor | None:
            parts = [k[field] for k in kept]
            if parts[0] is None:
                return None
            out = parts[0].new_zeros((len(parts), longest, *parts[0].shape[1:]))
            for t, part in enumerate(parts):
                out[t, :len(part)] = part
            return out

        return cls(*(stack(i) for i in range(5)))


@dataclass
class TaskBatches:
    """What TRPO keeps of one task for its products: the inner batches, the post-adaptation batch,
    the adapted parameters at theta_old, and the batches the products see (the same objects
    where they see every episode)."""

    inner: list[Episodes]
    valid: Episodes
    phi: Params
    curvature_inner: list[Episodes]
    curvature_valid: Episodes


class MLPProducts:
    """The hand-written counterpart of TRPOTask's autograd products, for the built-in policy with
    ``pg_loss`` inner steps, for one task or for several (a worker's task group) computed together:
    the same J^T F J (on the curvature batches), the same surrogate loss and KL, each task's."""

    def __init__(self, policy: Policy, template: Params, lr: float, tasks: list[TaskBatches],
                 scratch: Scratch) -> None:
        self.mlp, self.head, self.lr, self.scratch = MLP(policy, template), policy.head, lr, scratch
        steps = len(tasks[0].inner)
        self.inner = [Rows.of([t.inner[i] for t in tasks]) for i in range(steps)]
        self.valid = Rows.of([t.valid for t in tasks])
        whole = lambda i: all(t.curvature_inner[i] is t.inner[i] for t in tasks)  # noqa: E731
        self.curvature_inner = [self.inner[i] if whole(i) else Rows.of([t.curvature_inner[i] for t in tasks])
                                for i in range(steps)]
        same = all(t.curvature_valid is t.valid for t in tasks)
        self.curvature_valid = self.valid if same else Rows.of([t.curvature_valid for t in tasks])
        dtype = self.valid.obs.dtype
        self.phi = torch.stack([flatten(t.phi).to(dtype) for t in tasks])
        layers, log_std = self.mlp.split(self.phi)
        with torch.no_grad():
            self.old = policy.head(self.mlp.forward(layers, self.valid.obs)[-1], log_std)
            self.curvature_old = self.old if same else \
                policy.head(self.mlp.forward(layers, self.curvature_valid.obs)[-1], log_std)
        self.tasks, self.products_at = len(tasks), None
        self.products: list[Curvature] | None = None

    def pg_loss(self, rows: Rows) -> OutputLoss:
        """``losses.pg_loss`` on the rows, as a function of the outputs (summed over the tasks)."""
        def loss(out: torch.Tensor, log_std: torch.Tensor | None) -> torch.Tensor:
            return -(rows.weights * rows.advantages * self.head(out, log_std).log_prob(rows.actions)).sum()
        return loss

    def kl(self, dist: Distribution, curvature: bool = False) -> torch.Tensor:
        """``losses.mean_kl`` of each task, on the valid rows (``curvature``: on those the Fisher sees)."""
        rows, old = (self.curvature_valid, self.curvature_old) if curvature else (self.valid, self.old)
        return (rows.weights * kl_divergence(old, dist)).sum(1)

    def _theta(self, theta: torch.Tensor) -> torch.Tensor:
        return theta.to(self.valid.obs.dtype).expand(self.tasks, -1).contiguous()

    def build(self, theta: torch.Tensor) -> list[Curvature]:
        """The inner losses' Hessians at theta_0 = theta_old .. theta_{K-1}, then the Fisher at the kept
        phi = theta_K (the point the old policy is taken at, and the products are only ever asked
        at theta_old); the points are the whole batches' even where the products see a curvature
        minibatch."""
        theta, products = self._theta(theta), []
        for k, (rows, sub) in enumerate(zip(self.inner, self.curvature_inner)):
            products.append(Curvature(self.mlp, theta, sub.obs, self.pg_loss(sub), True, self.scratch))
            if k + 1 < len(self.inner):  # the last step's end is phi
                step = products[-1].grad if sub is rows else gradient(self.mlp, theta, rows.obs,
                                                                       self.pg_loss(rows), self.scratch)
                theta = theta - self.lr * step
        kl = lambda out, log_std: self.kl(self.head(out, log_std), curvature=True).sum()  # noqa: E731
        return [*products, Curvature(self.mlp, self.phi, self.curvature_valid.obs, kl, False, self.scratch)]

    def hvp(self, theta: np.ndarray, v: torch.Tensor) -> torch.Tensor:
        """Each task's J^T F J v at ``theta`` (theta_old), [tasks, P]; the products are built at the
        first call and reused while theta stays the same (the conjugate-gradient rounds)."""
        if self.products is None or not np.array_equal(self.products_at, theta, equal_nan=True):
            self.products_at = np.array(theta)  # a copy: the caller's array may be reused
            self.products = self.build(torch.from_numpy(self.products_at))
        return jtfj(self.products, self.lr, v.to(self.valid.obs.dtype).expand(self.tasks, -1))

    def loss_kl(self, theta: torch.Tensor) -> torch.Tensor:
        """Each task's ``losses.surrogate_loss`` and KL at the parameters adapted from ``theta``, [tasks, 2]."""
        theta = self._theta(theta)
        for rows in self.inner:
            theta = theta - self.lr * gradient(self.mlp, theta, rows.obs, self.pg_loss(rows), self.scratch)
        layers, log_std = self.mlp.split(theta)
        dist = self.head(self.mlp.forward(layers, self.valid.obs, self.scratch)[-1], log_std)
        v = self.valid
        # A padding row's log_prob (of action 0) is not a sampled action's: kept out of exp (it could
        # overflow where the std is tiny, and 0 * inf would poison the sum).
        log_ratio = torch.where(v.weights > 0, dist.log_prob(v.actions) - v.log_probs, 0.0)
        loss = -(v.weights * torch.exp(log_ratio) * v.advantages).sum(1)
        return torch.stack([loss, self.kl(dist)], 1)


def jtfj(products: list, lr: float, v: torch.Tensor) -> torch.Tensor:
    """J^T F J v from the inner losses' Hessians H_k and the Fisher F (``products``, in that order):
    J = (I - lr H_K) ... (I - lr H_1), and J^T applies the same factors in reverse."""
    *hessians, fisher = products
    for h in hessians:  # J v
        v = v - lr * h.hvp(v)
    v = fisher.hvp(v)
    for h in reversed(hessians):  # J^T (F J v)
        v = v - lr * h.hvp(v)
    return v
