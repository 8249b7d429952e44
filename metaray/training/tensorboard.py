"""TensorBoard event files in the run directory, under namespaced tags.

``tensorboard --logdir runs/`` then lists every run (and its pretrained baseline) by name.
A resumed run purges the events past its checkpoint, so its curves have no doubled steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Per-iteration metrics row key -> TensorBoard tag.
TAGS = {
    "pre_return": "returns/pre_adaptation",
    "post_return": "returns/post_adaptation",
    "pre_success_rate": "success/pre_adaptation",
    "post_success_rate": "success/post_adaptation",
    "env_steps_per_s": "perf/env_steps_per_s",
    "time_iteration_s": "perf/iteration_s",
    "total_env_steps": "perf/total_env_steps",
    "outer_loss": "losses/outer",
    "grad_norm": "losses/grad_norm",
    "trpo_kl": "losses/trpo_kl",
    "trpo_ls_steps": "losses/trpo_ls_steps",
    "trpo_accepted": "losses/trpo_accepted",
    "rejected_results": "faults/rejected_results",
    "worker_failures": "faults/worker_failures",
    "task_retries": "faults/task_retries",
}


class EventLog:
    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def iteration(self, row: dict[str, Any]) -> None:
        step = row["iteration"]
        for key, tag in TAGS.items():
            value = row.get(key)
            if value is not None and value == value:  # NaN: not reported (a family without success)
                self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def evaluation(self, iteration: int, mean_return: list[float]) -> None:
        """Held-out return after k adaptation steps, at the iteration evaluated."""
        for k, value in enumerate(mean_return):
            self.writer.add_scalar(f"eval/return_after_{k}_steps", value, iteration)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
