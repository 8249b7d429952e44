"""Shared fixtures: a real embedded Ray on loopback, and a CLI runner in a subprocess."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Ray clusters that live only inside a test: no auth, no usage stats, state in a temp dir.
_TMP = Path(tempfile.mkdtemp(prefix="metaray-tests-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=str(_TMP))


# SIGTERM (a CI timeout) ends the run as Ctrl-C does: through every fixture's teardown, so that the
# clusters are stopped. A second SIGTERM ends it at once; the loopback clusters' reapers stop their
# nodes then, as they do when pytest is SIGKILLed.
_sigterm = {"armed": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL}


def _terminated(signum, frame):
    _sigterm["armed"] = False
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _arm() -> None:
    # ray.init in this process (ray_local, a test) replaces the handler with its own, sys.exit(SIGTERM),
    # which pytest would count as one failed test before it went on with the next.
    if _sigterm["armed"] and signal.getsignal(signal.SIGTERM) is not _terminated:
        signal.signal(signal.SIGTERM, _terminated)


def _sigterm_as_interrupt():
    _arm()
    try:
        return (yield)
    except SystemExit as exc:
        if exc.code != signal.SIGTERM or not _sigterm["armed"]:
            raise
        _sigterm["armed"] = False  # Ray's handler took this SIGTERM: end the run all the same
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt("signal SIGTERM") from exc
    finally:
        _arm()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _sigterm_as_interrupt())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _sigterm_as_interrupt())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    return (yield from _sigterm_as_interrupt())


_arm()


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the in-process tests: 2 CPUs, small object store, loopback.

    What ray.init starts (GCS, raylet, and every worker the raylet starts later) carries a
    marker in its environment, and a reaper (metaray/runtime/reaper.py) stops whatever still
    carries it when the session ends, however it ends: a worker whose raylet went first has
    been seen to outlive a heavily loaded run. The marker is in this process's environment
    only while ray.init runs, so CLI subprocesses and other clusters never carry it."""
    import time
    import uuid

    import ray

    from metaray.runtime.reaper import cluster_processes, release, start_reaper

    name, value = "METARAY_TEST_RAY", uuid.uuid4().hex
    log = _TMP / "ray-reaper.log"
    reaper = start_reaper(f"{name}={value}", log)
    os.environ[name] = value
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.2",
            object_store_memory=150 * 1024**2,
            _temp_dir=str(_TMP / "ray"),
            logging_level="WARNING",
        )
    finally:
        del os.environ[name]
    yield ray
    ray.shutdown()
    deadline = time.monotonic() + 10  # what shutdown stopped may take a moment to exit: not a finding
    while cluster_processes(f"{name}={value}", set(), {os.getpid()}) and time.monotonic() < deadline:
        time.sleep(0.2)
    release(reaper)
    stopped = log.read_text().strip() if log.exists() else ""
    if stopped and " stopped 0 " not in stopped:  # say so: what Ray left behind is a finding
        print(f"\nembedded Ray: {stopped}", file=sys.__stderr__)


@pytest.fixture(scope="session")
def ray_address(ray_local) -> str:
    """The session cluster's GCS address, for CLI subprocesses that join it with --address."""
    return ray_local.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def nav_run(ray_address, tmp_path_factory) -> Path:
    """A short real navigation2d meta-training (quickstart, 30 iterations) on the session's Ray."""
    out = tmp_path_factory.mktemp("nav") / "nav"
    proc = run_cli("train", "quickstart", "-s", "outer.iterations=30", "-s", "eval.tasks=5", "--output", str(out),
                   "--address", ray_address)
    assert proc.returncode == 0, proc.stderr
    return out


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "metaray.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ),
    )


