"""Meta-gradients against independent computations: finite differences and closed forms."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

from metaray.algorithms.adapt import adapt, leaf_params
from metaray.algorithms.losses import log_probs, mean_kl, pg_loss, surrogate_loss
from metaray.algorithms.maml import meta_gradient
from metaray.algorithms.reptile import reptile_delta
from metaray.algorithms.trpo import conjugate_gradient, trpo_step
from metaray.config import validate
from metaray.core.advantages import compute_advantages
from metaray.core.policy import flatten, unflatten
from metaray.core.rollout import collect
from metaray.core.task_worker import TaskWorker
from metaray.runtime.learner import Learner, _Outer


def _fixed_problem(family: str, inner_steps: int):
    """Real episodes from real envs, frozen; a float64 policy; loss closures over them."""
    cfg = validate({
        "algorithm": "maml", "seed": 3, "task": {"family": family},
        "policy": {"hidden_sizes": [8], "init_log_std": -0.5},
        "inner": {"steps": inner_steps, "lr": 0.5, "episodes": 6},
        "rollout": {"horizon": 15},
    })
    runner = TaskWorker(cfg)
    task = runner.family.sample_tasks(1, np.random.default_rng(7))[0]
    envs = runner.make_envs(task)
    gen = torch.Generator().manual_seed(11)

    def batch(seed: int):
        eps = collect(runner.policy, runner.template, envs, cfg.rollout.horizon,
                      [seed + i for i in range(envs.num_envs)], gen)
        return compute_advantages(eps, 0.99, 0.95, True).to(torch.float64)

    inner_batches = [batch(100 * k) for k in range(inner_steps)]
    valid = batch(999)
    policy = runner.policy.double()
    theta = OrderedDict((k, v.double()) for k, v in runner.template.items())
    phi0 = adapt(leaf_params(theta), [lambda p, b=b: pg_loss(policy, p, b) for b in inner_batches],
                 cfg.inner.lr, create_graph=False)
    old = log_probs(policy, {k: v.detach() for k, v in phi0.items()}, valid).detach()
    inner = [lambda p, b=b: pg_loss(policy, p, b) for b in inner_batches]
    outer = lambda p: surrogate_loss(policy, p, valid, old)  # noqa: E731
    return theta, inner, outer, cfg.inner.lr


def _post_adaptation_loss(theta_flat: torch.Tensor, like, inner, outer, lr) -> float:
    theta = leaf_params(unflatten(theta_flat, like))
    return float(outer(adapt(theta, inner, lr, create_graph=False)).detach())


def _finite_difference(theta, inner, outer, lr, eps: float = 1e-6) -> torch.Tensor:
    return _numeric_gradient(lambda x: _post_adaptation_loss(x, theta, inner, outer, lr), flatten(theta), eps)


def _numeric_gradient(f, x0: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central differences of a scalar function of a flat float64 vector, one coordinate at a time."""
    grad = torch.zeros_like(x0)
    for i in range(x0.numel()):
        e = torch.zeros_like(x0)
        e[i] = eps
        grad[i] = (f(x0 + e) - f(x0 - e)) / (2 * eps)
    return grad


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family,inner_steps", [("navigation2d", 1), ("cartpole", 1), ("navigation2d", 2)])
def test_second_order_meta_gradient_matches_finite_differences(family, inner_steps):
    theta, inner, outer, lr = _fixed_problem(family, inner_steps)
    grad, _, _ = meta_gradient(theta, inner, outer, lr, first_order=False)
    fd = _finite_difference(theta, inner, outer, lr)
    assert fd.norm() > 1e-4, "degenerate problem: the post-adaptation loss is flat"
    assert _rel_err(grad, fd) < 1e-3
    # The check discriminates: the first-order approximation is measurably different.
    fo, _, _ = meta_gradient(theta, inner, outer, lr, first_order=True)
    assert _rel_err(fo, fd) > 1e-2


