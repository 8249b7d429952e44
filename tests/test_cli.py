"""The CLI end to end: every algorithm on every built-in family, eval JSON, user families."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from metaray.config import load_config
from metaray.tasks import BUILTIN_FAMILIES
from metaray.training.run_dir import RunDir
from tests.conftest import run_cli

SMOKE = ["-s", "outer.iterations=2", "-s", "outer.meta_batch_size=3", "-s", "inner.episodes=3",
         "-s", "rollout.horizon=15", "-s", "policy.hidden_sizes=[8]", "-s", "eval.tasks=3", "-s", "eval.steps=2"]
OPTIMIZERS = {"maml": ["adam", "trpo"], "fomaml": ["adam"], "reptile": ["sgd"], "pretrain": ["trpo"],
              "promp": ["adam"]}


# The MuJoCo families train in their own smoke tests (slower envs, larger policies): the locomotion
# ones below, Meta-World's in test_metaworld.py. Told apart by module, not by whether they batch:
# the locomotion families batch too (on the mujoco bindings), and every algorithm on each of them
# here doubled this test's share of CI for no path the classic families do not cover.
MUJOCO_MODULES = {"metaray.tasks.locomotion", "metaray.tasks.metaworld"}
FAST_FAMILIES = sorted(n for n, cls in BUILTIN_FAMILIES.items() if cls.__module__ not in MUJOCO_MODULES)


CASES = [(a, o, f) for a, opts in OPTIMIZERS.items() for o in opts for f in FAST_FAMILIES]


def _run_all(one: Callable[[Any], Any], keys: list) -> dict:
    """``one(key)`` for every key, three at a time: key -> its result, or the exception it raised,
    for the key's own test to re-raise (one run's failure is not every test's). An interrupt
    cancels what has not started instead of waiting for every queued run."""
    def caught(key: Any) -> Any:
        try:
            return one(key)
        except Exception as err:  # handed to the key's own test
            return err

    pool = ThreadPoolExecutor(3)
    try:
        futures = {key: pool.submit(caught, key) for key in keys}
        return {key: future.result() for key, future in futures.items()}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(runs: dict, key: Any) -> Any:
    found = runs[key]
    if isinstance(found, Exception):
        raise found
    return found


def _evaluated(algorithm: str, optimizer: str, family: str) -> bool:
    """``metaray eval`` of every algorithm on a continuous family and of one on each family: eval's
    paths differ by how an algorithm adapts and by the policy's head, not by their product."""
    return family == "navigation2d" or (algorithm, optimizer) == ("maml", "adam")


@pytest.fixture(scope="module")
def smoke_runs(ray_address, tmp_path_factory) -> dict[tuple[str, str, str], tuple[Path, Any, Any]]:
    """Every case trained (then evaluated, where _evaluated says), three runs at a time on the
    session's Ray, each with one worker of half a CPU: the session Ray's 2 CPUs hold them, and
    most of a smoke run is interpreters and actors starting (several workers per run, and the
    learner's requests to the worker that holds a task, are tested in test_training.py and
    test_determinism.py). Each test below checks its own case's processes and files."""
    tmp = tmp_path_factory.mktemp("smoke")

    def one(case: tuple[str, str, str]) -> tuple[Path, Any, Any]:
        algorithm, optimizer, family = case
        out = tmp / "-".join(case)
        train = run_cli("train", "quickstart", *SMOKE, "-s", f"algorithm={algorithm}", "-s", f"task.family={family}",
                        "-s", f"outer.optimizer={optimizer}", "-s", "resources.num_workers=1",
                        "-s", "resources.cpus_per_worker=0.5",
                        "--output", str(out), "--address", ray_address)
        evaluated = None
        if train.returncode == 0 and _evaluated(*case):
            evaluated = run_cli("eval", str(out), "--tasks", "3", "--steps", "2", "--json", "--address", ray_address)
        return out, train, evaluated

    return _run_all(one, CASES)


