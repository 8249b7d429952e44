"""The adaptation service: `metaray serve` on a real Ray Serve, over real HTTP on loopback.

One service for the module (a start-up costs ~20 s), with a bearer token, as a deployment
exposed beyond loopback would run; the checks that need no service are in
test_serve_hardening.py.
"""

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
import ray  # noqa: F401  (puts Ray's bundled psutil on sys.path)
import requests
import torch
from safetensors.torch import load

from metaray.training.run_dir import RunDir
from tests.conftest import ROOT

psutil = pytest.importorskip("psutil")  # Ray's bundled copy

HOST = "127.0.0.2"
TOKEN = "test-token-7f3a9c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {**AUTH, "content-type": "application/json"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(nav_run, tmp_path_factory):
    """`metaray serve` with its own embedded Ray (2 replicas) and a token file, stopped with SIGTERM like a pod."""
    port = _free_port()
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    env = {k: v for k, v in os.environ.items() if k != "METARAY_SERVE_TOKEN"}
    proc = subprocess.Popen([sys.executable, "-m", "metaray.cli", "serve", str(nav_run), "--host", HOST, "--port",
                             str(port), "--replicas", "2", "--service-token-file", str(token_file)], cwd=ROOT, env=env,
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
    return requests.post(f"{url}/adapt", json=body, headers=AUTH, timeout=120)


def _post(url: str, body: bytes, headers: dict | None = None) -> requests.Response:
    return requests.post(f"{url}/adapt", data=body, headers=JSON if headers is None else headers, timeout=60)


def test_healthz_is_open_to_probes_but_names_the_model_only_to_token_holders(service):
    url, _ = service
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        resp = requests.get(f"{url}/healthz", headers=headers, timeout=10)
        assert resp.status_code == 200 and resp.json() == {"status": "ok"}, resp.text


def test_healthz_names_the_model_but_no_path_on_disk(service, nav_run):
    url, _ = service
    resp = requests.get(f"{url}/healthz", headers=AUTH, timeout=10)
    health = resp.json()
    assert health["status"] == "ok" and health["run"] == nav_run.name
    assert health["iteration"] == 30 and health["family"] == "navigation2d" and health["task_keys"] == ["goal"]
    assert str(nav_run.parent) not in resp.text and not any(str(v).startswith("/") for v in health.values())


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
    # Parser and arithmetic limits: 4xx, never a 500 (RecursionError, OverflowError).
    (b'{"task": {"goal": ' + b"[" * 2000 + b"]" * 2000 + b"}}", 400, "JSON nested deeper than 16 levels"),
    (b'{"task": {"goal": ' + b"[" * 20 + b"0.1" + b"]" * 20 + b"}}", 400, "JSON nested deeper than 16 levels"),
    (b'{"task": {"goal": [' + b"9" * 400 + b', 0.1]}}', 422, "task.goal: expected finite numbers of shape [2]: "
                                                             "a number is too large for a float"),
    (b'{"task": {"goal": [NaN, 0.1]}}', 400, "malformed JSON: NaN is not JSON"),
    # Strict types: a bool or a string is no number.
    (b'{"task": {"goal": [0.1, 0.2]}, "steps": true}', 422, "steps: Input should be a valid integer (got True)"),
    (b'{"task": {"goal": [0.1, 0.2]}, "seed": "3"}', 422, "seed: Input should be a valid integer (got '3')"),
    (b'{"task": {"goal": [0.1, 0.2]}, "return_params": 1}', 422, "return_params: Input should be a valid boolean"),
    (b'{"task": {"goal": ["0.3", 0.2]}}', 422, "task.goal: expected finite numbers of shape [2], got ['0.3', 0.2]"),
    (b'{"task": {"goal": [true, 0.2]}}', 422, "task.goal: expected finite numbers of shape [2], got [True, 0.2]"),
    # The family's bounds: 200 with NaN returns and parameters before they were declared.
    (b'{"task": {"goal": [1e200, 1e200]}}', 422,
     "task: goal=[1e+200, 1e+200] is outside [-100, 100] (bounds of the navigation2d family)"),
])
def test_bad_requests_get_a_clear_4xx_and_the_service_keeps_answering(service, body, status, message):
    url, _ = service
    resp = _post(url, body)
    assert resp.status_code == status and message in resp.json()["detail"], resp.text
    assert _adapt(url, task={"goal": [0.1, 0.2]}, steps=1, return_params=False).status_code == 200


@pytest.mark.parametrize("body", [
    {"task": {"goal": "x" * 100_000}},
    {"task": {"goal": [0.1, 0.2], "k" * 100_000: 1}},
    {"task": {"goal": [0.1, 0.2]}, "k" * 100_000: "v" * 100_000},
    {"task": {"goal": [0.1, 0.2]}, "seed": [1] * 50_000},
])
def test_errors_quote_at_most_a_clipped_piece_of_the_input(service, body):
    url, _ = service
    resp = _adapt(url, **body)
    detail = resp.json()["detail"]
    assert resp.status_code == 422 and len(detail) <= 800 and "chars)" in detail, detail


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "application/jsonp", "multipart/form-data; boundary=x"])
def test_bodies_that_are_not_declared_json_get_415(service, content_type):
    url, _ = service
    headers = {**AUTH, **({"content-type": content_type} if content_type else {})}
    resp = _post(url, b'{"task": {"goal": [0.1, 0.2]}}', headers)
    assert resp.status_code == 415 and "Content-Type must be application/json" in resp.json()["detail"], resp.text


