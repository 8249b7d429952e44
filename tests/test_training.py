"""End-to-end meta-training on a real embedded Ray with 2 worker actors."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from metaray.config import load_config
from metaray.core.policy import build_policy, flatten
from metaray.core.task_worker import TaskWorker
from metaray.training.run_dir import RunDir
from metaray.training.trainer import eval_run, train

TINY = ["outer.iterations=3", "outer.meta_batch_size=5", "inner.episodes=4", "rollout.horizon=20",
        "policy.hidden_sizes=[16]", "eval.tasks=4", "checkpoint.every=2"]


def _train(tmp_path, overrides, name="run"):
    cfg = load_config("quickstart", overrides)
    run = RunDir(tmp_path / name)
    run.prepare(cfg, overwrite=False)
    return cfg, run, train(cfg, run, log=lambda _: None)


@pytest.mark.parametrize("algorithm,optimizer", [("maml", "trpo"), ("reptile", "adam"), ("rl2", "adam")])
def test_same_seed_same_meta_parameters_any_worker_count(ray_local, tmp_path, algorithm, optimizer):
    # Groups of one task: the 5 tasks are 5 groups, which 2 workers split 3 + 2 (with TINY's
    # default groups of 5 a single call would hold every task whatever the worker count).
    overrides = [*TINY, "rollout.task_group_size=1", f"algorithm={algorithm}", f"outer.optimizer={optimizer}"]
    _, run, a = _train(tmp_path, overrides, "a")
    _, _, one = _train(tmp_path, [*overrides, "resources.num_workers=1"], "one")
    # A second run, in other processes, on another number of workers: bit-identical (so a run
    # repeated on the same number of workers is too; that is not run again here).
    assert np.array_equal(one["params"], a["params"]), "one worker or two: bit-identical"
    flat0 = flatten(TaskWorker(load_config("quickstart", overrides)).template).numpy()
    assert not np.allclose(a["params"], flat0), "training must move the meta-parameters"
    _, _, other_seed = _train(tmp_path, [*overrides, "seed=1"], "seed1")
    assert not np.allclose(other_seed["params"], a["params"])
    # The run directory holds the resolved config, checkpoints and one metrics row per iteration.
    metrics = pq.read_table(run.metrics_path).to_pylist()
    assert [r["iteration"] for r in metrics] == [0, 1, 2]
    assert all(r["env_steps"] > 0 and r["time_iteration_s"] > 0 for r in metrics)
    assert {"127.0.0.2=5"} == {r["tasks_per_node"] for r in metrics}
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["checkpoint_000002.pt", "checkpoint_000003.pt"]
    ckpt = run.latest_checkpoint()
    assert ckpt["iteration"] == 3 and np.array_equal(ckpt["params"].numpy(), a["params"])
    assert run.load_config() == load_config("quickstart", overrides)


# Budgets that fit CI (2 cores); each run takes well under a minute there. 20 iterations where, with these
# seeds (OMP_NUM_THREADS=1 and 2 alike), the smaller of the held-out gaps (post - pre, post - random-init post)
# is at least as far above the margin at 20 as at 30; 30 where it is not (the gaps at 15, 20 and 30 iterations):
#   maml/navigation2d   > 8:  8.8, 15.4, 13.1..15.9   and 135, 144, 143..146
#   reptile/navigation2d > 5: 5.2,  6.6, 10.7..11.2   and 132, 135, 141..142
#   maml/cartpole      > 10:  6.5, 13.3, 40.4         and 3.8, 11.6, 28.5 (10.5 at 25: not monotonic)
#   promp/navigation2d  > 8: 15.0, 24.8, 24.1..24.8   and 142, 151, 152
#   reptile/cartpole   > 10: 12.9, 19.5, 14.8         and 10.6, 19.1, 29.4
LEARNING = {
    ("maml", "navigation2d"): (["outer.iterations=20"], 8.0),
    ("reptile", "navigation2d"): (["algorithm=reptile", "inner.steps=2", "outer.iterations=30"], 5.0),
    ("maml", "cartpole"): (["task.family=cartpole", "outer.iterations=30"], 10.0),
    ("promp", "navigation2d"): (["algorithm=promp", "outer.iterations=20"], 8.0),
    ("reptile", "cartpole"): (["task.family=cartpole", "algorithm=reptile", "inner.steps=4", "inner.lr=0.2",
                               "outer.lr=0.02", "outer.iterations=20"], 10.0),
}


@pytest.mark.parametrize("algorithm,family", list(LEARNING))
def test_meta_training_learns_to_adapt(ray_local, tmp_path, algorithm, family):
    """Held-out tasks, fixed seeds: one adaptation step must help, and help more than from scratch."""
    overrides, margin = LEARNING[(algorithm, family)]
    cfg, _, summary = _train(tmp_path, [*overrides, "eval.tasks=40", "eval.steps=1"])
    pre, post = summary["eval"].mean_return
    runner = TaskWorker(cfg)
    random_init = flatten(build_policy(runner.spec, cfg.policy, seed=12345).params()).numpy()
    _, random_post = eval_run(cfg, random_init, tasks=40, steps=1, seed=cfg.seed).mean_return
    print(f"{algorithm}/{family}: pre {pre:.2f} post {post:.2f} random-init post {random_post:.2f}")
    assert post > pre + margin
    assert post > random_post + margin
