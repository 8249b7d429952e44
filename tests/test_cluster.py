"""Real clusters: a multi-node Ray on loopback, Ray Client, Ray Jobs over HTTP, KubeRay manifests."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from metaray.config import load_config
from metaray.training.run_dir import RunDir
from metaray.training.trainer import train
from tests.conftest import ROOT, run_cli
from tests.forked_cli import ForkedCli

SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"
RAY_SCHEMAS = {"RayCluster": "raycluster_v1.json", "RayJob": "rayjob_v1.json", "RayService": "rayservice_v1.json"}
# Every Ray resource under k8s/ (the PVC variant in k8s/pvc/ too), by its path under k8s/: a new
# manifest is validated without being listed here (tests/test_k8s.py checks every file's kind).
MANIFESTS = {str(path.relative_to(ROOT / "k8s")): RAY_SCHEMAS[kind] for path in sorted((ROOT / "k8s").rglob("*.yaml"))
             if (kind := (yaml.safe_load(path.read_text()) or {}).get("kind")) in RAY_SCHEMAS}
# Groups of 2: the 4 tasks make two groups, one per worker.
SHORT = ["--set", "outer.iterations=2", "--set", "outer.meta_batch_size=4", "--set", "rollout.task_group_size=2",
         "--set", "inner.episodes=4",
         "--set", "rollout.horizon=20", "--set", "eval.tasks=2"]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """The CLI for the job-server commands (HTTP clients, no Ray of their own): see tests/forked_cli.py."""
    with ForkedCli(tmp_path_factory.mktemp("cli")) as forked:
        yield forked


def _check_schema(manifest: Path, schema: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("check-jsonschema")), "--schemafile",
                           str(SCHEMAS / schema), str(manifest)], capture_output=True, text=True)


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_validates_against_kuberay_schema(name):
    proc = _check_schema(ROOT / "k8s" / name, MANIFESTS[name])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name,typo", [("raycluster.yaml", ("enableInTreeAutoscaling", "enableInTreeAutoscalling")),
                                       ("rayjob.yaml", ("shutdownAfterJobFinishes", "shutdownAfterJobFinish")),
                                       ("rayservice.yaml", ("serveConfigV2", "serveConfig2"))])
def test_misspelled_field_fails_the_schema(tmp_path, name, typo):
    text = (ROOT / "k8s" / name).read_text()
    assert typo[0] in text
    bad = tmp_path / name
    bad.write_text(text.replace(typo[0], typo[1]))
    proc = _check_schema(bad, MANIFESTS[name])
    assert proc.returncode != 0 and typo[1] in proc.stdout


@pytest.mark.parametrize("name", ["rayservice.yaml", "pvc/rayservice.yaml"])
def test_rayservice_serve_config_deploys_metaray(name):
    """The Serve config inside the RayService parses with Ray Serve's own schema, and its import
    path and args build the adaptation service (the service itself is tested in test_serve.py):
    from object storage (k8s/rayservice.yaml) or from the claim mounted on every pod (k8s/pvc/)."""
    import importlib

    from ray.serve.schema import ServeDeploySchema

    from metaray.service.serve import ServeArgs

    doc = yaml.safe_load((ROOT / "k8s" / name).read_text())
    config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    (app,) = config.applications
    module, _, attr = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    built = builder(app.args)
    args = ServeArgs.model_validate(app.args)
    assert args.replicas == 2
    assert type(built).__name__ == "Application"
    if name == "rayservice.yaml":
        assert args.run_dir.startswith("s3://"), "the RayService serves from object storage"
        return
    assert args.run_dir.startswith("/runs/")
    spec = doc["spec"]["rayClusterConfig"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        mounts = {m["mountPath"] for c in group["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert "/runs" in mounts, "the run directory must be mounted where serveConfigV2 says"


def test_manifests_match_the_pinned_ray_and_the_image():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray_pin = next(re.search(r"==([\d.]+)", d).group(1) for d in project["dependencies"] if d.startswith("ray["))
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray_pin}-py311-cpu" in dockerfile
    image = f"metaray:{project['version']}"
    assert f'org.opencontainers.image.version="{project["version"]}"' in dockerfile
    for name in MANIFESTS:
        doc = yaml.safe_load((ROOT / "k8s" / name).read_text())
        spec = doc["spec"].get("rayClusterSpec", doc["spec"].get("rayClusterConfig", doc["spec"]))
        assert spec["rayVersion"] == ray_pin
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        assert {c["image"] for g in groups for c in g["template"]["spec"]["containers"]} == {image}
    kustomization = yaml.safe_load((ROOT / "k8s" / "kustomization.yaml").read_text())
    assert all((ROOT / "k8s" / r).is_file() for r in kustomization["resources"])
    assert kustomization["images"] == [{"name": "metaray", "newTag": project["version"]}]


def test_cluster_launcher_config_validates_against_rays_schema():
    import json

    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(yaml.safe_load((ROOT / "deploy" / "cluster.yaml").read_text()), schema)


def test_training_through_ray_client_uses_every_node(loopback_cluster, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "quickstart", *SHORT, "--output", str(out), "--address", loopback_cluster.client_address)
    server_logs = "".join(p.read_text()[-1500:] for p in loopback_cluster.temp_dir.rglob("ray_client_server*.err"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + server_logs
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    placement = [(r["workers_per_node"], r["tasks_per_node"]) for r in rows]
    if placement[-1] != ("127.0.0.5=1,127.0.0.6=1", "127.0.0.5=2,127.0.0.6=2"):
        from ray.util.state import list_actors, list_nodes

        nodes = {n.node_id: n.node_ip for n in list_nodes(address=loopback_cluster.dashboard_url)}
        actors = [(a.class_name, a.state, nodes.get(a.node_id), a.death_cause)
                  for a in list_actors(address=loopback_cluster.dashboard_url, detail=True)]
        pytest.fail(f"placement {placement}\nactors {actors}\n{proc.stdout}")


def test_submit_follow_runs_a_job_to_success(loopback_cluster, tmp_path, cli):
    """A config file outside the working directory (which is uploaded): it is validated and
    resolved where it is submitted, and the job runs exactly that config."""
    from metaray.config import load_config

    elsewhere = tmp_path / "elsewhere" / "my-run.yaml"
    elsewhere.parent.mkdir()
    elsewhere.write_text("seed: 11\ninner:\n  lr: 0.05\n")
    out = tmp_path / "job-run"
    start = time.monotonic()
    (proc,) = cli(("submit", str(elsewhere), *SHORT, "--output", str(out), "--address", loopback_cluster.dashboard_url,
                   "--follow"))
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = re.search(r"submitted job (\S+)", proc.stdout).group(1)
    assert "iter    2/2" in proc.stdout and f"job {job_id} SUCCEEDED" in proc.stdout
    assert len(pq.read_table(out / "metrics.parquet")) == 2
    resolved = load_config(elsewhere, [a for a in SHORT if a not in ("--set", "-s")])
    assert load_config(out / "config.yaml") == resolved and resolved.seed == 11
    print(f"submitted job wall time {wall:.1f}s")
    status, logs = cli(*(("jobs", what, job_id, "--address", loopback_cluster.dashboard_url)
                         for what in ("status", "logs")))  # side by side
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    assert "pre-adaptation return" in logs.stdout


def test_submit_no_wait_then_stop(loopback_cluster, tmp_path):
    proc = run_cli("submit", "quickstart", "--set", "outer.iterations=500", "--output", str(tmp_path / "long"),
                   "--address", loopback_cluster.dashboard_url, "--no-wait")
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"submitted job (\S+)", proc.stdout).group(1)
    stop = run_cli("jobs", "stop", job_id, "--address", loopback_cluster.dashboard_url)
    assert stop.returncode == 0 and "stop requested" in stop.stdout
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(loopback_cluster.dashboard_url)
    deadline = time.monotonic() + 60
    while str(client.get_job_status(job_id).value) not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert str(client.get_job_status(job_id).value) == "STOPPED"
    assert run_cli("jobs", "status", job_id, "--address", loopback_cluster.dashboard_url).returncode == 1


def test_submit_to_an_unreachable_job_server_names_it(cli):
    (proc,) = cli(("submit", "quickstart", "--address", "http://127.0.0.2:1", "--no-wait"))
    assert proc.returncode == 1 and "cannot reach the Ray job server at http://127.0.0.2:1" in proc.stderr


def test_node_loss_mid_run_completes_on_the_remaining_nodes(loopback_cluster, ray_local, tmp_path):
    """Kill a worker node's raylet by PID mid-run: the run finishes on the others, every task
    counted once, with the meta-parameters of an undisturbed run."""
    overrides = ["outer.iterations=6", "outer.meta_batch_size=12", "rollout.task_group_size=4", "inner.steps=2",
                 "policy.hidden_sizes=[32]", "eval.tasks=2", "resources.num_workers=3"]
    # The undisturbed run on the embedded 2-CPU Ray, with the two workers it has room for: a third would never
    # start, and the pool would wait 10 s for it before the first iteration. The worker count does not change
    # the meta-parameters (tests/test_determinism.py, tests/test_training.py).
    cfg = load_config("quickstart", [*overrides, "resources.num_workers=2"])
    reference = RunDir(tmp_path / "reference")
    reference.prepare(cfg, overwrite=False)
    expected = train(cfg, reference, log=lambda _: None)["params"]

    doomed = loopback_cluster.add_node("127.0.0.9", {"num-cpus": "1"})
    out = tmp_path / "run"
    sets = [a for o in overrides for a in ("--set", o)]
    result: dict = {}
    driver = threading.Thread(target=lambda: result.update(proc=run_cli(
        "train", "quickstart", *sets, "--output", str(out), "--address", loopback_cluster.address)))
    driver.start()
    run = RunDir(out)
    deadline = time.monotonic() + 180
    # Kill once the doomed node's worker has taken part in an iteration.
    while not (out.exists() and any("127.0.0.9=1" in r["workers_per_node"] for r in run.read_metrics())):
        assert time.monotonic() < deadline and driver.is_alive(), result.get("proc")
        time.sleep(0.05)
    from ray.util.state import list_actors, list_nodes

    nodes = [n for n in list_nodes(address=loopback_cluster.dashboard_url) if n.state == "ALIVE"]
    head_id = next(n.node_id for n in nodes if n.is_head_node)
    doomed_id = next(n.node_id for n in nodes if n.node_ip == "127.0.0.9")
    alive = list_actors(address=loopback_cluster.dashboard_url, filters=[("state", "=", "ALIVE")])
    # This run's actors: its job's, the job of its worker on the doomed node. (An earlier test's may still be
    # going: a Ray Client session's actors outlive the client by its reconnect grace period, 30 s.)
    (job,) = {a.job_id for a in alive if a.node_id == doomed_id}
    learner = [a for a in alive if a.class_name == "Learner" and a.job_id == job]
    assert [a.node_id for a in learner] == [head_id], "the learner belongs on the head, not a worker node"
    killed_at = time.monotonic()
    import os
    import signal

    os.kill(doomed.raylet_pid(), signal.SIGKILL)
    driver.join(timeout=400)
    proc = result["proc"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = run.read_metrics()
    assert [r["iteration"] for r in rows] == list(range(6))
    assert all(r["task_indices"] == ",".join(map(str, range(12))) for r in rows)
    failures = sum(r["worker_failures"] for r in rows)
    rerun = sum(r["task_retries"] for r in rows)
    after = [r for r in rows if "127.0.0.9" not in r["workers_per_node"]]
    assert failures >= 1 and rerun >= 1 and after, "the dead node must stop receiving tasks"
    first_clean = next(r for r in rows if r["worker_failures"])
    print(f"node loss: {failures} worker failure(s), {rerun} task(s) re-run; iteration with the failover took "
          f"{first_clean['time_iteration_s']:.1f}s (killed {time.monotonic() - killed_at:.0f}s before the end)")
    assert np.array_equal(RunDir(out).latest_checkpoint()["params"].numpy(), expected)
    doomed.stop()