@pytest.mark.parametrize("algorithm,optimizer,family", CASES)
def test_every_algorithm_on_every_family(smoke_runs, algorithm, optimizer, family):
    """Joins the session's Ray through --address (the embedded path is tested below)."""
    out, proc, evaluated = _result(smoke_runs, (algorithm, optimizer, family))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "iter    2/2" in proc.stdout and "pre-adaptation return" in proc.stdout
    assert (out / "metrics.parquet").is_file() and (out / "checkpoints" / "checkpoint_000002.pt").is_file()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["algorithm"] == algorithm and saved["task"]["family"] == family
    metrics = RunDir(out).read_metrics()
    assert all(math.isfinite(r["pre_return"]) and math.isfinite(r["outer_loss"] if algorithm != "reptile" else 0.0)
               and r["rejected_results"] == 0 for r in metrics), metrics
    if not _evaluated(algorithm, optimizer, family):
        return
    assert evaluated is not None and evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert len(result["mean_return"]) == 3 and len(result["std_return"]) == 3
    assert all(isinstance(x, float) and math.isfinite(x) for x in result["mean_return"] + result["std_return"])


def _user_config(tmp_path: Path, **options) -> Path:
    cfg = yaml.safe_load((Path(__file__).parent.parent / "metaray/presets/quickstart.yaml").read_text())
    cfg["task"] = {"family": "tests.custom_family:GoalLine", "options": {"max_speed": 0.2, **options}}
    cfg["outer"].update(iterations=3, meta_batch_size=4)
    cfg["inner"]["episodes"] = 4
    cfg["rollout"]["horizon"] = 20
    cfg["eval"] = {"tasks": 4, "steps": 1}
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_user_family_trains_and_evaluates_on_embedded_ray(tmp_path: Path):
    out = tmp_path / "run"
    proc = run_cli("train", str(_user_config(tmp_path)), "--output", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "iter    3/3" in proc.stdout
    proc = run_cli("eval", str(out), "--tasks", "5", "--steps", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "5 held-out tasks" in lines[0] and [line.split()[0] for line in lines[3:5]] == ["0", "1"]
    assert lines[-1] == f"wrote {out / 'eval.parquet'}"


def test_user_family_whose_make_env_fails_names_task_and_family(tmp_path: Path):
    out = tmp_path / "run"
    proc = run_cli("train", str(_user_config(tmp_path, broken=True)), "--output", str(out))
    assert proc.returncode == 1
    assert "task family 'tests.custom_family:GoalLine' failed to make an env for task {'target'" in proc.stderr
    assert "simulator licence expired" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_eval_of_a_directory_that_is_not_a_run(tmp_path: Path):
    proc = run_cli("eval", str(tmp_path))
    assert proc.returncode == 2 and "not a metaray run directory" in proc.stderr


LOCOMOTION = [("halfcheetah-vel", "maml"), ("halfcheetah-dir", "promp"), ("ant-dir", "maml")]
PRESETS = ["bandit-rl2", "navigation2d-rl2", "ml1-reach-rl2", "ml1-push-promp"]


@pytest.fixture(scope="module")
def preset_runs(ray_address, tmp_path_factory) -> dict[str, tuple[Path, Any, Any]]:
    """The shipped MuJoCo, RL² and Meta-World presets not smoke-run elsewhere, shrunk to fit CI,
    through the CLI: three runs at a time on the session's Ray (their 2 workers a quarter of a
    CPU each, so that they fit its 2 CPUs). Keyed by preset."""
    tmp = tmp_path_factory.mktemp("presets")
    share = ["-s", "resources.cpus_per_worker=0.25", "--address", ray_address]
    runs: dict[str, list[str]] = {
        family: ["train", family, "-s", f"algorithm={algorithm}", "-s",
                 f"outer.optimizer={'trpo' if algorithm == 'maml' else 'adam'}", "-s", "outer.iterations=2",
                 "-s", "outer.meta_batch_size=2", "-s", "inner.episodes=2", "-s", "rollout.horizon=20",
                 "-s", "resources.num_workers=2", "-s", "eval.tasks=2", "-s", "eval.steps=1", *share]
        for family, algorithm in LOCOMOTION}
    runs.update({preset: ["train", preset, "-s", "outer.iterations=2", "-s", "outer.meta_batch_size=2",
                          "-s", "inner.episodes=2", "-s", "rollout.horizon=5", "-s", "eval.tasks=1", *share]
                 for preset in PRESETS})

    def one(name: str) -> tuple[Path, Any, Any]:
        out = tmp / name
        train = run_cli(*runs[name], "--output", str(out))
        evaluated = None
        if name == "bandit-rl2" and train.returncode == 0:  # eval's default steps for a memory-based run
            evaluated = run_cli("eval", str(out), "--tasks", "1", "--json", "--address", ray_address)
        return out, train, evaluated

    return _run_all(one, list(runs))


@pytest.mark.parametrize("family,algorithm", LOCOMOTION)
def test_locomotion_presets_train_a_few_iterations(preset_runs, family, algorithm):
    """The shipped MuJoCo presets, shrunk to fit CI: real MuJoCo rollouts, TRPO outer steps."""
    out, proc, _ = _result(preset_runs, family)
    optimizer = "trpo" if algorithm == "maml" else "adam"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "iter    2/2" in proc.stdout
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["policy"] == {"hidden_sizes": [100, 100], "activation": "relu", "init": "orthogonal",
                               "init_log_std": -1.6}
    assert saved["inner"] == {"steps": 1, "lr": 0.1, "episodes": 2} and saved["outer"]["optimizer"] == optimizer
    # The line search's outcome is in every TRPO row: a step taken is inside the KL ball.
    for row in RunDir(out).read_metrics():
        if optimizer == "trpo":
            assert 0 <= row["trpo_ls_steps"] <= saved["outer"]["trpo"]["ls_max_steps"]
            assert not row["trpo_accepted"] or 0 <= row["trpo_kl"] <= saved["outer"]["trpo"]["max_kl"]
        else:
            assert row["trpo_ls_steps"] is None and row["trpo_accepted"] is None


@pytest.mark.parametrize("preset", PRESETS)
def test_rl2_and_meta_world_presets_train_a_few_iterations(preset_runs, preset):
    """The shipped RL² and Meta-World presets not smoke-run elsewhere, shrunk to fit CI, through the CLI."""
    out, proc, evaluated = _result(preset_runs, preset)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "iter    2/2" in proc.stdout
    saved = yaml.safe_load((out / "config.yaml").read_text())
    shipped = load_config(preset)
    assert saved["algorithm"] == shipped.algorithm and saved["task"] == shipped.task.model_dump(mode="json")
    if saved["algorithm"] == "rl2":  # step k is the trial's (k+1)-th episode, and says so
        assert "episode 1 of a trial" in proc.stdout and "pre-adaptation return" not in proc.stdout
    if preset == "bandit-rl2":  # eval's default steps: the trial's episodes after the first
        assert evaluated is not None and evaluated.returncode == 0, evaluated.stderr
        assert len(json.loads(evaluated.stdout)["mean_return"]) == saved["rl2"]["episodes_per_trial"]


def test_config_env_is_what_a_submitted_job_reads(tmp_path: Path, monkeypatch):
    """`train --config-env VAR` (a job's resolved config) is checked like a file: bad input is
    one line naming the variable, exit 2, nothing written."""
    monkeypatch.setenv("METARAY_TEST_CONFIG", "seed: -1\n")
    for args, words in [(["--config-env", "METARAY_TEST_CONFIG"], "the config in $METARAY_TEST_CONFIG: seed"),
                        (["--config-env", "METARAY_NO_SUCH_VARIABLE"], "no such environment variable"),
                        (["quickstart", "--config-env", "METARAY_TEST_CONFIG"], "not both")]:
        proc = run_cli("train", *args, "--output", str(tmp_path / "run"))
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "run").exists()
