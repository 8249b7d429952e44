"""The algorithm interface is a real seam: an algorithm defined here, outside the package,
trains through the public API by import path; the built-in halves keep their contracts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from metaray.algorithms.adapt import leaf_params
from metaray.algorithms.base import Algorithm, TaskUpdate
from metaray.algorithms.losses import log_probs, masked_mean, pg_loss, surrogate_loss
from metaray.algorithms.promp import ProMP
from metaray.config import load_config
from metaray.core.policy import flatten
from metaray.core.seeding import train_episode_seed, train_tasks
from metaray.core.task_worker import Batch, TaskWorker
from metaray.training.run_dir import RunDir
from metaray.training.trainer import train
from tests.conftest import ROOT, run_cli

ENTROPY = 0.05


class EntropyFOMAML(Algorithm):
    """First-order MAML whose inner loss adds an entropy bonus: a user's algorithm."""

    def inner_loss(self, params, episodes):
        entropy = masked_mean(self.policy.dist(episodes.obs, params).entropy(), episodes.mask)
        return pg_loss(self.policy, params, episodes) - ENTROPY * entropy

    def task_update(self, theta, inner, valid):
        phi = leaf_params(self.adapt(leaf_params(theta), inner))
        loss = surrogate_loss(self.policy, phi, valid, valid.log_probs)
        grads = torch.autograd.grad(loss, list(phi.values()))
        return TaskUpdate(torch.cat([g.reshape(-1) for g in grads]), float(loss.detach()))


NAME = "tests.test_algorithm_api:EntropyFOMAML"
SMALL = ["outer.iterations=3", "outer.meta_batch_size=4", "inner.episodes=4", "rollout.horizon=20",
         "policy.hidden_sizes=[16]", "eval.tasks=3", "eval.steps=1"]


def test_user_algorithm_update_is_its_own_objective():
    """The worker hands the user's algorithm its episodes; its vector is the gradient of its
    own objective, computed here independently, and differs from built-in FOMAML's."""
    cfg = load_config("quickstart", [*SMALL, f"algorithm={NAME}"])
    worker = TaskWorker(cfg)
    flat = flatten(worker.template).numpy()
    task = train_tasks(worker.family, 0, 0, 1)[0]
    seed = train_episode_seed(0, 0, 0)
    result = worker.run_tasks(flat, [(0, task, seed)], iteration=0)[0]

    # Independently: rebuild the episodes with the same seeds through built-in FOMAML's worker,
    # then the entropy-regularised inner step and the outer gradient by hand.
    fomaml = TaskWorker(load_config("quickstart", [*SMALL, "algorithm=fomaml"]))
    builtin = fomaml.run_tasks(flat, [(0, task, seed)], iteration=0)[0]
    theta = leaf_params(worker.params_from(flat))
    # The first inner batch is sampled at theta in both; re-sample it the same way.
    rng = np.random.default_rng(seed)
    envs = worker.make_envs(task)
    inner, valid = Batch(envs, rng), Batch(envs, rng)
    worker.sample([theta], [inner])
    policy = worker.policy
    dist = policy.dist(inner.episodes.obs, theta)
    loss = -masked_mean(dist.log_prob(inner.episodes.actions) * inner.episodes.advantages, inner.episodes.mask) \
        - ENTROPY * masked_mean(dist.entropy(), inner.episodes.mask)
    grads = torch.autograd.grad(loss, list(theta.values()))
    phi = {k: (v - cfg.inner.lr * g).detach().requires_grad_(True) for (k, v), g in zip(theta.items(), grads)}
    worker.sample([phi], [valid])
    ratio = torch.exp(log_probs(policy, phi, valid.episodes) - valid.episodes.log_probs)
    outer = -masked_mean(ratio * valid.episodes.advantages, valid.episodes.mask)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(outer, list(phi.values()))])
    np.testing.assert_allclose(result.vector, expected.numpy(), rtol=1e-4, atol=1e-6)
    assert not np.allclose(result.vector, builtin.vector, rtol=1e-3, atol=1e-5), "the entropy term must matter"


def test_user_algorithm_trains_through_the_public_api(ray_local, tmp_path):
    cfg = load_config("quickstart", [*SMALL, f"algorithm={NAME}"])
    run = RunDir(tmp_path / "run")
    run.prepare(cfg, overwrite=False)
    out = train(cfg, run, log=lambda _: None)
    flat0 = flatten(TaskWorker(cfg).template).numpy()
    assert np.isfinite(out["params"]).all() and not np.allclose(out["params"], flat0)
    assert [r["rejected_results"] for r in out["rows"]] == [0, 0, 0]
    assert run.load_config().algorithm == NAME and run.latest_checkpoint()["iteration"] == 3


