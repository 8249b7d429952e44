"""What the embedded Ray exposes: every socket of every process metaray starts listens on loopback.

Run as CI runs it, with RAY_AUTH_MODE=disabled (an open Ray runs anyone's code), so loopback is
the only protection. The sockets are read from /proc while each command runs, for the whole
process tree: the CLI, GCS, raylet, agents, the learner and workers, Serve's proxy and replicas.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.conftest import ROOT
from tests.sockets import descendants, is_loopback, listening

QUICK = ["--set", "outer.iterations=3", "--set", "outer.meta_batch_size=2", "--set", "inner.episodes=2",
         "--set", "rollout.horizon=10", "--set", "eval.tasks=2", "--set", "resources.num_workers=1"]


def _watch(args: list[str], until_s: float = 240, stop_when=None) -> tuple[set, str]:
    """Run the CLI with an embedded Ray, sampling its tree's listening sockets until it exits
    (or ``stop_when(sockets)`` holds, then SIGTERM). Bounded by ``until_s``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    assert env["RAY_AUTH_MODE"] == "disabled"
    proc = subprocess.Popen([sys.executable, "-m", "metaray.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen: set = set()
    deadline = time.monotonic() + until_s
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= listening(descendants(proc.pid))
            if stop_when is not None and stop_when(seen):
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.2)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return seen, out


def _assert_loopback_only(seen: set, out: str, expect: set[str]) -> None:
    names = {name for _, name, _, _ in seen}
    assert expect <= names, f"did not see {expect - names} listening; saw {sorted(seen)}\n{out}"
    exposed = sorted((name, addr, port) for _, name, addr, port in seen if not is_loopback(addr))
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_train_and_eval_listen_on_loopback_only(tmp_path: Path):
    run = tmp_path / "run"
    seen, out = _watch(["train", "quickstart", *QUICK, "--output", str(run)])
    assert (run / "eval.parquet").is_file(), out
    # gcs_server and raylet are Ray's own; "ray::" processes are the learner and workers.
    _assert_loopback_only(seen, out, {"gcs_server", "raylet"})
    assert any(name.startswith("ray::") for _, name, _, _ in seen), seen
    seen, out = _watch(["eval", str(run), "--tasks", "2", "--steps", "1", "--baselines", "pretrained,random"])
    assert "wrote" in out, out
    _assert_loopback_only(seen, out, {"gcs_server", "raylet"})


def test_serve_listens_on_loopback_only(nav_run: Path):
    """Serve's HTTP proxy listens where --host says (loopback by default), the rest on loopback;
    sampled until the service answers, so the replicas are up."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    since: list[float] = []

    def serving(_seen: set) -> bool:
        """Answering for 5 s: a replica opens its inter-deployment gRPC server after it is up."""
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code != 200:
                return False
        except requests.RequestException:
            return False
        since[:] = since or [time.monotonic()]
        return time.monotonic() - since[0] >= 5

    seen, out = _watch(["serve", str(nav_run), "--port", str(port)], until_s=180, stop_when=serving)
    assert any(p == port for _, _, _, p in seen), out
    _assert_loopback_only(seen, out, {"gcs_server", "raylet"})
