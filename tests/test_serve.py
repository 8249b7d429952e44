"""The adaptation service: `metaray serve` on a real Ray Serve, over real HTTP on loopback."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from safetensors.torch import load

from metaray.training.run_dir import RunDir
from tests.conftest import ROOT

HOST = "127.0.0.2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(nav_run):
    """`metaray serve` with its own embedded Ray (2 replicas), stopped with SIGTERM like a pod."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "metaray.cli", "serve", str(nav_run), "--host", HOST, "--port",
                             str(port), "--replicas", "2"], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:  # the proxy may accept before the app is ready
                pass
            assert time.monotonic() < deadline, "service did not come up"
            time.sleep(1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:  # last resort: the group we started (driver + its raylet)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _adapt(url: str, **body) -> requests.Response:
    return requests.post(f"{url}/adapt", json=body, timeout=120)


def test_healthz_names_the_model(service, nav_run):
    url, _ = service
    health = requests.get(f"{url}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["run"] == str(nav_run.resolve())
    assert health["iteration"] == 30 and health["family"] == "navigation2d" and health["task_keys"] == ["goal"]


def test_adapt_improves_on_the_task_and_returns_adapted_params(service, nav_run):
    url, _ = service
    resp = _adapt(url, task={"goal": [0.4, -0.35]}, steps=2, seed=1)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    pre, post1, post2 = out["returns"]
    print(f"served adaptation: {pre:.2f} -> {post1:.2f} -> {post2:.2f}")
    assert post1 > pre + 5 and max(post1, post2) > pre + 5  # measured: see README
    assert len(out["env_steps"]) == 3 and all(s > 0 for s in out["env_steps"])
    params = load(base64.b64decode(out["params_safetensors_b64"]))
    meta = RunDir(nav_run).latest_checkpoint()["params"]
    flat = torch.cat([params[k].reshape(-1) for k in params])
    assert flat.numel() == meta.numel() and not torch.allclose(flat, meta), "adapted, not the meta-parameters"
    # Deterministic for a seed: the same request gives the same answer.
    assert _adapt(url, task={"goal": [0.4, -0.35]}, steps=2, seed=1).json()["returns"] == out["returns"]


@pytest.mark.parametrize("body,status,message", [
    (b'{"task": {"goal": [0.1, ', 400, "malformed JSON"),
    (b'{"task": {"gaol": [0.1, 0.2]}}', 422, "unknown task keys ['gaol']"),
    (b'{"task": {"goal": [0.1]}}', 422, "task.goal: expected finite numbers of shape [2]"),
    (b'{"task": {"goal": [0.1, 0.2]}, "steps": 99}', 422, "steps: Input should be less than or equal to 10"),
    (b'{"task": {"goal": [0.1, 0.2]}, "stesp": 1}', 422, "stesp: Extra inputs are not permitted"),
])
def test_bad_requests_get_a_clear_4xx_and_the_service_keeps_answering(service, body, status, message):
    url, _ = service
    resp = requests.post(f"{url}/adapt", data=body, headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code == status and message in resp.json()["detail"], resp.text
    assert _adapt(url, task={"goal": [0.1, 0.2]}, steps=1, return_params=False).status_code == 200


def test_eight_concurrent_requests_all_succeed(service):
    url, _ = service
    goals = np.random.default_rng(0).uniform(-0.5, 0.5, size=(8, 2)).tolist()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda g: _adapt(url, task={"goal": g}, steps=1, return_params=False), goals))
    assert [a.status_code for a in answers] == [200] * 8
    assert [a.json()["task"]["goal"] for a in answers] == goals


def test_sigterm_stops_the_service(service):
    url, proc = service
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    assert "stopping" in proc.stdout.read()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=5)