def test_fomaml_gradient_is_the_post_adaptation_gradient():
    theta, inner, outer, lr = _fixed_problem("navigation2d", 1)
    fo, _, _ = meta_gradient(theta, inner, outer, lr, first_order=True)
    # Independently: phi = theta - lr * dL_inner/dtheta, then the plain gradient of the outer loss at phi.
    t = leaf_params(theta)
    g_inner = torch.autograd.grad(inner[0](t), list(t.values()))
    phi = OrderedDict((k, (v - lr * g).detach().requires_grad_(True)) for (k, v), g in zip(t.items(), g_inner))
    g_outer = torch.autograd.grad(outer(phi), list(phi.values()))
    expected = torch.cat([g.reshape(-1) for g in g_outer])
    assert torch.allclose(fo, expected, rtol=1e-10, atol=1e-12)


def test_reptile_update_matches_closed_form_on_quadratics():
    """k SGD steps on 0.5 (x-c)^T A (x-c) give phi = c + (I - aA)^k (theta - c)."""
    torch.manual_seed(0)
    dim, k, inner_lr, outer_lr, n_tasks = 5, 3, 0.1, 0.7, 4
    theta = OrderedDict(w=torch.randn(3, dtype=torch.float64), b=torch.randn(2, dtype=torch.float64))
    flat_theta = flatten(theta)
    deltas, expected_phis = [], []
    for _ in range(n_tasks):
        m = torch.randn(dim, dim, dtype=torch.float64)
        a = m @ m.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)
        c = torch.randn(dim, dtype=torch.float64)

        def loss(p, a=a, c=c):
            x = flatten(p) - c
            return 0.5 * x @ a @ x

        delta, _ = reptile_delta(theta, [loss] * k, inner_lr)
        deltas.append(delta)
        expected_phis.append(c + torch.linalg.matrix_power(torch.eye(dim, dtype=torch.float64) - inner_lr * a, k)
                             @ (flat_theta - c))
    for delta, phi in zip(deltas, expected_phis):
        assert torch.allclose(flat_theta + delta, phi, atol=1e-12)
    # The learner's outer step (SGD on the pseudo-gradient) is theta + lr * mean(phi - theta).
    cfg = validate({"algorithm": "reptile", "outer": {"optimizer": "sgd", "lr": outer_lr}})
    learner = Learner(cfg.model_dump(mode="json"), flat_theta.float().numpy())
    learner.params.data = flat_theta.clone()
    learner.optimizer.param_groups[0]["params"] = [learner.params]
    learner.algorithm.outer_step(_Outer(learner, 0, 0, [], {}, [], None), torch.stack(deltas).mean(0))
    expected = flat_theta + outer_lr * (torch.stack(expected_phis).mean(0) - flat_theta)
    assert torch.allclose(learner.params.detach(), expected, atol=1e-12)


def test_conjugate_gradient_solves_spd_system():
    torch.manual_seed(1)
    m = torch.randn(12, 12, dtype=torch.float64)
    a = m @ m.T + torch.eye(12, dtype=torch.float64)
    b = torch.randn(12, dtype=torch.float64)
    x, r = conjugate_gradient(lambda v: a @ v, b, iters=50, tol=1e-20)
    assert torch.allclose(x, torch.linalg.solve(a, b), atol=1e-8)
    assert torch.allclose(r, b - a @ x, atol=1e-8)
    # Truncated early, the returned residual is still b - A x, which the TRPO step relies on.
    x3, r3 = conjugate_gradient(lambda v: a @ v, b, iters=3)
    assert torch.allclose(r3, b - a @ x3, atol=1e-8) and r3.norm() > 1e-3


