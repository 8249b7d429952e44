"""The KubeRay manifests as one flow: the RayJob trains into the URI the RayService serves from,
every Ray cluster runs with token authentication, and storage credentials reach the pods only
from Secrets. Static: nothing here starts Ray or talks to Kubernetes (the schemas are checked in
test_cluster.py, the flow itself runs on a loopback cluster there)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
import yaml

from tests.conftest import ROOT

K8S = ROOT / "k8s"
KINDS = {"RayCluster", "RayJob", "RayService", "PersistentVolumeClaim", "Kustomization"}
# The train -> serve pairs: on object storage (the default) and on a PersistentVolumeClaim.
FLOWS = [("rayjob.yaml", "rayservice.yaml"), ("pvc/rayjob.yaml", "pvc/rayservice.yaml")]
S3_SECRET = "metaray-s3"
S3_REQUIRED = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
S3_OPTIONAL = {"AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3"}
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def manifests() -> dict[str, dict]:
    return {str(p.relative_to(K8S)): yaml.safe_load(p.read_text()) for p in sorted(K8S.rglob("*.yaml"))}


def ray_resources() -> dict[str, dict]:
    return {name: doc for name, doc in manifests().items() if doc["kind"] in {"RayCluster", "RayJob", "RayService"}}


def cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


def pod_specs(doc: dict) -> dict[str, dict]:
    spec = cluster_spec(doc)
    return {"head": spec["headGroupSpec"]["template"]["spec"],
            **{g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]}}


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def job_output(doc: dict) -> str:
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "metaray.cli", "train"], argv
    assert argv.count("--output") == 1, "one --output"
    return argv[argv.index("--output") + 1]


def serve_run_dir(doc: dict) -> str:
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    return app["args"]["run_dir"]


def test_every_manifest_is_one_resource_of_a_known_kind():
    """One document per file (so each validates against its schema), and a kind this suite
    knows: a Ray resource with a misspelled kind would otherwise escape the schema check."""
    for path in sorted(K8S.rglob("*.y*ml")):
        docs = list(yaml.safe_load_all(path.read_text()))
        assert len(docs) == 1, f"{path}: {len(docs)} documents"
        assert docs[0]["kind"] in KINDS, f"{path}: kind {docs[0]['kind']}"


def test_every_ray_cluster_runs_with_token_auth():
    resources = ray_resources()
    assert {doc["kind"] for doc in resources.values()} == {"RayCluster", "RayJob", "RayService"}
    for name, doc in resources.items():
        auth = cluster_spec(doc).get("authOptions")
        assert auth == {"mode": "token"}, f"{name}: authOptions {auth}"
    # Where KubeRay v1.7 reads it: not on the RayJob/RayService spec itself.
    assert "authOptions" not in load("rayjob.yaml")["spec"] and "authOptions" not in load("rayservice.yaml")["spec"]


@pytest.mark.parametrize("job,service", FLOWS)
def test_the_service_serves_what_the_job_trains(job, service):
    trained, served = job_output(load(job)), serve_run_dir(load(service))
    assert trained == served
    if job == "rayjob.yaml":
        parts = urlsplit(trained)
        # No credentials, endpoint or options in the URI: they come from the pods' environment.
        assert (parts.scheme, parts.netloc, parts.query) == ("s3", "metaray", ""), trained
        return
    # The PVC variant: a local path on the claim, mounted on every pod of both, written by the job.
    claim = load("pvc/pvc.yaml")
    assert "ReadWriteMany" in claim["spec"]["accessModes"], "the job's and the service's pods mount it at once"
    for name, read_only in ((job, False), (service, True)):
        for group, pod in pod_specs(load(name)).items():
            volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])}
            (container,) = pod["containers"]
            mounts = [m for m in container.get("volumeMounts", [])
                      if volumes.get(m["name"]) == claim["metadata"]["name"]]
            assert [m["mountPath"] for m in mounts] == ["/runs"] and Path(trained).is_relative_to("/runs"), \
                f"{name} {group}"
            assert mounts[0].get("readOnly", False) is read_only, f"{name} {group}"


def test_storage_credentials_come_only_from_secrets():
    """Nothing secret is written into a manifest: every variable that names a key, secret, token
    or password comes from a secretKeyRef, and the job's metadata (entrypoint, runtimeEnvYAML)
    and the Serve config (stored and shown by Serve) carry none."""
    for name, doc in manifests().items():
        if doc["kind"] not in {"RayCluster", "RayJob", "RayService"}:
            continue
        for group, pod in pod_specs(doc).items():
            for container in pod["containers"]:
                assert "envFrom" not in container, f"{name} {group}: name each variable"
                for var, entry in env_of(container).items():
                    if SECRET_NAME.search(var) or var.startswith("AWS_"):
                        assert "value" not in entry and "secretKeyRef" in entry.get("valueFrom", {}), \
                            f"{name} {group}: {var} must come from a Secret"
        if doc["kind"] == "RayJob":
            runtime_env = yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "{}")
            text = doc["spec"]["entrypoint"] + doc["spec"].get("runtimeEnvYAML", "")
            assert not any(SECRET_NAME.search(k) or k.startswith("AWS_") for k in runtime_env.get("env_vars", {}))
            assert not re.search(r"AWS_|access_key|secret_key|session_token|@", text), f"{name}: {text}"
            assert not {k for k, _ in parse_qsl(urlsplit(job_output(doc)).query)} & {
                "access_key", "secret_key", "session_token"}
        if doc["kind"] == "RayService":
            assert not re.search(r"AWS_|access_key|secret_key|session_token", doc["spec"]["serveConfigV2"])


@pytest.mark.parametrize("name", ["rayjob.yaml", "rayservice.yaml"])
def test_object_storage_credentials_reach_every_ray_pod(name):
    """The driver (head, RayJob) writes the run and the replicas (workers, RayService) read it:
    every Ray pod of both gets the Secret's keys, the access key and secret required (a pod does
    not start without them), the region and the endpoint of an S3-compatible store optional."""
    for group, pod in pod_specs(load(name)).items():
        (container,) = pod["containers"]
        refs = {var: e["valueFrom"]["secretKeyRef"] for var, e in env_of(container).items()
                if var in S3_REQUIRED | S3_OPTIONAL}
        assert set(refs) == S3_REQUIRED | S3_OPTIONAL, f"{name} {group}"
        for var, ref in refs.items():
            assert (ref["name"], ref["key"]) == (S3_SECRET, var), f"{name} {group}: {var}"
            assert ref.get("optional", False) is (var in S3_OPTIONAL), f"{name} {group}: {var}"


def _without_storage(doc: dict) -> dict:
    """The resource with its storage taken out: object-store variables, volumes and the run URI."""
    doc = yaml.safe_load(yaml.safe_dump(doc))
    for pod in pod_specs(doc).values():
        pod.pop("volumes", None)
        for container in pod["containers"]:
            container.pop("volumeMounts", None)
            container["env"] = [e for e in container.get("env", []) if not e["name"].startswith("AWS_")]
            if not container["env"]:
                del container["env"]
    if doc["kind"] == "RayJob":
        doc["spec"]["entrypoint"] = doc["spec"]["entrypoint"].replace(job_output(doc), "RUN")
    else:
        doc["spec"]["serveConfigV2"] = doc["spec"]["serveConfigV2"].replace(serve_run_dir(doc), "RUN")
    return doc


@pytest.mark.parametrize("name", ["rayjob.yaml", "rayservice.yaml"])
def test_the_pvc_variant_differs_only_in_storage(name):
    """k8s/pvc/ is a copy (each file validates on its own): resources, auth, the service token
    and the Serve settings stay the same as in the object-storage manifests."""
    base, pvc = load(name), load(f"pvc/{name}")
    assert not any(v.startswith("AWS_") for pod in pod_specs(pvc).values() for c in pod["containers"]
                   for v in env_of(c)), "the PVC variant needs no object-store credentials"
    assert _without_storage(pvc) == _without_storage(base)