def test_user_algorithm_through_the_cli(ray_address, tmp_path: Path):
    raw = yaml.safe_load((ROOT / "metaray/presets/quickstart.yaml").read_text())
    raw["algorithm"] = NAME
    raw["outer"].update(iterations=2, meta_batch_size=3)
    raw["inner"]["episodes"] = 3
    raw["eval"] = {"tasks": 2, "steps": 1}
    path = tmp_path / "user-algo.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = run_cli("train", str(path), "--output", str(tmp_path / "run"), "--address", ray_address)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "meta-training tests.test_algorithm_api:EntropyFOMAML" in proc.stdout
    proc = run_cli("train", str(path), "-s", "outer.optimizer=trpo", "--output", str(tmp_path / "bad"))
    assert proc.returncode == 2 and "does not fit algorithm" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("family", ["cartpole", "navigation2d"])
def test_sampled_log_probs_equal_the_loss_paths(family):
    """The sampler's recorded log-probabilities (batched forward) against the loss path's
    (functional_call on the policy module), for tasks sampled together in a group."""
    cfg = load_config("quickstart", [f"task.family={family}", "inner.steps=2", "inner.episodes=5",
                                     "rollout.horizon=30", "rollout.task_group_size=3"])
    worker = TaskWorker(cfg)
    flat = flatten(worker.template).numpy()
    jobs = [(i, t, train_episode_seed(0, 0, i)) for i, t in enumerate(train_tasks(worker.family, 0, 0, 5))]
    batches, params = [], []
    for i, task, seed in jobs:
        theta = worker.params_from(flat)
        params.append({k: v + 0.01 * i for k, v in theta.items()})  # each task at its own parameters
        batches.append(Batch(worker.make_envs(task), np.random.default_rng(seed), worker.group_of(i)))
    worker.sample(params, batches)
    for batch, p in zip(batches, params):
        eps = batch.episodes
        recomputed = log_probs(worker.policy, p, eps)
        mask = eps.mask.bool()
        assert torch.allclose(eps.log_probs[mask], recomputed[mask], rtol=0, atol=2e-5)
        assert all(torch.equal(eps.params[k], p[k]) for k in p)


class _FakeOuter:
    """A stand-in OuterContext: the learner half's arithmetic without workers."""

    def __init__(self, params: torch.Tensor, answers: list[np.ndarray]) -> None:
        self.params = torch.nn.Parameter(params.clone())
        self.optimizer = torch.optim.SGD([self.params], lr=1.0)
        self.losses, self.rejected, self.answers, self.asked = [0.0] * len(answers), 0, answers, 0

    def apply(self, gradient: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        self.params.grad = gradient.clone()
        self.optimizer.step()

    def ask(self, request: str, *args: np.ndarray) -> list:
        assert request == "gradient" and args[0].shape == self.params.shape
        self.asked += 1
        return self.answers


def test_promp_later_steps_reject_non_finite_gradients():
    cfg = load_config("quickstart", ["algorithm=promp", "outer.optimizer=sgd", "outer.promp.steps=3",
                                     "outer.meta_batch_size=3"])
    promp = ProMP(cfg, None, None)
    good, bad = np.full(4, 0.5, dtype=np.float32), np.array([1.0, np.nan, 0.0, 0.0], dtype=np.float32)
    outer = _FakeOuter(torch.zeros(4), [good, bad, good])
    promp.outer_step(outer, torch.ones(4))
    assert outer.asked == 2 and outer.rejected == 2, "one non-finite answer in each of steps 2 and 3"
    # Step 1 applies the mean (1.0); steps 2 and 3 the mean of the finite answers only (0.5 each).
    assert torch.equal(outer.params.detach(), torch.full((4,), -2.0))
    # Fewer finite answers than resources.min_valid_fraction (0.5) of the meta-batch: no further step on it.
    outer = _FakeOuter(torch.zeros(4), [bad, bad, good])
    promp.outer_step(outer, torch.ones(4))
    assert outer.asked == 1 and outer.rejected == 2 and torch.equal(outer.params.detach(), torch.full((4,), -1.0))


def test_reptile_post_adaptation_batch_is_optional_and_counted_apart():
    base = ["task.family=cartpole", "algorithm=reptile", "outer.optimizer=sgd", "inner.steps=2", "inner.episodes=4",
            "rollout.horizon=30"]
    results = {}
    for on in (False, True):
        worker = TaskWorker(load_config("quickstart", [*base, f"outer.reptile.post_batch={str(on).lower()}"]))
        flat = flatten(worker.template).numpy()
        jobs = [(i, t, train_episode_seed(0, 0, i)) for i, t in enumerate(train_tasks(worker.family, 0, 0, 3))]
        results[on] = worker.run_tasks(flat, jobs, iteration=0)
    for off, on in zip(results[False], results[True]):
        assert np.array_equal(off.vector, on.vector), "the metrics batch never changes the update"
        assert off.env_steps == on.env_steps > 0, "training throughput counts the inner batches only"
        assert off.metric_env_steps == 0 and on.metric_env_steps > 0
        assert np.isnan(off.post_return) and np.isfinite(on.post_return)
