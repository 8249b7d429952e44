"""A real multi-node Ray cluster on loopback addresses, started and stopped by PID.

Each node is a ``ray start --block`` process in a session of its own; stopping a node
signals exactly the processes it started (its descendants and its process group), never
anything else on the machine.

The nodes live no longer than the process that started them: a cluster's first node starts
a reaper (metaray/runtime/reaper.py) that holds a pipe from this process and, once the pipe
closes (this process exited, however: SIGTERM, SIGKILL, ...), stops whatever the nodes left.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from metaray.runtime.reaper import alive, register, release, start_reaper

RAY = str(Path(sys.executable).with_name("ray"))
# In every node's environment, which Ray hands on to what it starts: how the reaper knows a cluster's processes.
MARKER_VAR = "METARAY_LOOPBACK_CLUSTER"
# Node loss is detected in ~5 s: fast enough for the node-loss test, slow enough that a raylet
# busy starting up on a loaded 2-core machine is not declared dead (seen with a threshold of 4).
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "10",
                      "RAY_health_check_timeout_ms": "500", "RAY_health_check_initial_delay_ms": "0"}


def node_env() -> dict[str, str]:
    """What every node runs with: no auth, and this virtualenv first on PATH (`python` in a job is ours,
    as it is the image's in a pod)."""
    return {"RAY_AUTH_MODE": "disabled",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def token_node_env(token_file: Path) -> dict[str, str]:
    """node_env() with Ray's token authentication on: every node runs with RAY_AUTH_MODE=token and reads
    the cluster's token from ``token_file`` (never ~/.ray/auth_token, which no test writes)."""
    return {**node_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, stack = _children(), [], [pid]
    while stack:
        for child in tree.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _group(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@dataclass
class Node:
    ip: str
    proc: subprocess.Popen
    log: Path
    params: dict[str, str] = field(default_factory=dict)  # what add_node was given, to start it again
    object_store_bytes: int = 0

    def pids(self) -> list[int]:
        return sorted({self.proc.pid, *descendants(self.proc.pid), *_group(self.proc.pid)})

    def raylet_pid(self) -> int:
        found = [p for p in descendants(self.proc.pid) if process_name(p) == "raylet"]
        assert found, f"no raylet under node {self.ip}"
        return found[0]

    def stop(self) -> None:
        """SIGTERM what this node started, then SIGKILL what is left (raylet ignores SIGTERM)."""
        pids = self.pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(alive(p) for p in pids):
                time.sleep(0.1)
        self.proc.wait(timeout=10)


@dataclass
class LoopbackCluster:
    temp_dir: Path
    head_ip: str = "127.0.0.4"
    gcs_port: int = 0
    dashboard_port: int = 0
    client_port: int = 0
    nodes: list[Node] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    marker: str = field(default_factory=lambda: f"{MARKER_VAR}={uuid.uuid4().hex}")
    reaper: subprocess.Popen | None = None
    reaper_grace_s: float = 3.0
    remove_temp_dir: bool = False  # by the reaper, once the nodes are gone, however this process ends
    token_file: Path | None = None  # the cluster's token (RAY_AUTH_MODE=token on every node), if any

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.gcs_port}"

    @property
    def client_address(self) -> str:
        return f"ray://{self.head_ip}:{self.client_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head_ip}:{self.dashboard_port}"

    def _start(self, ip: str, args: list[str], extra_env: dict[str, str]) -> Node:
        # Fixed default ports (the job agent's 52365, ...) collide with any other Ray on this
        # machine, the tests' embedded one included: give every node its own free ones.
        args = [*args, *(f"--{flag}={free_port(ip)}" for flag in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
            "metrics-export-port", "node-manager-port", "object-manager-port"))]
        log = self.temp_dir / f"node-{ip}.log"
        key, value = self.marker.split("=", 1)
        env = self._env({**extra_env, key: value})
        reaper = self._reaper()
        proc = subprocess.Popen([RAY, "start", "--block", f"--node-ip-address={ip}", *args], cwd=self.temp_dir,
                                stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        # Should this process die before these lines, the reaper still finds the node by its marker.
        register(reaper, proc.pid)
        node = Node(ip, proc, log)
        self.nodes.append(node)
        return node

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """What the nodes (and `ray status`) run with: this process's environment, the cluster's, ``extra``,
        and the cluster's token if it has one (RAY_AUTH_TOKEN dropped: Ray would prefer it to the file)."""
        env = {**os.environ, **self.env, **(extra or {})}
        if self.token_file is not None:
            env.update(token_node_env(self.token_file))
            env.pop("RAY_AUTH_TOKEN", None)
        return env

    @property
    def wrong_token_file(self) -> Path:
        """A token file that is not the cluster's."""
        path = self.temp_dir / "wrong_token"
        if not path.exists():
            path.write_text(uuid.uuid4().hex + "\n")
        return path

    def client_env(self, token: str | None = "right", *, via: str = "path", mode: str = "token") -> dict[str, str]:
        """The environment for a client of this token cluster (a CLI in a subprocess).

        ``token``: "right" (the cluster's), "wrong" (another), or None (none anywhere); ``via``:
        "path" (RAY_AUTH_TOKEN_PATH) or "env" (RAY_AUTH_TOKEN); ``mode``: RAY_AUTH_MODE ("token";
        "disabled" is what CI exports). Every other RAY_AUTH_* is dropped, and HOME is an empty
        directory of the cluster's, so that the user's ~/.ray/auth_token is never read (nor written).
        """
        home = self.temp_dir / "client-home"
        home.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
        env.update(HOME=str(home), RAY_AUTH_MODE=mode)
        if token is not None:
            path = {"right": self.token_file, "wrong": self.wrong_token_file}[token]
            if via == "env":
                env["RAY_AUTH_TOKEN"] = path.read_text().strip()
            else:
                env["RAY_AUTH_TOKEN_PATH"] = str(path)
        return env

    def _reaper(self) -> subprocess.Popen:
        """The cluster's reaper, started with its first node: in a session of its own, so that a signal
        to this process's group leaves it to do its work; only this process holds its stdin's write end."""
        if self.reaper is None or self.reaper.poll() is not None:
            self.reaper = start_reaper(self.marker, self.temp_dir / "reaper.log", self.reaper_grace_s,
                                       self.temp_dir if self.remove_temp_dir else None)
        return self.reaper

    def release_reaper(self, timeout: float = 60) -> None:
        """Close the reaper's pipe: it stops what the nodes left behind, if anything, and exits."""
        if self.reaper is not None:
            release(self.reaper, timeout)

    def start_head(self, params: dict[str, str], object_store_bytes: int = 100 * 1024**2) -> Node:
        self.gcs_port = free_port(self.head_ip)
        self.dashboard_port = free_port(self.head_ip)
        self.client_port = free_port(self.head_ip)
        args = ["--head", f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={self.client_port}", f"--temp-dir={self.temp_dir / 'ray'}",
                f"--object-store-memory={object_store_bytes}", "--include-dashboard=true", "--disable-usage-stats",
                *[f"--{k}={v}" for k, v in params.items()]]
        node = self._start(self.head_ip, args, FAST_HEALTH_CHECKS)
        self.wait_for_port(self.head_ip, self.dashboard_port, node)
        self.wait_for_port(self.head_ip, self.client_port, node)
        return node

    def add_node(self, ip: str, params: dict[str, str], object_store_bytes: int = 100 * 1024**2) -> Node:
        """Start a node on ``ip`` and wait until the cluster lists it alive, by address: a count of
        alive nodes taken before can be short while the dashboard is still catching up (seen on a
        loaded 2-core CI machine), which made this wait for a node that had joined already."""
        args = [f"--address={self.address}", f"--object-store-memory={object_store_bytes}", "--disable-usage-stats",
                *[f"--{k}={v}" for k, v in params.items()]]
        node = self._start(ip, args, {})
        node.params, node.object_store_bytes = dict(params), object_store_bytes
        deadline = time.monotonic() + 120
        while ip not in self.alive_ips():
            if node.proc.poll() is not None or time.monotonic() > deadline:
                try:
                    seen = f"the dashboard lists {sorted(self.alive_ips()) or 'no node'} alive"
                    self._nodes_summary()
                except OSError as err:
                    seen = f"the dashboard does not answer ({err})"
                raise RuntimeError(f"node {ip} did not join ({seen}): {node.log.read_text()[-2000:]}")
            time.sleep(0.2)
        return node

    def ensure_cpus(self, cpus: float, timeout: float = 60) -> None:
        """wait_for_cpus, first starting again (once) any worker node that died after joining: its
        ``ray start --block`` exited or its raylet is no longer alive (a loaded machine can make a
        starting raylet miss its health checks). On failure the error carries every node's log tail."""
        for attempt in range(2):
            try:
                self.wait_for_cpus(cpus, timeout)
                return
            except RuntimeError as err:
                if attempt:
                    logs = "\n".join(f"--- {n.ip} (exit {n.proc.poll()}):\n{n.log.read_text()[-600:]}"
                                      for n in self.nodes)
                    raise RuntimeError(f"{err}\n{logs}") from None
            alive = self.alive_ips()
            for node in [n for n in self.nodes[1:] if n.proc.poll() is not None or n.ip not in alive]:
                print(f"\nloopback node {node.ip} died after joining; starting it again:\n"
                      f"{node.log.read_text()[-800:]}")
                node.stop()
                self.nodes.remove(node)
                self.add_node(node.ip, node.params, node.object_store_bytes)

    def _nodes_summary(self) -> dict:
        """The dashboard's node summary (with the cluster's token, if it has one); OSError if unavailable."""
        import json
        import urllib.request

        headers = {} if self.token_file is None else {
            "Authorization": f"Bearer {self.token_file.read_text().strip()}"}
        request = urllib.request.Request(f"{self.dashboard_url}/nodes?view=summary", headers=headers)
        with urllib.request.urlopen(request, timeout=5) as r:
            return json.load(r)

    def alive_ips(self) -> set[str]:
        try:
            data = self._nodes_summary()
        except OSError:
            return set()
        return {n.get("ip") or n["raylet"].get("nodeManagerAddress") for n in data["data"]["summary"]
                if n["raylet"]["state"] == "ALIVE"}

    def wait_for_cpus(self, cpus: float, timeout: float = 90) -> None:
        """Until the cluster's resource view (what the scheduler places by) counts ``cpus`` CPUs.

        A node that has just joined is alive before its resources reach every raylet; an
        actor placed in that window can land queued on a node that is already full.
        """
        import re

        deadline = time.monotonic() + timeout
        while True:
            out = subprocess.run([RAY, "status", f"--address={self.address}"], capture_output=True, text=True,
                                 env=self._env(), timeout=60).stdout
            match = re.search(r"/([\d.]+) CPU", out)
            if match and float(match.group(1)) >= cpus:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster did not report {cpus} CPUs: {out[-1500:]}")
            time.sleep(0.5)

    def alive_nodes(self) -> int:
        try:
            data = self._nodes_summary()
        except OSError:
            return 0
        return sum(1 for n in data["data"]["summary"] if n["raylet"]["state"] == "ALIVE")

    @staticmethod
    def wait_for_port(ip: str, port: int, node: Node, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((ip, port), timeout=1).close()
                return
            except OSError:
                if node.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{ip}:{port} never opened: {node.log.read_text()[-2000:]}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        """SIGKILL every process the nodes started, all at once, then close the reaper's pipe, which stops
        anything they left. A throwaway cluster needs no graceful stop, and one costs seconds per node:
        Node.stop waits up to 5 s for what SIGTERM leaves (a head's GCS and raylet outlive it)."""
        try:
            nodes = [(node, node.pids()) for node in self.nodes]
            for _, pids in nodes:
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(alive(p) for _, pids in nodes for p in pids):
                time.sleep(0.05)
            for node, _ in nodes:
                node.proc.wait(timeout=10)
        finally:
            self.release_reaper()