def test_json_with_a_charset_is_json(service):
    url, _ = service
    resp = _post(url, b'{"task": {"goal": [0.1, 0.2]}, "return_params": false}',
                 {**AUTH, "content-type": "application/json; charset=utf-8"})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Bearer {TOKEN}x", f"Basic {TOKEN}",
                                           TOKEN, "Bearer "])
def test_requests_without_the_bearer_token_get_401(service, authorization):
    url, _ = service
    headers = {"content-type": "application/json", **({"Authorization": authorization} if authorization else {})}
    for resp in (_post(url, b'{"task": {"goal": [0.1, 0.2]}}', headers),
                 requests.get(f"{url}/no-such-path", headers=headers, timeout=10),
                 requests.get(f"{url}/openapi.json", headers=headers, timeout=10)):
        assert resp.status_code == 401 and resp.headers["WWW-Authenticate"] == "Bearer", resp.text
        assert "task" not in resp.text and "goal" not in resp.text


def test_api_docs_are_off_by_default(service):
    url, _ = service
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert requests.get(f"{url}{path}", headers=AUTH, timeout=10).status_code == 404


def _serve_processes(proc: subprocess.Popen) -> dict[str, psutil.Process]:
    """The HTTP proxy and the replicas among the service's processes (its embedded Ray)."""
    found = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            title = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "ProxyActor" in title or "ServeReplica" in title:
            found[f"{'proxy' if 'ProxyActor' in title else 'replica'} {child.pid}"] = child
    return found


def _rss_mb(processes: dict[str, psutil.Process]) -> dict[str, float]:
    return {name: p.memory_info().rss / 2**20 for name, p in processes.items()}


def test_oversized_bodies_get_413_and_memory_returns_to_baseline(service):
    url, proc = service
    pad = b"x" * 5_000_000
    big = b'{"task": {"goal": [0.1, 0.2]}, "pad": "' + pad + b'"}'

    def chunked():  # a generator: requests sends it chunked, with no Content-Length
        yield from (big[i:i + 65536] for i in range(0, len(big), 65536))

    def send(i: int) -> requests.Response:
        return _post(url, big if i % 2 else chunked())

    for i in range(2):
        resp = send(i)
        assert resp.status_code == 413 and "over the limit of 1048576 bytes" in resp.json()["detail"], resp.text
    # Just under the default limit is read and parsed (422 for the unknown key): the limit is 1 MiB, not less.
    resp = _post(url, big.replace(pad, b"x" * 1_000_000))
    assert resp.status_code == 422 and "pad: Extra inputs" in resp.text and len(resp.text) < 1000
    processes = _serve_processes(proc)
    assert sum(name.startswith("replica") for name in processes) == 2 and len(processes) == 3, processes
    before = _rss_mb(processes)
    with ThreadPoolExecutor(10) as pool:
        statuses = [r.status_code for r in pool.map(send, range(10))]  # 50 MB offered at once
    assert statuses == [413] * 10
    time.sleep(1)
    after = _rss_mb(processes)
    print("RSS MB before -> after 10 x 5 MB: " + ", ".join(f"{k} {before[k]:.0f} -> {after[k]:.0f}" for k in before))
    assert all(after[k] - before[k] < 50 for k in before), (before, after)
    assert _adapt(url, task={"goal": [0.1, 0.2]}, steps=1, return_params=False).status_code == 200


def test_healthz_answers_at_once_while_a_burst_of_adaptations_runs(service):
    """Each replica holds at most 8 adaptations and refuses more with 503 at once; /healthz is
    admitted past them (it waited 3.5 s behind such a burst when requests queued in the proxy)."""
    url, _ = service

    def adapt(seed: int) -> requests.Response:
        return _adapt(url, task={"goal": [0.3, -0.2]}, steps=10, seed=seed, return_params=False)

    with ThreadPoolExecutor(40) as pool:
        answers = [pool.submit(adapt, seed) for seed in range(40)]
        time.sleep(0.3)  # the burst is in the service
        latencies = []
        for _ in range(5):
            start = time.monotonic()
            assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.1)
        answers = [a.result() for a in answers]
    statuses = [a.status_code for a in answers]
    print(f"/healthz under a burst of 40: {', '.join(f'{s:.3f}' for s in latencies)} s; "
          f"/adapt: {statuses.count(200)} x 200, {statuses.count(503)} x 503")
    assert max(latencies) < 1.0
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 8
    busy = [a for a in answers if a.status_code == 503]
    assert all("busy" in a.json()["detail"] and a.headers["Retry-After"] == "1" for a in busy)


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
