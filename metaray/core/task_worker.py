"""What a worker does for any algorithm, in pure torch: build envs, sample batches, hand the
episodes to the algorithm's worker half, keep what it asks to keep.

A worker actor wraps one TaskWorker. Each task's randomness comes from a seed the learner
derives from (run seed, iteration, task index), never from the process it runs in, and
tasks share batched kernels only within their fixed group (``rollout.task_group_size``
consecutive task indices), so results do not depend on which worker runs which task, how
many tasks it holds, or how many threads its BLAS uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from metaray.algorithms.adapt import leaf_params
from metaray.algorithms.base import Algorithm, make_algorithm, resolve_algorithm
from metaray.config import Config
from metaray.core.advantages import compute_advantages
from metaray.core.policy import Params, SpaceSpec, unflatten
from metaray.core.rollout import Episodes, collect_many
from metaray.core.trial_worker import run_trial_tasks, trial_returns
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
    vector: np.ndarray  # the algorithm's contribution (a meta-gradient, Reptile's phi - theta), float32
    outer_loss: float
    pre_return: float  # mean episode return before adaptation
    post_return: float  # mean episode return after inner.steps adaptation steps (NaN: not sampled)
    env_steps: int  # env steps of the batches the update was computed from
    metric_env_steps: int = 0  # env steps sampled only to measure (Reptile's optional post-adaptation batch)
    timings: dict[str, float] = field(default_factory=dict)
    worker: str = ""
    pre_success: float = float("nan")  # success rate of the pre-adaptation episodes (NaN: the env reports none)
    post_success: float = float("nan")  # the same after adaptation (NaN also when not sampled)


class Batch:
    """One batch of a task's episodes, sampled on first use with its own seeds."""

    def __init__(self, envs: BatchedEnv, rng: np.random.Generator, group: int = 0) -> None:
        self.envs, self.group = envs, group
        self.env_seeds = rng.integers(0, 2**31 - 1, size=envs.num_envs).tolist()
        self.torch_seed = int(rng.integers(0, 2**62))
        self.episodes: Episodes | None = None
        self.sample_s = 0.0


