"""Ray token authentication (RAY_AUTH_MODE=token), end to end: every way metaray reaches a cluster.

One cluster for the session (conftest's token_cluster). With the cluster's token, from Ray's own
sources or --auth-token-file, `train` (GCS and Ray Client), `submit`, `jobs status|logs|stop`,
`eval` and `serve` work; without it, or with another, each fails within seconds in one line (exit
1) and writes nothing. The token appears in no output, run directory or job metadata.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from metaray.config import ConfigError
from metaray.runtime.auth import MAX_TOKEN_FILE_BYTES, read_token_file
from metaray.service.jobs import build_runtime_env
from tests.conftest import ROOT, SERVICE_TOKEN, TOKEN_HEAD

pytestmark = pytest.mark.timeout(300)

SHORT = ["--set", "outer.iterations=2", "--set", "outer.meta_batch_size=4", "--set", "rollout.task_group_size=2",
         "--set", "inner.episodes=4", "--set", "rollout.horizon=20", "--set", "eval.tasks=2"]
FAST_S = 15.0  # a refusal takes ~2.5 s here, most of it importing


def cli(*args: str, env: dict[str, str], timeout: float = 180) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "metaray.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.monotonic() - start


def token_of(cluster) -> str:
    return cluster.token_file.read_text().strip()


def assert_no_token(token: str, *texts: str, run_dir: Path | None = None) -> None:
    for text in texts:
        assert token not in text
    if run_dir is not None:
        for path in run_dir.rglob("*"):
            assert path.is_dir() or token.encode() not in path.read_bytes(), path


def assert_refused(result: tuple[subprocess.CompletedProcess, float], address: str, token: str) -> None:
    proc, seconds = result
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: authentication failed against the Ray cluster at {address}: ") or \
        lines[0].startswith(f"error: authentication failed against the Ray job server at {address}: "), lines[0]
    assert "--auth-token-file PATH" in lines[0] and "RAY_AUTH_TOKEN_PATH" in lines[0], lines[0]
    assert seconds < FAST_S, f"refused after {seconds:.1f}s"
    assert_no_token(token, proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def trained(token_cluster, tmp_path_factory):
    """`train --address HOST:PORT` with the token from RAY_AUTH_TOKEN_PATH (RAY_AUTH_MODE=token)."""
    out = tmp_path_factory.mktemp("auth") / "run"
    proc, seconds = cli("train", "quickstart", *SHORT, "--output", str(out), "--address", token_cluster.address,
                        env=token_cluster.client_env("right"))
    print(f"train over GCS with the token: {seconds:.1f}s")
    return out, proc


def test_train_over_gcs_with_the_token(token_cluster, trained):
    out, proc = trained
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "metrics.parquet").exists() and list((out / "checkpoints").glob("checkpoint_*.pt"))
    assert_no_token(token_of(token_cluster), proc.stdout, proc.stderr, run_dir=out)


def test_train_over_ray_client_with_auth_token_file(token_cluster, tmp_path):
    """--auth-token-file turns token mode on in the client: here over CI's RAY_AUTH_MODE=disabled."""
    out = tmp_path / "run"
    proc, seconds = cli("train", "quickstart", *SHORT, "--output", str(out), "--address", token_cluster.client_address,
                        "--auth-token-file", str(token_cluster.token_file),
                        env=token_cluster.client_env(None, mode="disabled"))
    print(f"train over Ray Client with --auth-token-file: {seconds:.1f}s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "metrics.parquet").exists()
    assert_no_token(token_of(token_cluster), proc.stdout, proc.stderr, run_dir=out)


def test_submit_and_jobs_with_the_token(token_cluster, tmp_path):
    """The job's driver, on the head, authenticates with the head's token: none is sent with the job."""
    from ray.job_submission import JobSubmissionClient

    token, url = token_of(token_cluster), token_cluster.dashboard_url
    out = tmp_path / "job-run"
    proc, seconds = cli("submit", "quickstart", *SHORT, "--output", str(out), "--address", url, "--follow",
                        "--auth-token-file", str(token_cluster.token_file),
                        env=token_cluster.client_env(None, mode="disabled"))
    print(f"submit --follow with the token: {seconds:.1f}s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = re.search(r"submitted job (\S+)", proc.stdout).group(1)
    assert f"job {job_id} SUCCEEDED" in proc.stdout and (out / "metrics.parquet").exists()
    status, _ = cli("jobs", "status", job_id, "--address", url, env=token_cluster.client_env("right", via="env"))
    logs, _ = cli("jobs", "logs", job_id, "--address", url, env=token_cluster.client_env("right"))
    stop, _ = cli("jobs", "stop", job_id, "--address", url, "--auth-token-file", str(token_cluster.token_file),
                  env=token_cluster.client_env(None, mode="disabled"))
    assert status.returncode == 0 and f"{job_id} SUCCEEDED" in status.stdout, status.stderr
    assert logs.returncode == 0 and "pre-adaptation return" in logs.stdout, logs.stderr
    assert stop.returncode == 0 and "was not running" in stop.stdout, stop.stderr
    info = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"}).get_job_info(job_id)
    assert_no_token(token, repr(info.runtime_env), repr(info.metadata), info.entrypoint, proc.stdout, proc.stderr,
                    status.stdout, logs.stdout, stop.stdout, run_dir=out)


def test_eval_with_the_token(token_cluster, trained):
    run, _ = trained
    proc, _ = cli("eval", str(run), "--tasks", "2", "--steps", "1", "--address", token_cluster.address,
                  env=token_cluster.client_env("right", via="env"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (run / "eval.parquet").exists()
    assert_no_token(token_of(token_cluster), proc.stdout, proc.stderr, run_dir=run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((TOKEN_HEAD, 0))
        return s.getsockname()[1]


def test_serve_with_the_token_answers_healthz(token_cluster, trained):
    import requests

    run, _ = trained
    port = _free_port()
    env, args = token_cluster.client_env("right"), ["serve", str(run), "--address", token_cluster.address, "--host",
                                                    TOKEN_HEAD, "--port", str(port)]
    proc = subprocess.Popen([sys.executable, "-m", "metaray.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                # The cluster's nodes carry the service's bearer token too (a RayService pod's
                # environment, tests/conftest.py), and a replica uses the one it finds.
                resp = requests.get(f"http://{TOKEN_HEAD}:{port}/healthz", timeout=2,
                                    headers={"Authorization": f"Bearer {SERVICE_TOKEN}"})
                if resp.status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "service did not come up"
            time.sleep(0.5)
        assert resp.json()["run"] == run.name
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # serve.shutdown(): nothing of it stays on the shared cluster
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert_no_token(token_of(token_cluster), proc.stdout.read())


# Each command without a token (as CI runs: RAY_AUTH_MODE=disabled) and with a wrong one, from
# one of the sources in turn; the two at once.
WRONG = {"train": "flag", "train-client": "path", "submit": "flag", "jobs-status": "env", "jobs-logs": "path",
         "jobs-stop": "flag", "eval": "flag", "serve": "path"}


@pytest.mark.parametrize("command", sorted(WRONG))
def test_without_the_token_each_command_fails_fast_in_one_line(token_cluster, trained, tmp_path, command):
    c, run = token_cluster, trained[0]
    out = tmp_path / "run"
    args, address = {
        "train": (["train", "quickstart", *SHORT, "--output", str(out), "--address", c.address], c.address),
        "train-client": (["train", "quickstart", *SHORT, "--output", str(out), "--address", c.client_address],
                         c.client_address),
        "submit": (["submit", "quickstart", *SHORT, "--output", str(out), "--address", c.dashboard_url, "--no-wait"],
                   c.dashboard_url),
        "jobs-status": (["jobs", "status", "raysubmit_x", "--address", c.dashboard_url], c.dashboard_url),
        "jobs-logs": (["jobs", "logs", "raysubmit_x", "--address", c.dashboard_url], c.dashboard_url),
        "jobs-stop": (["jobs", "stop", "raysubmit_x", "--address", c.dashboard_url], c.dashboard_url),
        "eval": (["eval", str(run), "--tasks", "2", "--steps", "1", "--address", c.address], c.address),
        "serve": (["serve", str(run), "--address", c.address, "--host", TOKEN_HEAD, "--port", str(_free_port())],
                  c.address),
    }[command]
    wrong = {"flag": (["--auth-token-file", str(c.wrong_token_file)], c.client_env(None, mode="disabled")),
             "path": ([], c.client_env("wrong")), "env": ([], c.client_env("wrong", via="env"))}[WRONG[command]]
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*"))
    with ThreadPoolExecutor(2) as pool:
        none = pool.submit(cli, *args, env=c.client_env(None, mode="disabled"))
        bad = pool.submit(cli, *args, *wrong[0], env=wrong[1])
        results = {"none": none.result(), "wrong": bad.result()}
    for name, result in results.items():
        print(f"{command} {name}: {result[1]:.1f}s: {result[0].stderr.strip()}")
        assert_refused(result, address, token_of(c))
    assert "sent none" in results["none"][0].stderr and "rejected the token" in results["wrong"][0].stderr
    assert not out.exists()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*")) == before


def test_token_mode_without_a_token_anywhere_is_refused_before_connecting(token_cluster, tmp_path):
    proc, seconds = cli("train", "quickstart", "--output", str(tmp_path / "run"), "--address", token_cluster.address,
                        env=token_cluster.client_env(None, mode="token"))
    assert_refused((proc, seconds), token_cluster.address, token_of(token_cluster))
    assert "no token was found" in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "huge", "directory", "binary", "two lines"])
def test_a_bad_token_file_is_refused_without_quoting_it(tmp_path, case):
    path = tmp_path / "token"
    content = {"missing": None, "empty": b" \n", "huge": b"a" * (MAX_TOKEN_FILE_BYTES + 1), "directory": None,
               "binary": b"\x00\xfftoken", "two lines": b"secret-one\nsecret-two\n"}[case]
    if case == "directory":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"^--auth-token-file {re.escape(str(path))}: ") as caught:
        read_token_file(path)
    assert "secret" not in str(caught.value) and "aaaa" not in str(caught.value)


def test_a_bad_token_file_is_a_usage_error_on_the_command_line(tmp_path):
    """Exit 2 in one line, before any cluster is contacted (none listens at these addresses)."""
    (tmp_path / "empty").write_text("\n")
    runs = [("train", "quickstart", "--output", str(tmp_path / "run"), "--address", "127.0.0.2:1",
             "--auth-token-file", str(tmp_path / "absent")),
            ("jobs", "status", "x", "--address", "http://127.0.0.2:1", "--auth-token-file", str(tmp_path / "empty"))]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda a: cli(*a, env=dict(os.environ))[0], runs))
    for proc, expected in zip(results, ["absent: no such file", "empty: is empty"]):
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("error: --auth-token-file ") and expected in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY", "METARAY_SERVE_TOKEN"])
def test_a_runtime_env_carrying_a_secret_is_refused(tmp_path, name):
    env_file = tmp_path / "env.yaml"
    env_file.write_text(f"env_vars: {{{name}: abc}}\n")
    with pytest.raises(ConfigError, match=rf"\['{name}'\] would put a secret in the job's metadata") as caught:
        build_runtime_env(env_file, None, [])
    assert "abc" not in str(caught.value)
