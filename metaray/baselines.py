"""The baselines a meta-learned policy is judged against, on the same held-out tasks.

- random: the policy metaray started from (seeded from the config), adapted the same way.
- pretrained: one policy trained jointly on all training tasks with no adaptation in its
  objective (``algorithm: pretrain``), with the run's budget (iterations, tasks, episodes),
  then adapted the same way. It is trained once into RUN_DIR/baselines/pretrained and
  reused (or resumed, if a previous attempt was interrupted).
- ppo: RLlib's PPO from scratch on each held-out task (see metaray.ppo).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from metaray.config import Config, ConfigError
from metaray.policy import flatten
from metaray.progress import Progress
from metaray.run_dir import RunDir
from metaray.task_runner import TaskRunner

NAMES = ("random", "pretrained", "ppo")
DEFAULT = ("random", "pretrained")


def parse_names(value: str) -> list[str]:
    """``random,pretrained,ppo`` (or ``all``) -> names in canonical order; ConfigError otherwise."""
    names = {n.strip() for n in value.split(",") if n.strip()}
    if "all" in names:
        names = (names - {"all"}) | set(NAMES)
    unknown = sorted(names - set(NAMES))
    if unknown or not names:
        raise ConfigError(f"--baselines {value!r}: unknown baseline {', '.join(unknown) or '(none)'}; "
                          f"allowed: {', '.join(NAMES)} or all, comma-separated")
    return [n for n in NAMES if n in names]


def random_params(config: Config) -> np.ndarray:
    return flatten(TaskRunner(config).template).numpy()


def pretrain_config(config: Config) -> Config:
    """The run's config with the no-adaptation objective: same budget, same optimizer."""
    return config.model_copy(update={"algorithm": "pretrain"}, deep=True)


def pretrained_params(config: Config, run: RunDir, progress: Progress) -> tuple[np.ndarray, Path]:
    """Train (or reuse, or finish) the pretrained baseline of ``run``; its final params."""
    from metaray.trainer import train

    base = RunDir(run.path / "baselines" / "pretrained")
    cfg = pretrain_config(config)
    files = base.checkpoint_files() if base.config_path.is_file() else []
    if files:
        if base.load_config() != cfg:
            raise ConfigError(f"{base.path} was trained with another config than {run.config_path} implies; "
                              f"delete it to train the pretrained baseline again")
        checkpoint = base.latest_checkpoint()
        if checkpoint["iteration"] >= cfg.outer.iterations:
            progress.message(f"pretrained baseline: reusing {base.path}")
            return checkpoint["params"].numpy(), base.path
        progress.message(f"pretrained baseline: resuming {base.path} at iteration {checkpoint['iteration']}")
        return train(cfg, base, progress=progress, resume=True)["params"], base.path
    progress.message(f"pretrained baseline: training algorithm pretrain with the run's budget into {base.path}")
    base.prepare(cfg, overwrite=True)
    return train(cfg, base, progress=progress)["params"], base.path
