"""TRPO's hand-written worker products (metaray.algorithms.curvature) against the autograd path,
which stays the fallback for any other policy or inner loss and is the reference here."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

from metaray.algorithms.adapt import adapt, leaf_params
from metaray.algorithms.losses import PolicyGradientLoss, masked_mean, pg_loss
from metaray.algorithms.maml import MAML
from metaray.algorithms.trpo import TRPOTask
from metaray.config import validate
from metaray.core.advantages import compute_advantages
from metaray.core.policy import Policy, flatten
from metaray.core.rollout import collect
from metaray.core.task_worker import TaskWorker

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cut(episodes, steps: int):
    """The batch with its first episode ended ``steps`` steps early (a navigation episode runs to the
    horizon: this gives a Gaussian policy's batches padding)."""
    if steps:
        episodes.mask[-steps:, 0] = 0
    return episodes


def _pair(family: str, activation: str, steps: int, dtype: torch.dtype,
          subsample: int = 1, task: int = 0, cut: int = 0) -> tuple[TRPOTask, TRPOTask, np.ndarray]:
    """One task's kept state twice, hand-written and autograd: real episodes of a real env (cartpole's
    end early, so rows of padding are dropped; ``cut`` ends one of each batch's early), a
    two-hidden-layer policy cast to ``dtype``."""
    cfg = validate({"algorithm": "maml", "seed": 2, "task": {"family": family},
                    "policy": {"hidden_sizes": [12, 10], "activation": activation, "init_log_std": -0.5},
                    "inner": {"steps": max(steps, 1), "lr": 0.5, "episodes": 5}, "rollout": {"horizon": 100}})
    worker = TaskWorker(cfg)
    envs = worker.make_envs(worker.family.sample_tasks(task + 1, np.random.default_rng(3))[task])
    gen = torch.Generator().manual_seed(4 + task)
    batches = [compute_advantages(_cut(collect(worker.policy, worker.template, envs, cfg.rollout.horizon,
                                               [100 * k + i + 1000 * task for i in range(envs.num_envs)], gen), cut),
                                  0.99, 0.95, True).to(dtype)
               for k in range(steps + 1)]
    policy = worker.policy.to(dtype)
    template = OrderedDict((k, v.to(dtype)) for k, v in worker.template.items())
    inner = [PolicyGradientLoss(policy, b) for b in batches[:-1]]
    phi = {k: v.detach() for k, v in adapt(leaf_params(template), inner, cfg.inner.lr, False).items()}
    fast, slow = (TRPOTask(policy, template, inner, cfg.inner.lr, batches[-1], phi, subsample=subsample)
                  for _ in range(2))
    slow.fast = None  # the autograd path, as for any other policy
    return fast, slow, flatten(template).numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("family,steps", [("navigation2d", 1), ("navigation2d", 2), ("navigation2d", 0),
                                          ("cartpole", 1), ("cartpole", 2), ("cartpole", 0), ("bandit", 1)])
def test_fast_products_equal_the_autograd_ones_in_float64(family, steps, activation):
    """J^T F J v for 0 (pretrain), 1 and 2 inner steps, Gaussian and Categorical, tanh and relu;
    the surrogate loss and KL of the line search at a candidate off theta_old. Navigation's and
    cartpole's output layers (2 wide) are computed transposed, the bandit's (5 arms) is not."""
    fast, slow, flat = _pair(family, activation, steps, torch.float64)
    assert fast.fast is not None
    if family == "cartpole":
        assert fast.valid.mask.min() == 0, "the check covers dropped padding"
    v = np.random.default_rng(0).standard_normal(flat.size)
    hv = fast.hvp(flat, v)
    assert np.linalg.norm(hv) > 1e-3
    assert _rel(hv, slow.hvp(flat, v)) < 1e-10
    candidate = flat + 0.05 * v
    np.testing.assert_allclose(fast.loss_kl(candidate), slow.loss_kl(candidate), rtol=1e-10, atol=1e-14)
    # A second product after a line-search call (they share scratch buffers), on a new vector.
    assert _rel(fast.hvp(flat, hv), slow.hvp(flat, hv)) < 1e-10
    np.testing.assert_array_equal(fast.hvp(flat, v), hv)


@pytest.mark.parametrize("family", ["navigation2d", "cartpole"])
def test_fast_products_in_float32_are_within_rounding_of_the_autograd_ones(family):
    fast, slow, flat = _pair(family, "tanh", 1, torch.float32)
    v = np.random.default_rng(1).standard_normal(flat.size).astype(np.float32)
    assert _rel(fast.hvp(flat, v), slow.hvp(flat, v)) < 1e-5
    # The surrogate loss is a mean of terms of size one that nearly cancel: an absolute bound.
    np.testing.assert_allclose(fast.loss_kl(flat + 0.05 * v), slow.loss_kl(flat + 0.05 * v), rtol=0, atol=1e-6)


@pytest.mark.parametrize("subsample", [1, 2])
@pytest.mark.parametrize("family,steps", [("navigation2d", 1), ("navigation2d", 2), ("navigation2d", 0),
                                          ("cartpole", 1), ("cartpole", 2), ("bandit", 1)])
def test_a_task_group_computed_together_equals_its_tasks_one_by_one(family, steps, subsample):
    """A worker computes a group's products in one batched pass, each task's rows padded to the
    longest with rows of weight zero (cartpole's episodes end at different steps, and one episode
    of a batch ends early for the Gaussian policy): each task's product, loss and KL equal the
    autograd path's on that task alone."""
    from metaray.algorithms.curvature import MLPProducts, Scratch

    pairs = [_pair(family, "tanh", steps, torch.float64, subsample, task=t, cut=7 * t) for t in range(3)]
    flat = pairs[0][2]
    rows = {int(p[0].valid.mask.sum()) for p in pairs}
    assert len(rows) > 1, "the check covers padding between tasks"
    fast = pairs[0][0]
    group = MLPProducts(fast.policy, fast.template, fast.lr, [p[0].batches for p in pairs], Scratch())
    v = torch.tensor(np.random.default_rng(0).standard_normal(flat.size))
    each = group.hvp(flat, v).numpy()
    candidate = torch.tensor(flat) + 0.05 * v
    losses = group.loss_kl(candidate).numpy()
    for t, (_, slow, _) in enumerate(pairs):
        assert _rel(each[t], slow.hvp(flat, v.numpy())) < 1e-10
        np.testing.assert_allclose(losses[t], slow.loss_kl(candidate.numpy()), rtol=1e-10, atol=1e-14)
    assert _rel(each[0], each[1]) > 1e-3, "different tasks, different products"
    np.testing.assert_array_equal(group.hvp(flat, v).numpy(), each)  # the rounds reuse what the first built


def test_the_worker_answers_a_group_together_and_rebuilds_it_for_new_episodes():
    cfg = validate({"algorithm": "maml", "seed": 1, "task": {"family": "cartpole"},
                    "policy": {"hidden_sizes": [8]}, "inner": {"episodes": 4},
                    "rollout": {"horizon": 30, "task_group_size": 3}, "outer": {"optimizer": "trpo"}})
    worker = TaskWorker(cfg)
    flat = flatten(worker.template).numpy()
    tasks = worker.family.sample_tasks(3, np.random.default_rng(0))
    jobs = [(i, task, np.random.SeedSequence(5 + i)) for i, task in enumerate(tasks)]
    worker.run_tasks(flat, jobs, iteration=0)
    v = np.random.default_rng(2).standard_normal(flat.size).astype(np.float32)
    one_by_one = sum(worker.answer(0, i, "hvp", flat, v).astype(np.float64) for i in range(3))
    together = worker.answer_sum(0, [0, 1, 2], "hvp", flat, v)
    assert together.dtype == np.float32
    assert _rel(together, one_by_one) < 1e-5
    group = worker._kept[(0, 0)].group
    assert group is not None and all(worker._kept[(0, i)].group is group for i in range(3))
    np.testing.assert_array_equal(worker.answer_sum(0, [0, 1, 2], "hvp", flat, v), together)
    assert worker._kept[(0, 2)].group is group, "reused between rounds"
    losses = worker.answer_sum(0, [0, 1, 2], "loss_kl", flat + 0.1 * v)
    np.testing.assert_allclose(losses, sum(worker.answer(0, i, "loss_kl", flat + 0.1 * v) for i in range(3)),
                               rtol=1e-5)
    worker.run_tasks(flat, [(i, task, np.random.SeedSequence(50 + i)) for i, task, _ in jobs[1:2]], iteration=0)
    again = worker.answer_sum(0, [0, 1, 2], "hvp", flat, v)
    assert worker._kept[(0, 0)].group is not group, "a task sampled again: the group is built again"
    assert _rel(again, together) > 1e-4


@pytest.mark.parametrize("family,algorithm,steps", [("navigation2d", "maml", 1), ("navigation2d", "maml", 2),
                                                    ("cartpole", "maml", 1), ("navigation2d", "pretrain", 1)])
def test_the_worker_takes_the_fast_path_for_the_built_in_policy(family, algorithm, steps):
    """The configs of test_gradients' finite-difference check of the worker's product: it runs this
    path. A worker's tasks share their scratch buffers: requests about them interleave freely."""
    cfg = validate({"algorithm": algorithm, "seed": 1, "task": {"family": family},
                    "policy": {"hidden_sizes": [8]}, "inner": {"episodes": 4, "steps": steps},
                    "rollout": {"horizon": 10}, "outer": {"optimizer": "trpo"}})
    worker = TaskWorker(cfg)
    flat = flatten(worker.template).numpy()
    tasks = worker.family.sample_tasks(2, np.random.default_rng(0))
    worker.run_tasks(flat, [(i, task, np.random.SeedSequence(5 + i)) for i, task in enumerate(tasks)], iteration=0)
    assert all(worker._kept[(0, i)].fast is not None for i in range(2))
    v = np.random.default_rng(2).standard_normal(flat.size).astype(np.float32)
    first = worker.answer(0, 0, "hvp", flat, v)
    other = worker.answer(0, 1, "hvp", flat, v), worker.answer(0, 1, "loss_kl", flat + 0.1 * v)
    np.testing.assert_array_equal(worker.answer(0, 0, "hvp", flat, v), first)
    assert not np.allclose(other[0], first)


@pytest.mark.parametrize("family,steps", [("navigation2d", 1), ("navigation2d", 2), ("cartpole", 1),
                                          ("cartpole", 2), ("navigation2d", 0)])
def test_curvature_subsample_products_equal_the_autograd_ones(family, steps):
    """outer.trpo.curvature_subsample: both paths see every k-th episode, at the same points."""
    fast, slow, flat = _pair(family, "tanh", steps, torch.float64, subsample=2)
    exact, _, _ = _pair(family, "tanh", steps, torch.float64)
    v = np.random.default_rng(0).standard_normal(flat.size)
    hv = fast.hvp(flat, v)
    assert _rel(hv, slow.hvp(flat, v)) < 1e-10
    assert _rel(hv, exact.hvp(flat, v)) > 1e-3, "half the episodes: a different matrix"
    candidate = flat + 0.05 * v  # the line search keeps every episode
    np.testing.assert_allclose(fast.loss_kl(candidate), exact.loss_kl(candidate), rtol=1e-12, atol=1e-14)


def test_curvature_subsample_product_against_its_definition():
    """J_k^T F_k J_k v written from its definition with torch.func, independently of both paths: the
    inner Hessian and the Fisher on every 3rd episode, the Fisher at the adapted parameters of the
    whole inner batch (where the trust region is centred)."""
    from torch.func import grad, jvp

    from metaray.algorithms.losses import mean_kl
    from metaray.core.policy import unflatten

    fast, _, flat = _pair("navigation2d", "tanh", 1, torch.float64, subsample=3)
    policy, template, lr = fast.policy, fast.template, fast.lr
    assert fast.curvature_valid.mask.shape[1] == 2  # 5 episodes: the 1st and the 4th
    whole, sub = fast.inner[0].episodes, fast.inner[0].episodes.every(3)
    np.testing.assert_array_equal(sub.obs.numpy(), whole.obs[:, [0, 3]].numpy())
    theta = torch.tensor(flat)

    def loss(batch):
        return lambda t: pg_loss(policy, unflatten(t, template), batch)

    def hvp(f, at, v):  # forward over reverse
        return jvp(grad(f), (at,), (v,))[1]

    valid = fast.valid.every(3)
    phi = theta - lr * grad(loss(whole))(theta)
    with torch.no_grad():
        old = policy.dist(valid.obs, unflatten(phi, template))
    kl = lambda t: mean_kl(policy, unflatten(t, template), valid, old)  # noqa: E731
    v = torch.tensor(np.random.default_rng(5).standard_normal(flat.size))
    u = v - lr * hvp(loss(sub), theta, v)
    w = hvp(kl, phi, u)
    expected = w - lr * hvp(loss(sub), theta, w)
    assert _rel(fast.hvp(flat, v.numpy()), expected.numpy()) < 1e-10


class EntropyMAML(MAML):
    """A user's inner loss: the hand-written products do not know it."""

    def inner_loss(self, params, episodes):
        entropy = masked_mean(self.policy.dist(episodes.obs, params).entropy(), episodes.mask)
        return pg_loss(self.policy, params, episodes) - 0.05 * entropy


class WidePolicy(Policy):
    """A user's policy class: its forward may be anything."""


def test_other_inner_losses_and_policies_take_the_autograd_path():
    cfg = validate({"algorithm": "tests.test_trpo_products:EntropyMAML", "seed": 1,
                    "task": {"family": "navigation2d"}, "policy": {"hidden_sizes": [8]},
                    "inner": {"episodes": 2}, "rollout": {"horizon": 5}, "outer": {"optimizer": "trpo"}})
    worker = TaskWorker(cfg)
    flat = flatten(worker.template).numpy()
    worker.run_tasks(flat, [(0, worker.family.sample_tasks(1, np.random.default_rng(0))[0],
                             np.random.SeedSequence(5))], iteration=0)
    kept = worker._kept[(0, 0)]
    assert kept.fast is None
    assert np.isfinite(worker.answer(0, 0, "hvp", flat, np.ones_like(flat))).all()

    policy = WidePolicy(worker.spec, [8])
    params = policy.params()
    inner = [PolicyGradientLoss(policy, kept.valid)]
    assert TRPOTask(policy, params, inner, 0.1, kept.valid, params).fast is None


def test_scratch_holds_one_buffer_per_name_at_the_largest_size():
    """Batches' row counts vary with where episodes end, a group's size with the meta-batch: the
    scratch must not keep one buffer per shape (a long Ant run would grow a worker by gigabytes)."""
    from metaray.algorithms.curvature import Scratch

    scratch = Scratch()
    shapes = [(tasks, rows, 64) for rows in [*range(10, 200, 7), 50, 3] for tasks in (1, 5, 2)]
    for shape in shapes:
        a = scratch("a0", shape, torch.float32)
        assert a.shape == shape and a.is_contiguous()
        a.fill_(shape[1])  # writable, and a view of the one buffer
        assert a.untyped_storage().data_ptr() == scratch.buffers[("a0", torch.float32)].untyped_storage().data_ptr()
    assert len(scratch.buffers) == 1
    assert scratch.buffers[("a0", torch.float32)].numel() == max(t * r * c for t, r, c in shapes)
    scratch("a0", (2, 3), torch.float64)
    assert len(scratch.buffers) == 2
