"""Run directories on S3: a real endpoint on loopback (moto's server), the CLI end to end, no mocks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch

from metaray.config import ConfigError, load_config
from metaray.training.run_dir import RunDir
from metaray.training.storage import local_path, redact
from tests.conftest import ROOT, run_cli
from tests.forked_cli import ForkedCli
from tests.s3 import CREDENTIALS, MotoS3, restore, set_credentials

LONG = ["--set", "outer.iterations=100000", "--set", "outer.meta_batch_size=2", "--set", "inner.episodes=2",
        "--set", "rollout.horizon=5", "--set", "checkpoint.every=1", "--set", "resources.num_workers=1",
        "--set", "eval.tasks=1"]


@contextmanager
def _long_run(uri: str, ray_address: str, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """A `train` that runs until stopped, killed on the way out whatever the test did."""
    proc = subprocess.Popen([sys.executable, "-m", "metaray.cli", "train", "quickstart", "--output", uri,
                             "--address", ray_address, *LONG], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_for_checkpoints(s3: MotoS3, prefix: str, proc: subprocess.Popen, count: int) -> None:
    deadline = time.monotonic() + 120
    while sum(k.startswith("checkpoints/checkpoint_") for k in s3.keys(prefix)) < count:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the run wrote no checkpoints in 2 minutes"
        time.sleep(0.2)


def _iterations(run: RunDir) -> list[int]:
    return [int(r["iteration"]) for r in run.read_metrics()]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """The CLI for the commands that start no run: see tests/forked_cli.py."""
    with ForkedCli(tmp_path_factory.mktemp("cli")) as forked:
        yield forked


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metaray.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


def test_uris_name_their_store_and_never_show_credentials(tmp_path, cli):
    assert local_path(f"file://{tmp_path}") == tmp_path and local_path("runs/x") == local_path("runs/x")
    shown = redact("s3://KEY:SECRET@bucket/p?secret_key=s3cr3t&endpoint_override=127.0.0.30:9000&scheme=http")
    assert "SECRET" not in shown and "s3cr3t" not in shown and "KEY" not in shown
    assert shown.startswith("s3://bucket/p?") and "endpoint_override=127.0.0.30:9000" in shown
    for bad, message in (("s3://bucket?endpoint_override=127.0.0.30:1", "a plain prefix inside the bucket"),
                         ("s3://bucket/runs/../other?endpoint_override=127.0.0.30:1", "no empty, '.' or '..'"),
                         ("s3://bucket/%2e%2e/x?endpoint_override=127.0.0.30:1", "no empty, '.' or '..'"),
                         ("s3://bucket//x?endpoint_override=127.0.0.30:1", "no empty, '.' or '..'"),
                         ("s3://KEY:SECRET@bucket/run", "credentials in a URI end up in logs"),
                         ("nosuch://bucket/run", "run directory nosuch://bucket/run"),
                         ("file://otherhost/run", "file:///absolute/path")):
        with pytest.raises(ConfigError, match=message):
            RunDir(bad)
        assert "SECRET" not in redact(bad)
    # A job's entrypoint is metadata anyone who lists jobs reads: refused before anything is sent.
    (proc,) = cli(("submit", "quickstart", "--output", "s3://KEY:s3cr3tVALUE@bucket/run", "--address",
                   "http://127.0.0.2:1"))
    assert proc.returncode == 2 and "credentials in a URI" in proc.stderr and "s3cr3tVALUE" not in proc.stderr


def test_a_reader_takes_the_checkpoint_the_manifest_names_and_checks_its_checksum(s3):
    """Listing is not atomic: a checkpoint uploaded after the manifest was written is not the
    newest yet. And the bytes read back are checked against the checksum written with them."""
    cfg = load_config("quickstart", ["outer.iterations=2"])
    uri = s3.uri("runs/manifest")
    run = RunDir(uri)
    run.prepare(cfg, overwrite=False)
    params = torch.arange(4, dtype=torch.float32)
    for iteration in (1, 2):
        run.save_checkpoint(iteration, {"params": params + iteration, "optimizer": None}, cfg, keep=5)
    manifest = json.loads(s3.fs.open_input_stream("metaray/runs/manifest/checkpoints/latest.json").read())
    assert manifest["checkpoint"] == "checkpoint_000002.pt"
    newest = s3.fs.open_input_stream("metaray/runs/manifest/checkpoints/checkpoint_000002.pt").read()
    with s3.fs.open_output_stream("metaray/runs/manifest/checkpoints/checkpoint_000003.pt") as f:
        f.write(newest)  # uploaded by a writer that died before its manifest
    assert RunDir(uri).latest_checkpoint()["iteration"] == 2
    with s3.fs.open_output_stream("metaray/runs/manifest/checkpoints/checkpoint_000002.pt") as f:
        f.write(newest[:-100] + b"x" * 100)  # damaged in the store
    with pytest.raises(ConfigError, match=r"checkpoint s3://metaray/runs/manifest/checkpoints/checkpoint_000002.pt "
                                          r"is corrupt: its checksum does not match"):
        RunDir(uri).latest_checkpoint()


def test_the_lock_lease_refuses_a_second_writer_until_released(s3, monkeypatch):
    from metaray.training.run_lock import RunDirBusyError

    monkeypatch.setenv("METARAY_LOCK_LEASE_S", "5")
    uri = s3.uri("runs/leased")
    first, second = RunDir(uri), RunDir(uri)
    with first.lock("metaray train"):
        with pytest.raises(RunDirBusyError, match=rf"in use by PID {os.getpid()} on .*metaray train.*lease ends in"):
            with second.lock("metaray eval"):
                pass
    with second.lock("metaray eval") as locked:
        assert locked
    assert ".metaray.lock" not in s3.keys("runs/leased")  # released, not left to lapse


def test_objects_that_are_not_a_runs_are_never_written_over_or_deleted(s3):
    cfg = load_config("quickstart", ["outer.iterations=2"])
    uri = s3.uri("runs/foreign")
    run = RunDir(uri)
    run.prepare(cfg, overwrite=False)
    with s3.fs.open_output_stream("metaray/runs/foreign/NOTES.md") as f:
        f.write(b"someone's notes")
    reopened = RunDir(uri)
    reopened.write_eval([{"policy": "metaray", "return": 1.0}])  # what eval does: a write, then a push
    reopened.flush()
    assert s3.fs.open_input_stream("metaray/runs/foreign/NOTES.md").read() == b"someone's notes"
    with pytest.raises(ConfigError, match=r"not one \(it holds 'NOTES\.md'\); nothing was deleted"):
        RunDir(uri).check_target(overwrite=True)


def test_a_writer_that_lost_its_lease_stops_writing(s3, monkeypatch):
    """Paused past its lease (or cut off from the store), a writer whose lock was taken over
    must not write over the new holder; its next write fails in one line."""
    from metaray.training.storage import StorageError

    monkeypatch.setenv("METARAY_LOCK_LEASE_S", "3")
    cfg = load_config("quickstart", ["outer.iterations=2"])
    run = RunDir(s3.uri("runs/lost"))
    with run.lock("metaray train"):
        run.prepare(cfg, overwrite=False)
        with s3.fs.open_output_stream("metaray/runs/lost/.metaray.lock") as f:  # taken over meanwhile
            f.write(json.dumps({"id": "other", "pid": 1, "host": "elsewhere", "command": "metaray train",
                                "since": "now", "expires": time.time() + 60}).encode())
        deadline = time.monotonic() + 10
        while run.remote.shared.failure is None:
            assert time.monotonic() < deadline, "the renewal did not notice the lock was taken"
            time.sleep(0.2)
        with pytest.raises(StorageError, match="lost its lock to PID 1 on elsewhere"):
            run.write_config(cfg)
    assert json.loads(s3.fs.open_input_stream("metaray/runs/lost/.metaray.lock").read())["id"] == "other"


def test_train_sigkill_resume_eval_report_on_s3(s3, ray_address, tmp_path, cli):
    """The issue's flow on s3://: a run SIGKILLed mid-way keeps every completed iteration's rows and
    its lock lease until it lapses; the resume is bit-identical to an uninterrupted run; eval and
    report write into the bucket; no credential is written anywhere."""
    prefix = "runs/killed"
    uri = s3.uri(prefix)
    env = {**os.environ, "METARAY_LOCK_LEASE_S": "4"}
    with _long_run(uri, ray_address, env) as first:
        _wait_for_checkpoints(s3, prefix, first, 3)
        (busy,) = cli((("train", "--resume", uri, "--set", "seed=7"), {"env": env}))
        assert busy.returncode == 2 and f"is in use by PID {first.pid} on" in busy.stderr, busy.stderr
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    killed = RunDir(uri)
    done = int(killed.latest_checkpoint()["iteration"])
    rows = _iterations(killed)
    assert rows == list(range(len(rows))) and len(rows) >= done  # every completed iteration's row, once
    # The dead writer's lease holds until it lapses (no process is left to release it); then it is taken over.
    lock = json.loads(s3.fs.open_input_stream(f"metaray/{prefix}/.metaray.lock").read())
    assert lock["pid"] == first.pid
    # The uninterrupted reference run (a local directory of its own) meanwhile: while the lease lapses and the
    # resume runs. One worker each: both fit the session's Ray at once.
    reference = tmp_path / "reference"
    with ThreadPoolExecutor(max_workers=1) as pool:
        uninterrupted = pool.submit(run_cli, "train", "quickstart", "--output", str(reference), "--address",
                                    ray_address, *LONG, "--set", f"outer.iterations={done + 2}")
        time.sleep(max(0.0, lock["expires"] - time.time() + 0.5))
        resumed = _cli("train", "--resume", uri, "--set", f"outer.iterations={done + 2}", "--address", ray_address,
                       env=env)
        proc = uninterrupted.result()
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from iteration {done}" in resumed.stdout
    assert proc.returncode == 0, proc.stderr
    on_s3 = RunDir(uri)
    assert torch.equal(on_s3.latest_checkpoint()["params"], RunDir(reference).latest_checkpoint()["params"])
    assert _iterations(on_s3) == list(range(done + 2))

    evaluated = _cli("eval", uri, "--tasks", "2", "--steps", "1", "--baselines", "pretrained", "--address",
                     ray_address, env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    reported, compared = cli((("report", uri), {"env": env}),  # two readers of the evaluated run, side by side
                             (("runs", "compare", uri, str(reference), "--json"), {"env": env}))
    assert reported.returncode == 0, reported.stderr
    assert compared.returncode == 0, compared.stderr
    assert [row["algorithm"] for row in json.loads(compared.stdout)] == ["maml", "maml"]
    keys = s3.keys(prefix)
    for name in ("config.yaml", "eval.parquet", "metrics.parquet", "tasks.parquet", "learning_curve.png",
                 "adaptation_curve.png", "checkpoints/latest.json", "baselines/pretrained/config.yaml",
                 "baselines/pretrained/checkpoints/latest.json"):
        assert name in keys, sorted(keys)
    assert any(k.startswith("events.out.tfevents.") for k in keys) and ".metaray.lock" not in keys
    secrets = [CREDENTIALS["AWS_SECRET_ACCESS_KEY"], CREDENTIALS["AWS_ACCESS_KEY_ID"]]
    for key in keys:
        data = s3.fs.open_input_stream(f"metaray/{prefix}/{key}").read()
        assert not any(s.encode() in data for s in secrets), key
    for out in (resumed, evaluated, reported):
        assert not any(s in out.stdout + out.stderr for s in secrets)


def test_an_endpoint_that_goes_down_fails_the_run_in_one_line_and_resume_completes(ray_address):
    """The store goes away mid-run: the run stops with one line naming the URI; what it had
    stored is intact; once the store is back, --resume finishes the run."""
    saved = set_credentials()
    s3 = MotoS3("127.0.0.31")
    try:
        prefix = "runs/outage"
        uri = s3.uri(prefix)
        env = {**os.environ, "METARAY_LOCK_LEASE_S": "4"}
        with _long_run(uri, ray_address, env) as proc:
            _wait_for_checkpoints(s3, prefix, proc, 2)
            s3.stop()
            proc.wait(timeout=120)
        err = proc.stderr.read()
        assert proc.returncode == 1, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert f"error: run directory {redact(uri)}: " in err and "failed" in err, err
        s3.restart()
        run = RunDir(uri)
        done = int(run.latest_checkpoint()["iteration"])  # checksum verified
        assert done >= 2 and _iterations(run)[:done] == list(range(done))
        lock = json.loads(s3.fs.open_input_stream(f"metaray/{prefix}/.metaray.lock").read())
        time.sleep(max(0.0, lock["expires"] - time.time() + 0.5))
        resumed = _cli("train", "--resume", uri, "--set", f"outer.iterations={done + 2}", "--address",
                       ray_address, env=env)
        assert resumed.returncode == 0, resumed.stderr
        assert _iterations(RunDir(uri)) == list(range(done + 2))
    finally:
        s3.stop()
        restore(saved)
