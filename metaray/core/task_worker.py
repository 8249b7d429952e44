"""Everything a worker does for one task, in pure torch: sample, adapt, meta-gradient.

A worker actor wraps one TaskRunner. Each task's randomness comes from a seed the
learner derives from (run seed, iteration, task index), never from the process it runs
in, so results do not depend on which worker runs which task.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch
from torch.distributions import Distribution

from metaray.algorithms.adapt import adapt
from metaray.algorithms.losses import log_probs, mean_kl, pg_loss, surrogate_loss
from metaray.algorithms.maml import leaf_params, meta_gradient
from metaray.algorithms.promp import promp_gradient
from metaray.algorithms.reptile import reptile_delta
from metaray.config import Config
from metaray.core.advantages import compute_advantages
from metaray.core.policy import Params, SpaceSpec, build_policy, unflatten
from metaray.core.rollout import Episodes, collect_many, concat_episodes
from metaray.tasks import Task, TaskFamily, make_family
from metaray.tasks.batched import BatchedEnv, EnvList


def _finite(params: Params) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in params.values())


class TaskEnvError(RuntimeError):
    """A family's make_env failed for a task; the message names both."""


class NonFiniteError(ArithmeticError):
    """Adaptation produced NaN or inf parameters: the task's update is void."""


class LostTaskStateError(RuntimeError):
    """Asked about a task whose episodes this worker no longer holds (it was restarted)."""


@dataclass
class TaskResult:
    """What a worker returns for one task: small, whatever the number of episodes."""

    task_index: int
    vector: np.ndarray  # meta-gradient (maml, fomaml) or phi - theta (reptile), float32
    outer_loss: float
    pre_return: float  # mean episode return before adaptation
    post_return: float  # mean episode return after inner.steps adaptation steps
    env_steps: int
    timings: dict[str, float] = field(default_factory=dict)
    worker: str = ""


class EpisodeLoss:
    """Policy-gradient loss on one batch that is sampled on first use.

    The first call collects episodes with the parameters it is given (detached); later
    calls reuse them. So one list of these drives both sampling and re-adaptation (TRPO
    needs the adapted policy at candidate meta-parameters on the very same episodes).
    """

    def __init__(self, runner: TaskRunner, envs: BatchedEnv, rng: np.random.Generator) -> None:
        self.runner, self.envs = runner, envs
        self.env_seeds = rng.integers(0, 2**31 - 1, size=envs.num_envs).tolist()
        self.torch_seed = int(rng.integers(0, 2**62))
        self.episodes: Episodes | None = None
        self.sampled_with: Params | None = None  # the (detached) parameters that sampled the episodes
        self.sample_s = 0.0

    def sample(self, params: Params) -> Episodes:
        if self.episodes is None:
            self.runner.sample_many([params], [self])
        return self.episodes

    def __call__(self, params: Params) -> torch.Tensor:
        return pg_loss(self.runner.policy, params, self.sample(params))


class _GradientGraph:
    """A gradient kept with its graph, so Hessian-vector products cost one backward each."""

    def __init__(self, loss_fn: Callable[[Params], torch.Tensor], at: Params) -> None:
        self.at = leaf_params(at)
        grads = torch.autograd.grad(loss_fn(self.at), list(self.at.values()), create_graph=True)
        self.grad = torch.cat([g.reshape(-1) for g in grads])

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(self.grad @ v, list(self.at.values()), retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv])


@dataclass
class _KeptTask:
    """What stays on the worker between a task's gradient and the learner's outer step
    (TRPO's products and line search, ProMP's further outer steps)."""

    inner_losses: list[EpisodeLoss]
    valid: Episodes
    old_log_probs: torch.Tensor
    old_dist: Distribution
    products: list[_GradientGraph] | None = None  # inner-loss Hessians, then the Fisher at phi
    inner_old: list[Distribution] | None = None  # ProMP: the policies that sampled the inner batches