def _quantity(value: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if str(value).endswith(suffix):
            return int(float(str(value)[: -len(suffix)]) * factor)
    return int(float(value))


def start_params(group: dict, ip: str) -> dict[str, str]:
    """What KubeRay would pass to `ray start` for a group: its rayStartParams, plus num-cpus and
    memory from the container's limits. Bind addresses become the node's loopback address."""
    params = {k: str(v) for k, v in (group.get("rayStartParams") or {}).items()}
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    if "cpu" in limits:
        params.setdefault("num-cpus", str(int(float(str(limits["cpu"]).removesuffix("m")) /
                                             (1000 if str(limits["cpu"]).endswith("m") else 1))))
    if "memory" in limits:
        params.setdefault("memory", str(_quantity(limits["memory"])))
    if params.get("dashboard-host") == "0.0.0.0":
        params["dashboard-host"] = ip
    return params


@pytest.fixture(scope="session")
def loopback_cluster():
    """A multi-node cluster on 127.0.0.4 (head) and 127.0.0.5+ (one node per worker replica),
    started with the rayStartParams and CPU/memory limits of k8s/rayjob.yaml."""
    import time

    import yaml

    from tests.loopback import LoopbackCluster, node_env

    spec = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    # The nodes run in this virtualenv, as pods run in the image: `python` in a job is ours. Should this
    # process end without the teardown below (SIGKILL), the cluster's reaper stops the nodes.
    cluster = LoopbackCluster(Path(tempfile.mkdtemp(prefix="mr-", dir="/tmp")),
                              env={**node_env(),
                                   # A busy 2-core CI machine can take a while to start a Ray Client server.
                                   "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "120"},
                              remove_temp_dir=True)
    start = time.monotonic()
    try:
        cluster.start_head(start_params(spec["headGroupSpec"], cluster.head_ip))
        ip = 5
        for group in spec["workerGroupSpecs"]:
            for _ in range(group.get("replicas", 1)):
                cluster.add_node(f"127.0.0.{ip}", start_params(group, f"127.0.0.{ip}"))
                ip += 1
        cluster.ensure_cpus(sum(float(n.get("num-cpus", 0)) for n in [start_params(spec["headGroupSpec"], "")] +
                                  [start_params(g, "") for g in spec["workerGroupSpecs"]
                                   for _ in range(g.get("replicas", 1))]))
        cluster.startup_s = time.monotonic() - start
        print(f"\nloopback cluster of {len(cluster.nodes)} nodes up in {cluster.startup_s:.1f}s")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)


TOKEN_HEAD = "127.0.0.20"
SERVICE_TOKEN = "emulated-serve-token-5d1e"
"""The adaptation service's bearer token on the token cluster (the Secret metaray-serve-token in k8s/)."""


@pytest.fixture(scope="session")
def s3():
    """A real S3 endpoint on 127.0.0.30 (moto's ThreadedMotoServer) with the bucket ``metaray``; dummy
    credentials in this process's environment, so the CLI subprocesses have them too."""
    import logging

    from tests.s3 import MotoS3, restore, set_credentials

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    saved = set_credentials()
    server = MotoS3("127.0.0.30")
    try:
        yield server
    finally:
        server.stop()
        restore(saved)


def pod_env(manifest: str, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The environment a manifest gives its Ray pods (every container of every group): literal values,
    and secretKeyRef values from ``secrets`` (Secret name -> key -> value), as the kubelet would."""
    import yaml

    spec = yaml.safe_load((ROOT / "k8s" / manifest).read_text())["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    env: dict[str, str] = {}
    for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
        for container in group["template"]["spec"]["containers"]:
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref is None:
                    env[var["name"]] = str(var["value"])
                elif ref["key"] in secrets.get(ref["name"], {}):
                    env[var["name"]] = secrets[ref["name"]][ref["key"]]
                else:
                    assert ref.get("optional"), f"{manifest}: Secret {ref['name']} has no key {ref['key']}"
    return env


@pytest.fixture(scope="session")
def token_cluster(s3):
    """A one-node Ray with token authentication on 127.0.0.20: RAY_AUTH_MODE=token, 2 CPUs, the dashboard
    and job server, and a Ray Client server, its token (random) in a file of its temp dir.

    ``address`` (GCS), ``client_address`` (ray://), ``dashboard_url``, ``token_file``; ``client_env(token)``
    is the environment for a client subprocess with the right token, a wrong one or none (see
    tests.loopback.LoopbackCluster.client_env). Should this process end without the teardown, the
    cluster's reaper stops the node and removes the temp dir."""
    import secrets
    import time

    from tests.loopback import LoopbackCluster, node_env

    temp = Path(tempfile.mkdtemp(prefix="mr-auth-", dir="/tmp"))
    token_file = temp / "auth_token"
    token_file.touch(mode=0o600)
    token_file.write_text(secrets.token_hex(16) + "\n")
    # Ray Client's default 30 s wait for a client's server (not loopback_cluster's 120 s): a server that failed
    # to start (its port taken meanwhile by another Ray on this machine) costs 30 s and metaray's retry, not 120.
    from tests.s3 import CREDENTIALS

    # The pods' environment of k8s/rayjob.yaml and k8s/rayservice.yaml, their Secrets pointing at the
    # loopback S3: the emulated KubeRay flow (tests/test_kuberay_flow.py) runs on this cluster.
    secrets = {"metaray-s3": {**CREDENTIALS, "AWS_ENDPOINT_URL_S3": f"http://{s3.endpoint}"},
               "metaray-serve-token": {"token": SERVICE_TOKEN}}
    pods = {**pod_env("rayjob.yaml", secrets), **pod_env("rayservice.yaml", secrets)}
    cluster = LoopbackCluster(temp, head_ip=TOKEN_HEAD, token_file=token_file, remove_temp_dir=True,
                              env={**node_env(), **pods})
    start = time.monotonic()
    try:
        cluster.start_head({"num-cpus": "2", "dashboard-host": TOKEN_HEAD})
        cluster.startup_s = time.monotonic() - start
        print(f"\ntoken-auth cluster up in {cluster.startup_s:.1f}s")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread, as a worker computes (resources.torch_threads): on small tensors more
    threads only contend, a lot on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