def test_trpo_step_is_the_natural_gradient_at_the_kl_boundary():
    """Quadratic KL 0.5 d^T F d and linear loss g^T d: the step is -sqrt(2 kl / g^T F^-1 g) F^-1 g."""
    torch.manual_seed(2)
    m = torch.randn(6, 6, dtype=torch.float64)
    fisher = m @ m.T + 0.5 * torch.eye(6, dtype=torch.float64)
    g = torch.randn(6, dtype=torch.float64)
    theta = torch.randn(6, dtype=torch.float64)
    max_kl = 0.01
    loss_kl = lambda p: (float(g @ (p - theta)), float(0.5 * (p - theta) @ fisher @ (p - theta)))  # noqa: E731
    out = trpo_step(theta, g, 0.0, lambda v: fisher @ v, loss_kl, max_kl, 50, 0.0, 10, 0.5)
    nat = torch.linalg.solve(fisher, g)
    expected = theta - torch.sqrt(2 * max_kl / (g @ nat)) * nat
    # The full step lands on the KL boundary; rounding may push it a hair outside, so allow one halving.
    assert out.accepted and out.line_search_steps <= 2
    fraction = 0.5 ** (out.line_search_steps - 1)
    assert torch.allclose(out.params, theta + fraction * (expected - theta), atol=1e-10)
    assert out.kl <= max_kl


@pytest.mark.parametrize("family,inner_steps,algorithm", [("navigation2d", 1, "maml"), ("navigation2d", 2, "maml"),
                                                          ("cartpole", 1, "maml"), ("navigation2d", 1, "pretrain")])
def test_worker_hessian_vector_product_matches_finite_differences_of_kl_gradient(family, inner_steps, algorithm):
    """The worker's TRPO product is the Hessian of the post-adaptation KL, checked numerically."""
    cfg = validate({"algorithm": algorithm, "seed": 1, "task": {"family": family},
                    "policy": {"hidden_sizes": [8]}, "inner": {"episodes": 4, "steps": inner_steps},
                    "rollout": {"horizon": 10}, "outer": {"optimizer": "trpo"}})
    runner = TaskWorker(cfg)
    flat = flatten(runner.template).numpy()
    task = runner.family.sample_tasks(1, np.random.default_rng(0))[0]
    runner.run_tasks(flat, [(0, task, np.random.SeedSequence(5))], iteration=0)[0]
    state = runner._kept[(0, 0)]
    v = np.random.default_rng(3).standard_normal(flat.size).astype(np.float32)
    hv = runner.answer(0, 0, "hvp", flat, v)

    def kl_grad(x: np.ndarray) -> torch.Tensor:
        theta = leaf_params(runner.params_from(x))
        phi = state.adapted(theta, create_graph=True)
        kl = mean_kl(runner.policy, phi, state.valid, state.old_dist)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(kl, list(theta.values()))])

    eps = 1e-2
    fd = (kl_grad(flat + eps * v) - kl_grad(flat - eps * v)) / (2 * eps)
    assert np.linalg.norm(hv) > 1e-3
    assert _rel_err(torch.from_numpy(hv), fd) < 2e-2  # float32 policy: a looser, still discriminating bound


@pytest.mark.parametrize("family,inner_steps,horizon", [("navigation2d", 1, 12), ("navigation2d", 2, 12),
                                                        ("cartpole", 2, 60)])
