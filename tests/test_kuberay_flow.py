"""The Kubernetes flow, emulated on loopback: k8s/rayjob.yaml trains into S3, k8s/rayservice.yaml
serves from there, on a Ray cluster with token authentication.

What Kubernetes itself does cannot run here (no kubelet, no KubeRay operator), so the test stands
in for it: the token cluster's nodes run with the environment the manifests give their pods (their
Secrets pointing at the loopback S3, see tests/conftest.py ``token_cluster``), the RayJob's
entrypoint and runtimeEnvYAML are submitted to the job server as KubeRay's submitter does, and the
RayService's serveConfigV2 is deployed through the dashboard's Serve API as the operator does.
Nothing in them is changed but Serve's bind address (0.0.0.0 in a pod; loopback here).
"""

from __future__ import annotations

import shlex
import socket
import time

import requests
import yaml

from metaray.training.run_dir import RunDir
from tests.conftest import ROOT, SERVICE_TOKEN, TOKEN_HEAD


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((TOKEN_HEAD, 0))
        return s.getsockname()[1]


def test_rayjob_trains_into_s3_and_the_rayservice_serves_it(token_cluster, s3):
    from ray.job_submission import JobSubmissionClient

    from metaray.service.jobs import submit

    job = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())["spec"]
    service = yaml.safe_load((ROOT / "k8s" / "rayservice.yaml").read_text())["spec"]
    assert job["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert service["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    words = shlex.split(job["entrypoint"])
    uri = words[words.index("--output") + 1]
    assert uri.startswith("s3://metaray/")
    auth = {"Authorization": f"Bearer {token_cluster.token_file.read_text().strip()}"}

    # The RayJob: its entrypoint and runtime environment as they are, to the token cluster's job server.
    client = JobSubmissionClient(token_cluster.dashboard_url, headers=auth)
    start = time.monotonic()
    job_id = submit(client, job["entrypoint"], yaml.safe_load(job["runtimeEnvYAML"]))
    while (status := str(client.get_job_status(job_id).value)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < start + 400, "the RayJob's entrypoint did not finish in 400 s"
        time.sleep(0.25)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-3000:]
    print(f"RayJob entrypoint wall time {time.monotonic() - start:.1f}s")
    keys = s3.keys(uri.removeprefix("s3://metaray/"))
    for name in ("config.yaml", "checkpoints/latest.json", "metrics.parquet", "tasks.parquet", "eval.parquet"):
        assert name in keys, sorted(keys)
    assert not any(k.startswith("runs/") for k in keys)  # nothing on the head's disk passed for the bucket
    iterations = RunDir(s3.uri(uri.removeprefix("s3://metaray/"))).load_config().outer.iterations

    # The RayService: its serveConfigV2 application, reading the run from the same URI.
    config = yaml.safe_load(service["serveConfigV2"])
    assert config["applications"][0]["args"]["run_dir"] == uri
    port = _free_port()
    config["http_options"] = {**config["http_options"], "host": TOKEN_HEAD, "port": port}
    api = f"{token_cluster.dashboard_url}/api/serve/applications/"
    assert requests.put(api, json=config, headers={**auth}, timeout=60).status_code == 200
    assert requests.put(api, json=config, timeout=60).status_code == 401  # the Ray token guards the API
    url, bearer = f"http://{TOKEN_HEAD}:{port}", {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                health = requests.get(f"{url}/healthz", headers=bearer, timeout=5)
                if health.status_code == 200 and "run" in health.json():
                    break
            except requests.RequestException:  # the proxy may accept before the app is ready
                pass
            status = requests.get(api, headers=auth, timeout=30).json().get("applications", {})
            assert time.monotonic() < deadline, f"the RayService app did not come up: {status}"
            time.sleep(0.25)
        assert health.json()["run"] == uri.rstrip("/").rsplit("/", 1)[-1]
        assert health.json()["iteration"] == iterations
        body = {"task": {"goal": [0.4, -0.35]}, "steps": 2, "seed": 1, "return_params": False}
        assert requests.post(f"{url}/adapt", json=body, timeout=60).status_code == 401  # the service's own token
        adapted = requests.post(f"{url}/adapt", json=body, headers=bearer, timeout=120)
        assert adapted.status_code == 200, adapted.text
        assert len(adapted.json()["returns"]) == 3
    finally:
        requests.delete(api, headers=auth, timeout=60)
