"""RL² (Duan et al., 2016): meta-learning as reinforcement learning of a recurrent policy.

No gradient step adapts the policy to a task: a trial of several episodes on one task is one
long episode to the learner, and the recurrent state, carried across the trial's episodes,
is the adaptation. The outer step is PPO (clipped likelihood ratio, several epochs over
minibatches of whole trials, value loss, entropy bonus, gradient-norm clipping).

Distributed like ProMP's several outer steps: workers sample their tasks' trials at the
published parameters and keep them; each optimizer step is the mean, in task order, of
every task's gradient on its share of the minibatch (the trials of each task are shuffled
per epoch from the task's own seed and cut into ``rl2.minibatches`` parts), so a minibatch
holds trials of every task and no result depends on which worker holds which task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from metaray.algorithms.base import Algorithm, OuterContext, TaskUpdate, finite_mean
from metaray.algorithms.losses import masked_mean
from metaray.core.policy import Params, SpaceSpec, flatten
from metaray.core.recurrent import RecurrentPolicy, build_recurrent_policy
from metaray.core.trials import Trials

if TYPE_CHECKING:
    from metaray.config import Config


def ppo_loss(policy: RecurrentPolicy, params: Params, trials: Trials, clip: float, value_coef: float,
             entropy_coef: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's loss on whole trials (means over every step of every trial), and its parts."""
    out, values = policy.unroll(params, trials.inputs)
    dist = policy.dist(params, out)
    ratio = torch.exp(dist.log_prob(trials.actions) - trials.log_probs)
    adv, mask = trials.advantages, trials.mask
    policy_loss = -masked_mean(torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv), mask)
    value_loss = 0.5 * masked_mean((values - trials.returns) ** 2, mask)
    entropy = masked_mean(dist.entropy(), mask)
    loss = policy_loss + value_coef * value_loss - entropy_coef * entropy
    parts = {"policy_loss": policy_loss, "value_loss": value_loss, "entropy": entropy}
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def ppo_gradient(policy: RecurrentPolicy, theta: Params, trials: Trials, clip: float, value_coef: float,
                 entropy_coef: float) -> tuple[torch.Tensor, float]:
    """(flat gradient, loss) of :func:`ppo_loss` at ``theta``."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
    loss, _ = ppo_loss(policy, leaves, trials, clip, value_coef, entropy_coef)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grads = [torch.zeros_like(v) if g is None else g for v, g in zip(leaves.values(), grads)]
    return flatten(dict(zip(leaves, grads))).detach(), float(loss.detach())


def minibatch_order(trials: int, epochs: int, minibatches: int, seed: int) -> list[np.ndarray]:
    """Trial indices of each optimizer step: every epoch a fresh shuffle, cut into equal parts."""
    rng = np.random.default_rng(seed)
    return [part for _ in range(epochs) for part in np.array_split(rng.permutation(trials), minibatches)]


@dataclass
class RL2Task:
    """A task's trials, kept on the worker for the optimizer steps after the first."""

    trials: Trials
    order: list[np.ndarray]  # the trials of each optimizer step


class RL2(Algorithm):
    """Worker half: the PPO gradient of a task's share of a minibatch. Learner half:
    ``rl2.epochs x rl2.minibatches`` optimizer steps on one iteration's trials."""

    memory_based = True
    adapts_while_sampling = False

    @classmethod
    def check_config(cls, config: Config) -> None:
        if config.rl2.minibatches > config.inner.episodes:
            raise ValueError(f"rl2.minibatches={config.rl2.minibatches} is more than the inner.episodes="
                             f"{config.inner.episodes} trials each task samples")
        if config.policy.init != "xavier" or config.policy.output_gain is not None:
            raise ValueError("policy.init and policy.output_gain do not apply to rl2: its recurrent policy "
                             "initialises its own heads (orthogonal, gains 0.01 and 1)")

    @classmethod
    def make_policy(cls, spec: SpaceSpec, config: Config) -> RecurrentPolicy:
        c = config.rl2
        return build_recurrent_policy(spec, c.hidden_size, config.policy, config.seed, c.memory)

    @classmethod
    def no_adaptation(cls, config: Config) -> Config:
        """The same architecture, budget and PPO without memory: what the memory is worth."""
        return config.model_copy(update={"rl2": config.rl2.model_copy(update={"memory": False})}, deep=True)

    def _gradient(self, kept: RL2Task, theta: Params, step: int) -> tuple[torch.Tensor, float]:
        c = self.config.rl2
        return ppo_gradient(self.policy, theta, kept.trials.select(kept.order[step]), c.clip, c.value_coef,
                            c.entropy_coef)

    def task_update(self, theta: Params, inner: list[Trials], valid: None = None) -> TaskUpdate:
        c, trials = self.config.rl2, inner[0]
        kept = RL2Task(trials, minibatch_order(trials.mask.shape[1], c.epochs, c.minibatches, trials.seed))
        vector, loss = self._gradient(kept, theta, 0)
        return TaskUpdate(vector, loss, kept)

    def answer(self, kept: RL2Task, request: str, *args: np.ndarray) -> Any:
        if request != "gradient":
            return super().answer(kept, request, *args)
        return self._gradient(kept, self.params_from(args[0]), int(args[1]))[0].numpy()

    def outer_step(self, outer: OuterContext, mean: torch.Tensor) -> dict[str, Any]:
        c = self.config.rl2
        first_norm = float(mean.norm())
        gradient: torch.Tensor | None = mean
        for step in range(c.epochs * c.minibatches):
            if step:
                parts = outer.ask("gradient", outer.params.detach().numpy().copy(), np.asarray(step))
                gradient = finite_mean(outer, parts, self.config)
                if gradient is None:
                    break  # too few tasks left to stand for the meta-batch: stop this iteration's steps
            norm = float(gradient.norm())
            if norm > c.max_grad_norm:
                gradient = gradient * (c.max_grad_norm / norm)
            outer.apply(gradient)
        return {"grad_norm": first_norm}