def test_pretrain_gradient_matches_finite_differences_on_all_its_episodes(family, inner_steps, horizon):
    """The no-adaptation baseline: the policy gradient at theta on every batch sampled for the task
    (on cartpole the batches stop at different lengths, their longest episodes')."""
    cfg = validate({"algorithm": "pretrain", "seed": 2, "task": {"family": family},
                    "policy": {"hidden_sizes": [8]}, "inner": {"episodes": 5, "steps": inner_steps},
                    "rollout": {"horizon": horizon}, "outer": {"optimizer": "trpo"}})
    runner = TaskWorker(cfg)
    flat = flatten(runner.template).numpy()
    task = runner.family.sample_tasks(1, np.random.default_rng(4))[0]
    result = runner.run_tasks(flat, [(0, task, np.random.SeedSequence(9))], iteration=0)[0]
    state = runner._kept[(0, 0)]
    assert state.valid.mask.shape[1] == 5 * (inner_steps + 1), "every batch of the budget is used"
    assert result.env_steps == state.valid.steps
    # Independently, in float64: central differences of the importance-weighted loss on those episodes.
    policy = runner.policy.double()
    episodes = state.valid.to(torch.float64)
    old = state.valid.log_probs.double()

    def loss(x: torch.Tensor) -> float:
        return float(surrogate_loss(policy, unflatten(x, runner.template), episodes, old))

    fd = _numeric_gradient(loss, torch.from_numpy(flat).double())
    assert fd.norm() > 1e-3
    assert _rel_err(torch.from_numpy(result.vector).double(), fd) < 1e-3


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_promp_meta_gradient_matches_finite_differences(inner_steps):
    """ProMP's worker-side meta-gradient (LVC inner steps, clipped outer ratio, inner KL penalty),
    at parameters moved off the sampling point so clipping and the KL term are active."""
    cfg = validate({"algorithm": "promp", "seed": 4, "task": {"family": "navigation2d"},
                    "policy": {"hidden_sizes": [8], "init_log_std": -0.5},
                    "inner": {"episodes": 6, "steps": inner_steps, "lr": 0.5}, "rollout": {"horizon": 15},
                    "outer": {"promp": {"clip": 0.2, "kl_coef": 0.5}}})
    runner = TaskWorker(cfg)
    flat0 = flatten(runner.template).numpy()
    task = runner.family.sample_tasks(1, np.random.default_rng(2))[0]
    runner.run_tasks(flat0, [(0, task, np.random.SeedSequence(8))], iteration=0)[0]
    state = runner._kept[(0, 0)]
    moved = flat0 + 0.05 * np.random.default_rng(5).standard_normal(flat0.size).astype(np.float32)
    worker_grad = torch.from_numpy(runner.answer(0, 0, "gradient", moved)).double()

    # Independently, in float64: the sampling-time policies rebuilt from theta_0, then central
    # differences of the ProMP objective written out here term by term.
    policy = runner.policy.double()
    inner = [batch.to(torch.float64) for batch in state.inner]
    valid = state.valid.to(torch.float64)
    sampler = OrderedDict((k, v.double()) for k, v in runner.template.items())
    olds = []
    for batch in inner:
        olds.append(policy.dist(batch.obs, sampler))
        sampler = adapt(leaf_params(sampler), [lambda p, b=batch: pg_loss(policy, p, b)], cfg.inner.lr, False)
    old_lp = log_probs(policy, {k: v.detach() for k, v in sampler.items()}, valid).detach()

    def objective(x: torch.Tensor) -> float:
        params, kl = unflatten(x, runner.template), 0.0
        params = leaf_params(params)
        for batch, old in zip(inner, olds):
            kl = kl + mean_kl(policy, params, batch, old)
            ratio = torch.exp(log_probs(policy, params, batch) - old.log_prob(batch.actions))  # old: a constant
            lvc = -((ratio * batch.advantages * batch.mask).sum() / batch.mask.sum())
            grads = torch.autograd.grad(lvc, list(params.values()))
            params = OrderedDict((k, v - cfg.inner.lr * g) for (k, v), g in zip(params.items(), grads))
        ratio = torch.exp(log_probs(policy, params, valid) - old_lp)
        clipped = torch.min(ratio * valid.advantages, ratio.clamp(0.8, 1.2) * valid.advantages)
        return float(-(clipped * valid.mask).sum() / valid.mask.sum() + 0.5 * kl)

    x0 = torch.from_numpy(moved).double()
    fd = _numeric_gradient(objective, x0)
    assert fd.norm() > 1e-3
    assert _rel_err(worker_grad, fd) < 2e-3, "float32 worker gradient vs float64 finite differences"
    # Discriminating: MAML's objective (plain inner PG, unclipped ratio, no KL) has another gradient here.
    maml_like, _, _ = meta_gradient(unflatten(x0, runner.template),
                                    [lambda p, b=b: pg_loss(policy, p, b) for b in inner],
                                    lambda p: surrogate_loss(policy, p, valid, old_lp), cfg.inner.lr, False)
    assert _rel_err(maml_like, fd) > 5e-2