class TaskRunner:
    def __init__(self, config: Config, family: TaskFamily | None = None) -> None:
        self.config = config
        self.family = family or make_family(config.task.family, config.task.options)
        probe_task = self.family.sample_tasks(1, np.random.default_rng(0))[0]
        probe = self.make_env(probe_task)
        self.spec = SpaceSpec.from_env(probe)
        probe.close()
        self.policy = build_policy(self.spec, config.policy, config.seed)
        self.template = self.policy.params()
        self.n_params = sum(p.numel() for p in self.template.values())
        self._kept: dict[tuple[int, int], _KeptTask] = {}

    # -- environment and sampling -------------------------------------------------------

    def make_env(self, task: Task) -> gym.Env:
        try:
            return self.family.make_env(task)
        except Exception as err:
            raise TaskEnvError(
                f"task family {self.config.task.family!r} failed to make an env for task {task}: "
                f"{type(err).__name__}: {err}"
            ) from err

    def make_envs(self, task: Task) -> BatchedEnv:
        """One batched env for the task's episodes: the family's own, or a list of its envs."""
        n, horizon = self.config.inner.episodes, self.config.rollout.horizon
        batched = getattr(self.family, "make_batched_env", None)
        if batched is not None:
            try:
                return batched(task, n, horizon)
            except Exception as err:
                raise TaskEnvError(f"task family {self.config.task.family!r} failed to make a batched env for "
                                   f"task {task}: {type(err).__name__}: {err}") from err
        return EnvList([self.make_env(task) for _ in range(n)])

    def params_from(self, flat: np.ndarray | torch.Tensor) -> Params:
        return unflatten(torch.tensor(np.asarray(flat), dtype=torch.float32), self.template)

    def _losses(self, envs: BatchedEnv, rng: np.random.Generator) -> list[EpisodeLoss]:
        return [EpisodeLoss(self, envs, rng) for _ in range(self.config.inner.steps)]

    # -- one task of a training iteration --------------------------------------------------

    def run_task(
        self, flat_params: np.ndarray, task: Task, task_index: int, seed: np.random.SeedSequence,
        iteration: int = 0,
    ) -> TaskResult:
        return self.run_tasks(flat_params, [(task_index, task, seed)], iteration)[0]

    def run_tasks(
        self, flat_params: np.ndarray, jobs: list[tuple[int, Task, np.random.SeedSequence]], iteration: int = 0,
    ) -> list[TaskResult]:
        """Several tasks of an iteration at once.

        Every batch (each inner step's, then the validation one) of every task is sampled
        together, one policy forward per time step for all their episodes; then each task's
        update is computed on its own episodes. A task's result is the same whether it runs
        alone or beside others (a test checks it bit for bit).
        """
        start = time.perf_counter()
        theta = self.params_from(flat_params)
        runs = []
        for _, task, seed in jobs:
            rng = np.random.default_rng(seed)
            envs = self.make_envs(task)
            runs.append((envs, self._losses(envs, rng), EpisodeLoss(self, envs, rng)))
        current = [theta] * len(jobs)
        steps = self.config.inner.steps
        for k in range(steps + 1):
            batch = [(i, run[1][k] if k < steps else run[2]) for i, run in enumerate(runs) if _finite(current[i])]
            self.sample_many([current[i] for i, _ in batch], [loss for _, loss in batch])
            if k < steps and self.config.algorithm != "pretrain":  # where the next batch is sampled from
                # (the update below recomputes these steps)
                for i, loss in batch:
                    current[i] = {n: v.detach() for n, v in
                                  adapt(leaf_params(current[i]), [loss], self.config.inner.lr, False).items()}
        setup_s = time.perf_counter() - start - sum(loss.sample_s for run in runs for loss in [*run[1], run[2]])
        results = []
        for (task_index, _, _), (envs, inner, valid) in zip(jobs, runs):
            task_start = time.perf_counter()
            try:
                vector, outer_loss = self._update(iteration, task_index, theta, inner, valid)
            except NonFiniteError:  # returned, counted and rejected by the learner, never applied
                vector, outer_loss = torch.full((self.n_params,), float("nan")), float("nan")
            envs.close()
            sample_s = sum(loss.sample_s for loss in [*inner, valid])
            episodes = [e.episodes for e in [*inner, valid] if e.episodes is not None]
            nan = float("nan")
            results.append(TaskResult(
                task_index=task_index,
                vector=vector.numpy().astype(np.float32),
                outer_loss=outer_loss,
                pre_return=float(inner[0].episodes.returns.mean()) if inner[0].episodes is not None else nan,
                post_return=float(valid.episodes.returns.mean()) if valid.episodes is not None else nan,
                env_steps=sum(e.steps for e in episodes),
                timings={"sample_s": sample_s,
                         "adapt_s": time.perf_counter() - task_start + setup_s / len(jobs)},
            ))
        return results

    def sample_many(self, params: list[Params], losses: list[EpisodeLoss]) -> None:
        """Fill each loss's episodes, all tasks stepped together (time split evenly among them)."""
        if not losses:
            return
        if not all(_finite(p) for p in params):
            raise NonFiniteError("non-finite policy parameters")
        start = time.perf_counter()
        gens = [torch.Generator().manual_seed(loss.torch_seed) for loss in losses]
        detached = [{k: v.detach() for k, v in p.items()} for p in params]
        batches = collect_many(self.policy, detached, [loss.envs for loss in losses], self.config.rollout.horizon,
                               [loss.env_seeds for loss in losses], gens)
        r = self.config.rollout
        elapsed = time.perf_counter() - start
        for loss, episodes, sampler in zip(losses, batches, detached):
            loss.episodes = compute_advantages(episodes, r.gamma, r.gae_lambda, r.normalize_advantages)
            loss.sampled_with = sampler
            loss.sample_s = elapsed / len(losses)

    def _update(self, iteration: int, task_index: int, theta: Params, inner: list[EpisodeLoss],
                valid: EpisodeLoss) -> tuple[torch.Tensor, float]:
        """The task's contribution to the outer step: (vector, outer loss)."""
        cfg = self.config
        if cfg.algorithm == "pretrain":
            # Every batch was sampled at theta: the plain policy gradient on all of them, with
            # no adaptation in the objective (MAML with zero inner steps, so TRPO works alike).
            combined = concat_episodes([loss.episodes for loss in [*inner, valid]])
            old = log_probs(self.policy, theta, combined).detach()
            vector, loss, phi = meta_gradient(
                theta, [], lambda p: surrogate_loss(self.policy, p, combined, old), cfg.inner.lr, False)
            if cfg.outer.optimizer == "trpo":
                self._keep(iteration, task_index, phi, [], combined)
            return vector, float(loss)
        if cfg.algorithm == "promp":
            return self._promp_start(iteration, task_index, theta, inner, valid)
        if cfg.algorithm == "reptile":
            delta, phi = reptile_delta(theta, list(inner), cfg.inner.lr)
            valid.sample(phi)  # post-adaptation return, for the metrics
            return delta, float("nan")

        def outer(phi: Params) -> torch.Tensor:
            episodes = valid.sample(phi)
            old = log_probs(self.policy, phi, episodes).detach()
            return surrogate_loss(self.policy, phi, episodes, old)

        vector, loss, phi = meta_gradient(theta, list(inner), outer, cfg.inner.lr, cfg.algorithm == "fomaml")
        if cfg.outer.optimizer == "trpo":
            self._keep(iteration, task_index, phi, inner, valid.episodes)
        return vector, float(loss)

    # -- episodes kept for the outer step ----------------------------------------------------

    def _keep(self, iteration: int, task_index: int, phi: Params,
              inner: list[EpisodeLoss], valid: Episodes) -> _KeptTask:
        for key in [k for k in self._kept if k[0] != iteration]:
            del self._kept[key]
        with torch.no_grad():
            kept = self._kept[(iteration, task_index)] = _KeptTask(
                inner_losses=inner,
                valid=valid,
                old_log_probs=log_probs(self.policy, phi, valid),
                old_dist=self.policy.dist(valid.obs, phi),
            )
        return kept

    # -- ProMP: several outer steps on one batch of samples ---------------------------------

    def _promp_start(self, iteration: int, task_index: int, theta: Params, inner: list[EpisodeLoss],
                     valid: EpisodeLoss) -> tuple[torch.Tensor, float]:
        """Keep the task's episodes and the policies that sampled them; the gradient at theta."""
        if any(loss.episodes is None for loss in [*inner, valid]):  # sampling stopped at non-finite params
            raise NonFiniteError("non-finite policy parameters")
        with torch.no_grad():
            inner_old = [self.policy.dist(loss.episodes.obs, loss.sampled_with) for loss in inner]
        kept = self._keep(iteration, task_index, valid.sampled_with, inner, valid.episodes)
        kept.inner_old = inner_old
        return self._promp_gradient(kept, theta)

    def _promp_gradient(self, state: _KeptTask, theta: Params) -> tuple[torch.Tensor, float]:
        p = self.config.outer.promp
        return promp_gradient(self.policy, theta, [loss.episodes for loss in state.inner_losses], state.inner_old,
                              state.valid, state.old_log_probs, self.config.inner.lr, p.clip, p.kl_coef)

    def promp_gradient(self, iteration: int, task_index: int, flat_params: np.ndarray) -> np.ndarray:
        """ProMP's meta-gradient at the learner's current parameters, on the kept episodes."""
        vector, _ = self._promp_gradient(self._state(iteration, task_index), self.params_from(flat_params))
        return vector.numpy().astype(np.float32)

    # -- TRPO: products and line-search values on the kept episodes ------------------------

    def _state(self, iteration: int, task_index: int) -> _KeptTask:
        try:
            return self._kept[(iteration, task_index)]
        except KeyError:
            raise LostTaskStateError(f"no episodes kept for task {task_index} of iteration {iteration}") from None

    def _adapted(self, state: _KeptTask, theta: Params, create_graph: bool) -> Params:
        return adapt(theta, list(state.inner_losses), self.config.inner.lr, create_graph)

    def trpo_hvp(self, iteration: int, task_index: int, flat_params: np.ndarray, vector: np.ndarray) -> np.ndarray:
        """Hessian at theta_old of KL(adapted at theta_old || adapted at theta), times ``vector``.

        At theta_old the KL's gradient with respect to the adapted parameters is zero, so
        its Hessian is J^T F J: F the Fisher matrix of the adapted policy, J the Jacobian of
        the adaptation, J = (I - lr H_K) ... (I - lr H_1) with H_k the Hessian of the k-th
        inner loss (symmetric, so J^T applies the same factors in reverse). That is three
        plain Hessian-vector products for one inner step instead of a backward pass through
        a third-order graph; tests check it against finite differences of the KL gradient.
        """
        state = self._state(iteration, task_index)
        lr = self.config.inner.lr
        if state.products is None:  # build the gradient graphs once per task and iteration
            params, inner = self.params_from(flat_params), []
            for loss in state.inner_losses:
                inner.append(_GradientGraph(loss, params))
                params = adapt(leaf_params(params), [loss], lr, create_graph=False)
            fisher = _GradientGraph(lambda phi: mean_kl(self.policy, phi, state.valid, state.old_dist), params)
            state.products = [*inner, fisher]
        *inner, fisher = state.products
        v = torch.tensor(vector, dtype=fisher.grad.dtype)
        for h in inner:  # J v
            v = v - lr * h.hvp(v)
        v = fisher.hvp(v)
        for h in reversed(inner):  # J^T (F J v)
            v = v - lr * h.hvp(v)
        return v.detach().numpy()

    def trpo_loss_kl(self, iteration: int, task_index: int, flat_params: np.ndarray) -> tuple[float, float]:
        """Surrogate loss and KL at candidate meta-parameters, on the kept episodes."""
        state = self._state(iteration, task_index)
        theta = leaf_params(self.params_from(flat_params))
        phi = self._adapted(state, theta, create_graph=False)
        with torch.no_grad():
            loss = surrogate_loss(self.policy, phi, state.valid, state.old_log_probs)
            kl = mean_kl(self.policy, phi, state.valid, state.old_dist)
        return float(loss), float(kl)

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self, flat_params: np.ndarray, task: Task, steps: int,
                 seed: np.random.SeedSequence) -> tuple[list[float], list[int]]:
        """Mean return after 0, 1, ..., steps adaptation steps, each on fresh episodes.

        Also returns the env steps of each of those batches: the first ``steps`` of them are
        what adaptation cost, the figure a sample-efficiency comparison needs.
        """
        returns, env_steps, _ = self.adapt_to(flat_params, task, steps, seed)
        return returns, env_steps

    def adapt_to(self, flat_params: np.ndarray, task: Task, steps: int,
                 seed: np.random.SeedSequence) -> tuple[list[float], list[int], Params]:
        """Adapt to ``task`` with real rollouts: returns and env steps per step, and the adapted params."""
        rng = np.random.default_rng(seed)
        envs = self.make_envs(task)
        params = self.params_from(flat_params)
        returns: list[float] = []
        env_steps: list[int] = []
        try:
            for k in range(steps + 1):
                loss = EpisodeLoss(self, envs, rng)
                episodes = loss.sample(params)
                returns.append(float(episodes.returns.mean()))
                env_steps.append(episodes.steps)
                if k < steps:
                    params = adapt(leaf_params(params), [loss], self.config.inner.lr, create_graph=False)
        except NonFiniteError:  # a task whose rewards break adaptation reports NaN from there on
            returns += [float("nan")] * (steps + 1 - len(returns))
            env_steps += [0] * (steps + 1 - len(env_steps))
        finally:
            envs.close()
        return returns, env_steps, {n: v.detach() for n, v in params.items()}
