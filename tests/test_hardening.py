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
    # Another tool's run: a config.yaml and checkpoints/ of its own.
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "config.yaml").write_text("seed: 3\n")
    (other / "checkpoints" / "epoch=9.ckpt").write_text("weights")
    err = _one_line_usage_error(run_cli("train", "quickstart", *QUICK, "--output", str(other), "--overwrite"))
    assert "checkpoints/'epoch=9.ckpt'" in err and (other / "checkpoints" / "epoch=9.ckpt").is_file()
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


def _write_raw_checkpoint(path: Path, payload) -> None:
    """A checkpoint whose checksum is valid whatever it holds: only the contents can be wrong."""
    import hashlib
    import io

    import torch

    from metaray.training import run_dir

    buf = io.BytesIO()
    torch.save(payload, buf)
    raw = buf.getvalue()
    path.write_bytes(run_dir._MAGIC + hashlib.sha256(raw).digest() + raw)


def test_checkpoint_with_a_valid_checksum_but_bad_contents(nav_run: Path, tmp_path: Path):
    import torch

    run = tmp_path / "nav"
    shutil.copytree(nav_run, run)
    newest = RunDir(run).checkpoint_files()[-1]
    good = RunDir.read_checkpoint(newest)
    for broken, words in [({k: v for k, v in good.items() if k != "params"}, "no params"),
                          ({**good, "iteration": "7"}, "iteration '7' is not a non-negative integer"),
                          ({**good, "params": torch.zeros(3, 3)}, "no params"),
                          ({**good, "params": good["params"].half()}, "no params"),
                          ({**good, "optimizer": {"lr": 1}}, "not a torch optimizer's state_dict"),
                          ([1, 2, 3], "a list, not a mapping")]:
        _write_raw_checkpoint(newest, broken)
        for command in (["eval", str(run)], ["serve", str(run)], ["train", "--resume", str(run)]):
            err = _one_line_usage_error(run_cli(*command))
            assert "has bad contents" in err and words in err, err


def test_eval_and_serve_refuse_a_config_edited_after_training(nav_run: Path, tmp_path: Path):
    """Checked against the checkpoint before Ray starts: one line naming the fields, exit 2."""
    run = tmp_path / "nav"
    shutil.copytree(nav_run, run)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("- 64\n", "- 32\n", 1).replace("seed: 0", "seed: 5"))
    before = (run / "eval.parquet").read_bytes()
    for command in ("eval", "serve"):
        err = _one_line_usage_error(run_cli(command, str(run), timeout=120))
        assert "does not match its checkpoint" in err and "policy.hidden_sizes" in err and "seed" in err, err
    assert (run / "eval.parquet").read_bytes() == before


def test_resume_refuses_torch_threads_edited_into_config_yaml(nav_run: Path, tmp_path: Path):
    """eval may run a run with other resources, a resume may not change torch_threads: it is
    checked against the checkpoint's own config, not config.yaml."""
    run = tmp_path / "nav"
    shutil.copytree(nav_run, run)
    text = (run / "config.yaml").read_text()
    assert "torch_threads: 1\n" in text
    (run / "config.yaml").write_text(text.replace("torch_threads: 1\n", "torch_threads: 2\n"))
    err = _one_line_usage_error(run_cli("train", "--resume", str(run), "--set", "outer.iterations=40"))
    assert "cannot change resources.torch_threads" in err, err


def _metrics_iterations(run: Path) -> list[int]:
    from metaray.training.run_dir import read_rows

    return [int(r["iteration"]) for r in read_rows(run / "metrics.parquet")]


def test_one_writer_per_run_directory(tmp_path: Path, ray_address):
    """The issue's reproduction: a second `train --resume` (and eval, and --overwrite) into a
    directory a running `train` writes is refused, naming the holder; once the holder is killed
    (SIGKILL: no clean-up) its lock is stale and a resume takes over, continuing the same run."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "metaray.cli", "train", "quickstart", "--output", str(run), "--address", ray_address,
         "--set", "outer.iterations=100000", "--set", "outer.meta_batch_size=2", "--set", "inner.episodes=2",
         "--set", "rollout.horizon=5", "--set", "checkpoint.every=1", "--set", "resources.num_workers=1"],
        cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(RunDir(run).checkpoint_files()) < 2:  # the first run is well under way
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.stderr else ""
            time.sleep(0.2)
        holder = f"PID {first.pid} on "
        for command in (["train", "--resume", str(run), "--set", "seed=7"], ["eval", str(run)],
                        ["train", "quickstart", *QUICK, "--output", str(run), "--overwrite"]):
            err = _one_line_usage_error(run_cli(*command))
            assert "is in use by" in err and holder in err and "metaray train" in err, err
        assert first.poll() is None, "the refused commands must not disturb the running one"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    done = int(RunDir(run).latest_checkpoint()["iteration"])
    proc = run_cli("train", "--resume", str(run), "--set", f"outer.iterations={done + 2}", "--set", "eval.tasks=1",
                   "--address", ray_address)
    assert proc.returncode == 0, proc.stderr
    assert _metrics_iterations(run) == list(range(done + 2))
    assert load_config(run / "config.yaml").seed == 0
    lock = json.loads((run / ".metaray.lock").read_text())
    assert lock["pid"] != first.pid and lock["command"].startswith("metaray train")
