"""Careless input against run directories: nothing saved is lost, nothing outside a run is touched."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

from metaray.config import load_config
from metaray.training.run_dir import RunDir, write_rows
from tests.conftest import run_cli

QUICK = ["--set", "outer.iterations=1", "--set", "outer.meta_batch_size=2", "--set", "inner.episodes=2",
         "--set", "rollout.horizon=5", "--set", "eval.tasks=1"]


def _one_line_usage_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr


def test_overwrite_replaces_only_a_metaray_run_directory(tmp_path: Path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "important.txt").write_text("keep me")
    (precious / "config.yaml").write_text("not ours\n")
    err = _one_line_usage_error(run_cli("train", "quickstart", *QUICK, "--output", str(precious), "--overwrite"))
    assert "replaces only a metaray run directory" in err and "'important.txt'" in err
    assert (precious / "important.txt").read_text() == "keep me"
    # The working directory (full of other things) as --output.
    err = _one_line_usage_error(run_cli("train", "quickstart", *QUICK, "--output", ".", "--overwrite",
                                        cwd=precious))
    assert "nothing was deleted" in err and sorted(os.listdir(precious)) == ["config.yaml", "important.txt"]
    # A symbolic link, even to a real run directory, and a plain file.
    run = RunDir(tmp_path / "run")
    run.prepare(load_config("quickstart"), overwrite=False)
    (tmp_path / "link").symlink_to(run.path)
    err = _one_line_usage_error(run_cli("train", "quickstart", *QUICK, "--output", str(tmp_path / "link"),
                                        "--overwrite"))
    assert "is a symbolic link" in err and run.config_path.is_file()
    (tmp_path / "file").write_text("x")
    err = _one_line_usage_error(run_cli("train", "quickstart", *QUICK, "--output", str(tmp_path / "file")))
    assert "is a file, not a directory" in err and (tmp_path / "file").read_text() == "x"


def test_files_honour_the_umask(tmp_path: Path):
    """Written atomically through mkstemp (0600), they must come out as the umask says (0644 under 022),
    so a serving pod under another uid can read the run."""
    umask = os.umask(0)
    os.umask(umask)
    cfg = load_config("quickstart", ["policy.hidden_sizes=[4]"])
    run = RunDir(tmp_path / "run")
    run.prepare(cfg, overwrite=False)
    import torch

    from metaray.core.task_worker import TaskWorker

    path = run.save_checkpoint(1, {"params": torch.zeros(TaskWorker(cfg).n_params), "optimizer": None}, cfg, 3)
    write_rows(run.eval_path, [{"a": 1}])
    for f in (run.config_path, path, run.eval_path):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def test_eval_prints_its_results_before_a_failed_write(nav_run: Path, tmp_path: Path, ray_address):
    """eval.parquet cannot be written (here: a directory is in its way, which stops root too): the
    results are on stdout all the same, the failure is one line on stderr, exit 1."""
    run = tmp_path / "nav"
    shutil.copytree(nav_run, run)
    if (run / "eval.parquet").exists():
        (run / "eval.parquet").unlink()
    (run / "eval.parquet").mkdir()
    (run / "eval.parquet" / "blocker").write_text("x")
    proc = run_cli("eval", str(run), "--tasks", "2", "--steps", "1", "--json", "--address", ray_address)
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["mean_return"]) == 2
    assert "the results above were not saved" in proc.stderr and "Traceback" not in proc.stderr