class TaskWorker:
    def __init__(self, config: Config, family: TaskFamily | None = None) -> None:
        self.config = config
        self.family = family or make_family(config.task.family, config.task.options)
        probe_task = self.family.sample_tasks(1, np.random.default_rng(0))[0]
        probe = self.make_env(probe_task)
        self.spec = SpaceSpec.from_env(probe)
        probe.close()
        self.policy = resolve_algorithm(config.algorithm).make_policy(self.spec, config)
        self.template = self.policy.params()
        self.n_params = sum(p.numel() for p in self.template.values())
        self.algorithm: Algorithm = make_algorithm(config, self.policy, self.template)
        self._kept: dict[tuple[int, int], Any] = {}

    # -- environments and sampling --------------------------------------------------------------

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

    def group_of(self, task_index: int) -> int:
        return task_index // self.config.rollout.task_group_size

    def sample(self, params: list[Params], batches: list[Batch]) -> None:
        """Fill each batch's episodes: all stepped together, one policy forward per group."""
        if not batches:
            return
        if not all(_finite(p) for p in params):
            raise NonFiniteError("non-finite policy parameters")
        start = time.perf_counter()
        gens = [torch.Generator().manual_seed(b.torch_seed) for b in batches]
        detached = [{k: v.detach() for k, v in p.items()} for p in params]
        r = self.config.rollout
        episodes = collect_many(self.policy, detached, [b.envs for b in batches], r.horizon,
                                [b.env_seeds for b in batches], gens, [b.group for b in batches])
        elapsed = time.perf_counter() - start
        for batch, eps in zip(batches, episodes):
            batch.episodes = compute_advantages(eps, r.gamma, r.gae_lambda, r.normalize_advantages)
            batch.sample_s = elapsed / len(batches)

    # -- the tasks of a training iteration ----------------------------------------------------

    def run_tasks(
        self, flat_params: np.ndarray, jobs: list[tuple[int, Task, np.random.SeedSequence]], iteration: int = 0,
    ) -> list[TaskResult]:
        """Several tasks of an iteration at once, in task-index order.

        Each inner step's batch, then the post-adaptation one, of every task is sampled
        together; then the algorithm computes each task's update from its own episodes.
        Give whole groups: a task's result is the same whichever groups run beside it
        (a test checks it bit for bit under 1, 2 and 4 threads).
        """
        if self.algorithm.memory_based:
            return run_trial_tasks(self, flat_params, jobs, iteration)
        start = time.perf_counter()
        jobs = sorted(jobs, key=lambda job: job[0])
        algo, steps = self.algorithm, self.config.inner.steps
        theta = self.params_from(flat_params)
        runs: list[tuple[BatchedEnv, list[Batch], Batch | None]] = []
        for task_index, task, seed in jobs:
            rng = np.random.default_rng(seed)
            envs, group = self.make_envs(task), self.group_of(task_index)
            inner = [Batch(envs, rng, group) for _ in range(steps)]
            post = Batch(envs, rng, group)  # its seeds are drawn even when unused: the same streams either way
            runs.append((envs, inner, post if algo.samples_post_batch else None))
        current = [theta] * len(jobs)
        for k in range(steps + 1):
            todo = [(i, run[1][k] if k < steps else run[2]) for i, run in enumerate(runs) if _finite(current[i])]
            todo = [(i, b) for i, b in todo if b is not None]
            self.sample([current[i] for i, _ in todo], [b for _, b in todo])
            if k < steps and algo.adapts_while_sampling:  # where the next batch is sampled from
                for i, b in todo:
                    current[i] = {n: v.detach() for n, v in algo.adapt(leaf_params(current[i]), [b.episodes]).items()}
        setup_s = time.perf_counter() - start - sum(b.sample_s for run in runs for b in _batches(run))
        results = []
        for (task_index, _, _), run in zip(jobs, runs):
            envs, inner, post = run
            task_start = time.perf_counter()
            vector, loss = self._update(iteration, task_index, theta, inner, post)
            envs.close()
            nan = float("nan")
            trained = [b.episodes.steps for b in [*inner, post] if b is not None and b.episodes is not None]
            measured = post.episodes.steps if post is not None and post.episodes is not None else 0
            metric_only = algo.post_batch_for_metrics_only
            results.append(TaskResult(
                task_index=task_index,
                vector=vector.numpy().astype(np.float32),
                outer_loss=loss,
                pre_return=float(inner[0].episodes.returns.mean()) if inner[0].episodes is not None else nan,
                post_return=float(post.episodes.returns.mean()) if measured else nan,
                pre_success=inner[0].episodes.success_rate if inner[0].episodes is not None else nan,
                post_success=post.episodes.success_rate if measured else nan,
                env_steps=sum(trained) - (measured if metric_only else 0),
                metric_env_steps=measured if metric_only else 0,
                timings={"sample_s": sum(b.sample_s for b in _batches(run)),
                         "adapt_s": time.perf_counter() - task_start + setup_s / len(jobs)},
            ))
        return results

    def _update(self, iteration: int, task_index: int, theta: Params, inner: list[Batch],
                post: Batch | None) -> tuple[torch.Tensor, float]:
        """The algorithm's update, or NaN (counted and rejected by the learner, never applied)."""
        if any(b.episodes is None for b in inner) or (post is not None and post.episodes is None):
            return self.update(iteration, task_index, theta, None)  # sampling hit non-finite params
        return self.update(iteration, task_index, theta, [b.episodes for b in inner],
                           post.episodes if post is not None else None)

    def update(self, iteration: int, task_index: int, theta: Params, inner: list[Any] | None,
               valid: Any = None) -> tuple[torch.Tensor, float]:
        """The algorithm's update from a task's samples (None: sampling failed, the update is NaN);
        what it asks to keep is kept for this iteration's requests only."""
        for key in [k for k in self._kept if k[0] != iteration]:
            del self._kept[key]
        self._kept.pop((iteration, task_index), None)  # a retried iteration's earlier draw never answers
        if inner is None:
            return torch.full((self.n_params,), float("nan")), float("nan")
        update = self.algorithm.task_update(theta, inner, valid)
        if update.kept is not None:
            self._kept[(iteration, task_index)] = update.kept
        return update.vector.detach(), float(update.loss)

    def _kept_state(self, iteration: int, task_index: int) -> Any:
        try:
            return self._kept[(iteration, task_index)]
        except KeyError:
            raise LostTaskStateError(f"no episodes kept for task {task_index} of iteration {iteration}") from None

    def answer(self, iteration: int, task_index: int, request: str, *args: np.ndarray) -> Any:
        """The algorithm's answer to a learner-half request about a task this worker kept."""
        return self.algorithm.answer(self._kept_state(iteration, task_index), request, *args)

    def answer_sum(self, iteration: int, task_indices: list[int], request: str, *args: np.ndarray) -> np.ndarray:
        """The in-order sum of the answers about a task group's tasks (computed together where the
        algorithm can)."""
        return self.algorithm.answer_sum([self._kept_state(iteration, i) for i in task_indices], request, *args)

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self, flat_params: np.ndarray, task: Task, steps: int,
                 seed: np.random.SeedSequence) -> tuple[list[float], list[int], list[float]]:
        """Mean return after 0, 1, ..., steps adaptation steps, each on fresh episodes.

        Also returns the env steps of each of those batches: the first ``steps`` of them are
        what adaptation cost, the figure a sample-efficiency comparison needs; and each
        batch's success rate (NaN where the family reports no success).
        """
        returns, env_steps, _, success = self.adapt_to(flat_params, task, steps, seed)
        return returns, env_steps, success

    def adapt_to(self, flat_params: np.ndarray, task: Task, steps: int,
                 seed: np.random.SeedSequence) -> tuple[list[float], list[int], Params, list[float]]:
        """Adapt to ``task`` with real rollouts: returns and env steps per step, the adapted params,
        and the success rate per step (NaN where the family reports no success)."""
        if self.algorithm.memory_based:  # the trial's episodes; the state, not the weights, adapts
            returns, env_steps, success = trial_returns(self, flat_params, task, steps, seed)
            return returns, env_steps, {n: v.detach() for n, v in self.params_from(flat_params).items()}, success
        rng = np.random.default_rng(seed)
        envs = self.make_envs(task)
        params = self.params_from(flat_params)
        returns: list[float] = []
        env_steps: list[int] = []
        success: list[float] = []
        try:
            for k in range(steps + 1):
                batch = Batch(envs, rng)
                self.sample([params], [batch])
                returns.append(float(batch.episodes.returns.mean()))
                env_steps.append(batch.episodes.steps)
                success.append(batch.episodes.success_rate)
                if k < steps:
                    params = self.algorithm.adapt(leaf_params(params), [batch.episodes])
        except NonFiniteError:  # a task whose rewards break adaptation reports NaN from there on
            returns += [float("nan")] * (steps + 1 - len(returns))
            env_steps += [0] * (steps + 1 - len(env_steps))
            success += [float("nan")] * (steps + 1 - len(success))
        finally:
            envs.close()
        return returns, env_steps, {n: v.detach() for n, v in params.items()}, success


def _batches(run: tuple[BatchedEnv, list[Batch], Batch | None]) -> list[Batch]:
    return [b for b in [*run[1], run[2]] if b is not None]
