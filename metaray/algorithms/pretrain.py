"""The no-adaptation baseline: one policy trained on every training task's batches.

Every batch of a task is sampled at theta and the objective is the plain policy gradient
on all of them, with no adaptation in it: MAML with zero inner steps, so TRPO applies
with J = I. It gets the run's whole sampling budget, which makes it a fair comparison.
"""

from __future__ import annotations

from metaray.algorithms.base import TaskUpdate
from metaray.algorithms.losses import surrogate_loss
from metaray.algorithms.maml import meta_gradient
from metaray.algorithms.trpo import TRPOOuter
from metaray.core.policy import Params
from metaray.core.rollout import Episodes, concat_episodes


class Pretrain(TRPOOuter):
    adapts_while_sampling = False

    def task_update(self, theta: Params, inner: list[Episodes], valid: Episodes | None) -> TaskUpdate:
        combined = concat_episodes([*inner, valid])
        vector, loss, phi = meta_gradient(
            theta, [], lambda p: surrogate_loss(self.policy, p, combined, combined.log_probs), self.lr, False)
        return TaskUpdate(vector, float(loss), self.keep([], combined, phi))
