"""Careless input against run directories: nothing saved is lost, nothing outside a run is touched."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from metaray.config import load_config
from metaray.training.run_dir import RunDir, write_rows
from tests.conftest import ROOT, run_cli
from tests.forked_cli import ForkedCli

QUICK = ["--set", "outer.iterations=1", "--set", "outer.meta_batch_size=2", "--set", "inner.episodes=2",
         "--set", "rollout.horizon=5", "--set", "eval.tasks=1"]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """The CLI for the commands refused before a run starts: see tests/forked_cli.py."""
    with ForkedCli(tmp_path_factory.mktemp("cli")) as forked:
        yield forked


def _one_line_usage_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr


def test_overwrite_replaces_only_a_metaray_run_directory(tmp_path: Path, cli):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "important.txt").write_text("keep me")
    (precious / "config.yaml").write_text("not ours\n")
    # The working directory (full of other things) as --output: another such directory (the refusals run side by side).
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "important.txt").write_text("keep me")
    (cwd / "config.yaml").write_text("not ours\n")
    # A symbolic link, even to a real run directory, and a plain file.
    run = RunDir(tmp_path / "run")
    run.prepare(load_config("quickstart"), overwrite=False)
    (tmp_path / "link").symlink_to(run.path)
    # Another tool's run: a config.yaml and checkpoints/ of its own.
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "config.yaml").write_text("seed: 3\n")
    (other / "checkpoints" / "epoch=9.ckpt").write_text("weights")
    (tmp_path / "file").write_text("x")
    # Each refused in a process of its own, all side by side (none touches another's target).
    errs = [_one_line_usage_error(proc) for proc in cli(
        ("train", "quickstart", *QUICK, "--output", str(precious), "--overwrite"),
        (("train", "quickstart", *QUICK, "--output", ".", "--overwrite"), {"cwd": cwd}),
        ("train", "quickstart", *QUICK, "--output", str(tmp_path / "link"), "--overwrite"),
        ("train", "quickstart", *QUICK, "--output", str(other), "--overwrite"),
        ("train", "quickstart", *QUICK, "--output", str(tmp_path / "file")))]
    assert "replaces only a metaray run directory" in errs[0] and "'important.txt'" in errs[0]
    assert (precious / "important.txt").read_text() == "keep me"
    assert sorted(os.listdir(precious)) == ["config.yaml", "important.txt"]
    assert "nothing was deleted" in errs[1] and sorted(os.listdir(cwd)) == ["config.yaml", "important.txt"]
    assert "is a symbolic link" in errs[2] and run.config_path.is_file()
    assert "checkpoints/'epoch=9.ckpt'" in errs[3] and (other / "checkpoints" / "epoch=9.ckpt").is_file()
    assert "is a file, not a directory" in errs[4] and (tmp_path / "file").read_text() == "x"


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


def test_checkpoint_with_a_valid_checksum_but_bad_contents(nav_run: Path, tmp_path: Path, cli):
    import torch

    good = RunDir.read_checkpoint(RunDir(nav_run).checkpoint_files()[-1])
    cases = [({k: v for k, v in good.items() if k != "params"}, "no params"),
             ({**good, "iteration": "7"}, "iteration '7' is not a non-negative integer"),
             ({**good, "params": torch.zeros(3, 3)}, "no params"),
             ({**good, "params": good["params"].half()}, "no params"),
             ({**good, "optimizer": {"lr": 1}}, "not a torch optimizer's state_dict"),
             ([1, 2, 3], "a list, not a mapping")]
    # Every (contents, command) in a copy of the run of its own, so that all can run side by side: eval
    # and train --resume lock the run directory they read.
    invocations, expected = [], []
    for i, (broken, words) in enumerate(cases):
        for j, command in enumerate((["eval"], ["serve"], ["train", "--resume"])):
            run = tmp_path / f"nav-{i}-{j}"
            shutil.copytree(nav_run, run)
            _write_raw_checkpoint(RunDir(run).checkpoint_files()[-1], broken)
            invocations.append((*command, str(run)))
            expected.append(words)
    for words, proc in zip(expected, cli(*invocations), strict=True):
        err = _one_line_usage_error(proc)
        assert "has bad contents" in err and words in err, err


def test_eval_and_serve_refuse_a_config_edited_after_training(nav_run: Path, tmp_path: Path, cli):
    """Checked against the checkpoint before Ray starts: one line naming the fields, exit 2."""
    run = tmp_path / "nav"
    shutil.copytree(nav_run, run)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("- 64\n", "- 32\n", 1).replace("seed: 0", "seed: 5"))
    before = (run / "eval.parquet").read_bytes()
    for proc in cli(("eval", str(run)), ("serve", str(run)), timeout=120):
        err = _one_line_usage_error(proc)  # side by side: serve does not lock the run
        assert "does not match its checkpoint" in err and "policy.hidden_sizes" in err and "seed" in err, err
    assert (run / "eval.parquet").read_bytes() == before


def test_resume_refuses_torch_threads_edited_into_config_yaml(nav_run: Path, tmp_path: Path, cli):
    """eval may run a run with other resources, a resume may not change torch_threads: it is
    checked against the checkpoint's own config, not config.yaml."""
    run = tmp_path / "nav"
    shutil.copytree(nav_run, run)
    text = (run / "config.yaml").read_text()
    assert "torch_threads: 1\n" in text
    (run / "config.yaml").write_text(text.replace("torch_threads: 1\n", "torch_threads: 2\n"))
    (proc,) = cli(("train", "--resume", str(run), "--set", "outer.iterations=40"))
    err = _one_line_usage_error(proc)
    assert "cannot change resources.torch_threads" in err, err


def _metrics_iterations(run: Path) -> list[int]:
    from metaray.training.run_dir import read_rows

    return [int(r["iteration"]) for r in read_rows(run / "metrics.parquet")]


def test_one_writer_per_run_directory(tmp_path: Path, ray_address, cli):
    """The issue's reproduction: a second `train --resume` (and eval, and --overwrite) into a
    directory a running `train` writes is refused, naming the holder; once the holder is killed
    (SIGKILL: no clean-up) its lock is stale and a resume takes over, continuing the same run."""
    import signal
    import subprocess
    import sys
    import time

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
        for proc in cli(("train", "--resume", str(run), "--set", "seed=7"), ("eval", str(run)),
                        ("train", "quickstart", *QUICK, "--output", str(run), "--overwrite")):
            err = _one_line_usage_error(proc)
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
