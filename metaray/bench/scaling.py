"""``metaray bench``'s scaling figures: training on a real three-node Ray with 1, 2 and 3
workers, the learner's own cost per iteration as the meta-batch and the worker count grow,
and the learner's memory from meta-batch 20 to 2,000.

The cluster is three ``ray start --block`` processes on loopback addresses (127.0.0.50 the
head, .51 and .52), one CPU each, with token authentication on (a node on any address but
127.0.0.1 listens on every interface). They live no longer than this process: each is the
leader of a session of its own, registered with a reaper (metaray/runtime/reaper.py, run as a script)
that holds a pipe from this process and stops them once the pipe closes, however this
process ends. Everything they started carries a marker in its environment; teardown signals
exactly those processes (SIGTERM, then SIGKILL), by PID.

Every figure is from one run on one machine: compare ratios, not absolute speeds.
"""

from __future__ import annotations

import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metaray.runtime.reaper import register, release, start_reaper, stop_processes

if TYPE_CHECKING:
    from metaray.config import Config

HEAD_IP = "127.0.0.50"
NODE_IPS = ("127.0.0.51", "127.0.0.52")
MARKER_VAR = "METARAY_SCALING_CLUSTER"
"""In every node's environment (Ray hands it on to what it starts): how teardown and the reaper
know the cluster's processes."""
OBJECT_STORE_BYTES = 100 * 1024**2
RAY = str(Path(sys.executable).with_name("ray"))


# -- processes ---------------------------------------------------------------------------------


def _free_port(taken: set[int]) -> int:
    """A port free on every address (Ray binds a node's servers to every interface unless its address
    is 127.0.0.1), and not in ``taken``, the ports already handed to this cluster's nodes; bound,
    never listened on."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port
    raise RuntimeError("no free port")


# -- the cluster -------------------------------------------------------------------------------


@dataclass
class Node:
    ip: str
    args: list[str]
    proc: subprocess.Popen

    @property
    def log(self) -> str:
        return f"node-{self.ip}.log"


@dataclass
class LoopbackCluster:
    """One-CPU nodes on loopback addresses, started and stopped by PID."""

    temp_dir: Path
    head_ip: str = HEAD_IP
    node_ips: tuple[str, ...] = NODE_IPS
    cpus_per_node: int = 1
    object_store_bytes: int = OBJECT_STORE_BYTES
    marker: str = field(default_factory=lambda: f"{MARKER_VAR}={uuid.uuid4().hex}")
    gcs_port: int = 0
    nodes: list[Node] = field(default_factory=list)
    reaper: subprocess.Popen | None = None
    restarts: int = 0  # worker nodes that died while starting and were started again
    ports: set[int] = field(default_factory=set)  # every port handed to a node
    stopped_pids: list[int] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.gcs_port}"

    @property
    def token_file(self) -> Path:
        return self.temp_dir / "token"

    def node_env(self) -> dict[str, str]:
        """This process's environment, this virtualenv first on PATH, token auth on, and the marker."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
        name, value = self.marker.split("=", 1)
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file),
                    "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", name: value})
        return env

    def start(self, timeout_s: float = 120.0) -> None:
        self.token_file.write_text(secrets.token_hex(16) + "\n")
        self.token_file.chmod(0o600)
        self.reaper = start_reaper(self.marker, self.temp_dir / "reaper.log")
        self.gcs_port = _free_port(self.ports)
        head = self._start(self.head_ip, [
            "--head", f"--port={self.gcs_port}", f"--ray-client-server-port={_free_port(self.ports)}",
            "--include-dashboard=false"])
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection((self.head_ip, self.gcs_port), timeout=1).close()
                break
            except OSError:
                if head.proc.poll() is not None or time.monotonic() > deadline:
                    raise self._failure(head, "the head's GCS never opened") from None
                time.sleep(0.2)
        for ip in self.node_ips:
            self._start(ip, [f"--address={self.address}"])

    def _start(self, ip: str, args: list[str]) -> Node:
        # Ray's fixed default ports collide with any other Ray on this machine: every node gets free ones.
        # And a temp dir of its own: nodes sharing one pick their socket and log names by looking for
        # free ones, which races when two start together (seen: a raylet's plasma socket in use).
        own = [f"--temp-dir={self.temp_dir / ('n' + ip.rsplit('.', 1)[1])}"]
        own += [f"--{flag}={_free_port(self.ports)}" for flag in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
            "metrics-export-port", "node-manager-port", "object-manager-port")]
        with (self.temp_dir / f"node-{ip}.log").open("a") as log:
            proc = subprocess.Popen(
                [RAY, "start", "--block", f"--node-ip-address={ip}", f"--num-cpus={self.cpus_per_node}",
                 f"--object-store-memory={self.object_store_bytes}", "--disable-usage-stats", *args, *own],
                cwd=self.temp_dir, stdout=log, stderr=subprocess.STDOUT, env=self.node_env(), start_new_session=True)
        assert self.reaper is not None
        register(self.reaper, proc.pid)  # should this process die from here on, the reaper stops the node
        node = Node(ip, args, proc)
        self.nodes.append(node)
        return node

    def _failure(self, node: Node, what: str) -> RuntimeError:
        return RuntimeError(f"{what} ({node.ip}): {(self.temp_dir / node.log).read_text()[-2000:]}")

    def wait_for_cpus(self, timeout_s: float = 180.0, restarts: int = 2) -> None:
        """Until the connected cluster counts every node alive and every CPU. A worker node whose
        ``ray start`` exited meanwhile (a loaded machine can make a raylet miss its registration)
        is started again, what it left stopped first, up to ``restarts`` times."""
        import ray

        deadline = time.monotonic() + timeout_s
        count = 1 + len(self.node_ips)
        while sum(1 for n in ray.nodes() if n["Alive"]) < count or \
                ray.cluster_resources().get("CPU", 0) < count * self.cpus_per_node:
            for node in list(self.nodes):
                if node.proc.poll() is None and time.monotonic() < deadline:
                    continue
                if node.ip == self.head_ip or self.restarts >= restarts or time.monotonic() > deadline:
                    raise self._failure(node, f"the cluster did not reach {count} nodes")
                self.restarts += 1
                self.stopped_pids += stop_processes(None, {node.proc.pid}, {os.getpid()})
                self.nodes.remove(node)
                self._start(node.ip, node.args)
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, every process of the nodes, by PID; then release the reaper."""
        try:
            self.stopped_pids = sorted({*self.stopped_pids, *stop_processes(
                self.marker, {n.proc.pid for n in self.nodes}, {os.getpid()})})
            for node in self.nodes:
                node.proc.wait(timeout=10)
        finally:
            if self.reaper is not None:
                release(self.reaper)


@contextmanager
def _token_mode(token_file: Path) -> Iterator[None]:
    """Ray in this process sends the cluster's token (as ``--auth-token-file`` does), and afterwards
    whatever it sent before."""
    from ray._raylet import AuthenticationTokenLoader, Config

    keys = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")
    saved = {k: os.environ.get(k) for k in keys}

    def reload() -> None:
        Config.initialize("")  # Ray caches the mode it read from the environment
        AuthenticationTokenLoader.instance().reset_cache()

    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    os.environ.pop("RAY_AUTH_TOKEN", None)
    reload()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reload()


@contextmanager
def loopback_cluster(temp_root: str | None = None) -> Iterator[LoopbackCluster]:
    """A started three-node cluster with this process connected as its driver; torn down, always.

    ``cluster.stopped_pids`` lists, once the block is left, every process that teardown signalled.
    """
    import logging
    import shutil

    import ray

    if ray.is_initialized():
        raise RuntimeError("run the scaling bench before connecting to Ray: it starts its own cluster")
    cluster = LoopbackCluster(Path(tempfile.mkdtemp(prefix="mr-scale-", dir=temp_root or "/tmp")))
    try:
        cluster.start()
        with _token_mode(cluster.token_file):
            ray.init(address=cluster.address, _node_ip_address=cluster.head_ip, logging_level=logging.WARNING,
                     log_to_driver=False)
            try:
                cluster.wait_for_cpus()
                yield cluster
            finally:
                ray.shutdown()
    finally:
        cluster.stop()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)


# -- training speed with 1, 2, 3 workers -----------------------------------------------------------


def scaling_config(iterations: int, quick: bool = False) -> Config:
    """The navigation2d-maml preset (MAML + TRPO, 20 episodes of horizon 100, 64x64) shrunk as
    run_bench shrinks it, with a meta-batch of 30: six groups of 5 tasks, which divide evenly
    over 1, 2 and 3 workers (the preset's 20 would give 3 workers shares of 2, 1 and 1 groups)."""
    from metaray.config import load_config

    short = [f"outer.iterations={iterations}", "eval.tasks=2", "eval.steps=1", "checkpoint.every=1000",
             "outer.meta_batch_size=30", "resources.placement=spread"]
    if quick:  # a smoke run: tiny budgets, figures meaningless
        short += ["outer.meta_batch_size=15", "inner.episodes=4", "outer.trpo.cg_iters=2",
                  "outer.trpo.ls_max_steps=2"]
    return load_config("navigation2d-maml", short)


def training_scaling(config: Config, worker_counts: Sequence[int] = (1, 2, 3), iterations: int = 5,
                     warmup: int = 2) -> dict[str, Any]:
    """metaray.bench.training_speed with each worker count on the connected Ray; the speedup and
    parallel efficiency against the first count."""
    from metaray.bench import training_speed

    runs: dict[str, Any] = {}
    for workers in worker_counts:
        cfg = config.model_copy(update={
            "outer": config.outer.model_copy(update={"iterations": iterations}),
            "resources": config.resources.model_copy(update={"num_workers": workers})})
        runs[str(workers)] = training_speed(cfg, iterations, warmup)
    base = runs[str(worker_counts[0])]["train_steps_per_s"]
    return {
        "train_steps_per_s": {k: r["train_steps_per_s"] for k, r in runs.items()},
        "speedup": {k: r["train_steps_per_s"] / base for k, r in runs.items()},
        "efficiency": {k: r["train_steps_per_s"] / base / (int(k) / worker_counts[0]) for k, r in runs.items()},
        "runs": runs,
    }


def cluster_scaling(config: Config, worker_counts: Sequence[int] = (1, 2, 3), iterations: int = 5,
                    warmup: int = 2) -> dict[str, Any]:
    """training_scaling on a three-node loopback cluster of one CPU per node, started for the call
    and torn down by PID before it returns."""
    start = time.perf_counter()
    with loopback_cluster() as cluster:
        up = time.perf_counter() - start
        out = training_scaling(config, worker_counts, iterations, warmup)
    return {**out, "cluster": _describe(cluster, up)}


def _describe(cluster: LoopbackCluster, startup_s: float) -> dict[str, Any]:
    return {"head": cluster.head_ip, "nodes": [cluster.head_ip, *cluster.node_ips],
            "cpus_per_node": cluster.cpus_per_node, "machine_cpus": os.cpu_count(), "startup_s": startup_s,
            "token_auth": True, "node_restarts": cluster.restarts, "stopped_pids": cluster.stopped_pids,
            "reaper_pid": cluster.reaper.pid if cluster.reaper else None, "marker": cluster.marker}


# -- the learner's cost and memory ---------------------------------------------------------------


def probe_config() -> Config:
    """Tasks as cheap as real tasks get: 5-armed bandits, one episode of one pull, hidden [8], the
    ``pretrain`` algorithm (one policy gradient per task, no adaptation) with Adam: the learner's
    half is the same fold and bookkeeping for every algorithm; this keeps the workers' share small."""
    from metaray.config import load_config

    return load_config("bandit-fomaml", ["algorithm=pretrain", "policy.hidden_sizes=[8]", "inner.episodes=1",
                                         "rollout.horizon=1", "eval.tasks=1"])


@cache
def _probed_learner() -> type:
    """The real Learner, its pool's result path and Ray gets timed, with a probe around step()."""
    import tracemalloc

    import ray

    from metaray.runtime.learner import Learner
    from metaray.runtime.pool import WorkerPool

    class TimedPool(WorkerPool):
        fold_s = 0.0  # the learner's thread CPU time in on_result: the fold in task order and the rows
        get_s = 0.0  # ... in ray.get of the workers' answers (deserialising the results)

        def __init__(self, workers: list, task_timeout_s: float | None) -> None:
            super().__init__(workers, task_timeout_s=task_timeout_s, get=self._get)

        def _get(self, ref: Any) -> Any:
            start = time.thread_time()
            try:
                return ray.get(ref)
            finally:
                TimedPool.get_s += time.thread_time() - start

        def map(self, call: Any, indices: list[int], on_result: Any) -> None:
            def timed(index: int, worker: int, value: Any) -> None:
                start = time.thread_time()
                on_result(index, worker, value)
                TimedPool.fold_s += time.thread_time() - start

            super().map(call, indices, timed)

    class ProbedLearner(Learner):
        def __init__(self, config: dict[str, Any], flat_params: Any, workers: list) -> None:
            super().__init__(config, flat_params, None)
            self.workers = workers
            self.use_workers(len(workers))

        def use_workers(self, count: int) -> None:
            """From the next step on, the first ``count`` workers: a pool as Learner.__init__ makes one."""
            self.pool = TimedPool(self.workers[:count], self.config.resources.task_timeout_s)
            self._settled = False

        def probe(self, iteration: int, tasks: list, memory: str = "") -> dict[str, Any]:
            """step() with its costs: thread and process CPU, wall, and with ``memory`` "trace" the
            Python heap's peak growth (tracemalloc), with "rss" the resident set's (VmHWM)."""
            TimedPool.fold_s = TimedPool.get_s = 0.0
            found: dict[str, Any] = {}
            if memory == "trace":
                tracemalloc.start()
            elif memory == "rss":
                found["hwm_reset"] = _reset_hwm()
                found["rss_before"] = _status_bytes("VmRSS")
            wall, thread, process = time.perf_counter(), time.thread_time(), time.process_time()
            out = self.step(iteration, tasks)
            thread, process = time.thread_time() - thread, time.process_time() - process
            wall = time.perf_counter() - wall
            if memory == "trace":
                held, peak = tracemalloc.get_traced_memory()
                rows = out.pop("tasks")
                with_rows = tracemalloc.get_traced_memory()[0]
                del rows
                found.update(peak_bytes=peak, held_after_step_bytes=held,
                             rows_bytes=with_rows - tracemalloc.get_traced_memory()[0])
                tracemalloc.stop()
            elif memory == "rss":
                found.update(peak_growth_bytes=_status_bytes("VmHWM") - found["rss_before"],
                             rss_after=_status_bytes("VmRSS"))
            return {"meta_batch": len(tasks), "workers": len(self.pool.workers), "applied": out["applied"],
                    "rejected": out["rejected_results"], "wall_s": wall, "thread_cpu_s": thread,
                    "process_cpu_s": process, "fold_cpu_s": TimedPool.fold_s, "get_cpu_s": TimedPool.get_s,
                    "gather_s": out["gather_s"], "outer_s": out["outer_s"], **found}

    return ProbedLearner


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_hwm() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def fit_cost(points: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Least squares of ``key`` = a + b * meta_batch + c * workers over the points."""
    import numpy as np

    x = np.array([[1.0, p["meta_batch"], p["workers"]] for p in points])
    y = np.array([p[key] for p in points])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    predicted = x @ coef
    residuals = y - predicted
    spread = float(((y - y.mean()) ** 2).sum())
    return {"model": f"{key} = a + b * meta_batch + c * workers", "a_s": float(coef[0]),
            "b_s_per_task": float(coef[1]), "c_s_per_worker": float(coef[2]),
            "points": [{"meta_batch": p["meta_batch"], "workers": p["workers"], "measured": float(m),
                        "predicted": float(f), "residual": float(r)}
                       for p, m, f, r in zip(points, y, predicted, residuals)],
            "max_abs_residual": float(abs(residuals).max()),
            "r2": 1.0 - float((residuals**2).sum()) / spread if spread > 0 else 1.0}


def learner_scaling(config: Config, meta_batches: Sequence[int] = (20, 200, 2000),
                    worker_counts: Sequence[int] = (1, 2, 3), repeats: int = 3) -> dict[str, Any]:
    """The real learner (an actor on the head, as start_learner places it) driving real workers
    through cheap tasks on the connected Ray: its CPU time per iteration for each meta-batch and
    worker count (median of ``repeats`` steps), fitted to a + b * meta_batch + c * workers, and
    its memory growth during one step for each meta-batch (with the first worker count)."""
    import ray

    from metaray.core import seeding
    from metaray.core.policy import flatten
    from metaray.core.task_worker import TaskWorker
    from metaray.runtime.worker import start_workers

    cfg = config.model_copy(update={"resources": config.resources.model_copy(
        update={"num_workers": max(worker_counts)})})
    runner = TaskWorker(cfg)
    flat = flatten(runner.template).numpy()
    workers = start_workers(cfg, name_prefix=f"metaray-probe-{uuid.uuid4().hex[:8]}")
    placed = ray.get([w.ping.remote() for w in workers], timeout=300)
    actor = ray.remote(_probed_learner()).options(num_cpus=0, resources={"node:__internal_head__": 0.001})
    dumped = cfg.model_dump(mode="json")
    iteration = 0

    def step(learner: Any, n: int, memory: str = "") -> dict[str, Any]:
        nonlocal iteration
        iteration += 1
        tasks = seeding.train_tasks(runner.family, cfg.seed, iteration, n)
        return ray.get(learner.probe.remote(iteration, tasks, memory))

    points, memory = [], {}
    learner = actor.remote(dumped, flat, workers)
    try:
        for count in worker_counts:
            ray.get(learner.use_workers.remote(count))
            step(learner, meta_batches[0])  # warm-up: workers settled, first Adam step, code paths
            for n in meta_batches:
                runs = []
                if count == worker_counts[0]:  # memory first, ascending: each a new high-water mark
                    runs.append(step(learner, n, "rss"))  # a plain step otherwise: it counts as a repeat
                    memory[str(n)] = {"rss": runs[0], "trace": step(learner, n, "trace")}
                runs += [step(learner, n) for _ in range(repeats - len(runs))]
                point = {k: statistics.median(r[k] for r in runs) for k in (
                    "wall_s", "thread_cpu_s", "process_cpu_s", "fold_cpu_s", "get_cpu_s", "gather_s", "outer_s")}
                points.append({"meta_batch": n, "workers": count, **point, "applied": all(r["applied"] for r in runs)})
    finally:
        for actor_handle in [learner, *workers]:
            ray.kill(actor_handle, no_restart=True)
    fits = {key: fit_cost(points, key) for key in ("thread_cpu_s", "process_cpu_s", "fold_cpu_s")}
    one = next(p for p in points if p["meta_batch"] == meta_batches[-1] and p["workers"] == worker_counts[0])
    per_task = one["gather_s"] * worker_counts[0] / meta_batches[-1]
    return {"parameters": int(flat.size), "repeats": repeats, "task_group_size": config.rollout.task_group_size,
            "worker_nodes": sorted(p["node"] for p in placed), "points": points, "fit": fits,
            # How many workers one learner keeps busy before its own CPU is the bottleneck, with these
            # cheapest of tasks: a worker's wall time per task over the learner's process CPU per task.
            "worker_wall_per_task_s": per_task,
            "workers_one_learner_can_feed": per_task / b if (b := fits["process_cpu_s"]["b_s_per_task"]) > 0 else None,
            "memory": _memory_summary(memory, meta_batches, worker_counts[0])}


def _memory_summary(memory: dict[str, Any], meta_batches: Sequence[int], workers: int) -> dict[str, Any]:
    lo, hi = str(meta_batches[0]), str(meta_batches[-1])
    tasks = meta_batches[-1] - meta_batches[0]
    peak = {n: m["trace"]["peak_bytes"] for n, m in memory.items()}
    rows = {n: m["trace"]["rows_bytes"] for n, m in memory.items()}
    rss = {n: m["rss"]["peak_growth_bytes"] for n, m in memory.items()}
    beyond = {n: peak[n] - rows[n] for n in peak}
    return {
        "workers": workers,
        "python_heap_peak_growth_bytes": peak,  # tracemalloc, started just before step()
        "rows_bytes": rows,  # the per-task rows step() returns (tasks.parquet's), measured by freeing them
        "rss_peak_growth_bytes": rss,  # VmHWM after step() minus VmRSS before (VmHWM reset first)
        "hwm_reset": all(m["rss"]["hwm_reset"] for m in memory.values()),
        f"python_heap_peak_ratio_{hi}_vs_{lo}": peak[hi] / max(peak[lo], 1),
        f"rss_peak_ratio_{hi}_vs_{lo}": rss[hi] / max(rss[lo], 1) if rss[lo] > 0 else None,
        "peak_bytes_per_task": (peak[hi] - peak[lo]) / tasks,
        "peak_bytes_constant": peak[lo] - (peak[hi] - peak[lo]) / tasks * int(lo),
        "row_bytes_per_task": (rows[hi] - rows[lo]) / tasks,
        "rss_bytes_per_task": (rss[hi] - rss[lo]) / tasks,
        # What the learner holds beyond the rows it returns (tasks.parquet's table, O(meta-batch) by
        # design): the fold's own memory, which must not grow with the meta-batch.
        "beyond_rows_bytes": beyond,
        f"beyond_rows_ratio_{hi}_vs_{lo}": beyond[hi] / max(beyond[lo], 1),
        "beyond_rows_bytes_per_task": (beyond[hi] - beyond[lo]) / tasks,
        "flat": beyond[hi] < 1.5 * beyond[lo],
    }


# -- everything, in one cluster --------------------------------------------------------------------


def run_scaling(quick: bool = False) -> dict[str, Any]:
    """Training speed with 1, 2 and 3 workers, the learner's cost model and its memory, on one
    three-node loopback cluster started for the call and torn down by PID, always. ``quick``:
    tiny budgets for a smoke test of the bench itself (figures meaningless)."""
    import platform

    import ray
    import torch

    start = time.perf_counter()
    torch.set_num_threads(1)
    iterations, warmup = (2, 1) if quick else (5, 2)
    meta_batches, repeats = ((5, 10, 20), 1) if quick else ((20, 200, 2000), 3)
    counts = (1, 2, 3)
    config, probe = scaling_config(iterations, quick), probe_config()
    groups = -(-config.outer.meta_batch_size // config.rollout.task_group_size)
    out: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__},
        "settings": {
            "quick": quick,
            "training": f"navigation2d-maml preset (MAML + TRPO, horizon 100, one inner step, 64x64), meta-batch "
                        f"{config.outer.meta_batch_size} ({groups} groups of {config.rollout.task_group_size}"
                        f"{': an even share for 1, 2 and 3 workers' if groups % 6 == 0 else ''}), "
                        f"{config.inner.episodes} episodes per batch, placement spread, {iterations} iterations of "
                        f"which {warmup} warm-up, 2 held-out tasks",
            "learner": "bandit-fomaml preset made as cheap as tasks get: algorithm pretrain (Adam), hidden [8], "
                       f"1 episode of horizon 1; meta-batches {list(meta_batches)}, workers {list(counts)}, "
                       f"median of {repeats} steps after one warm-up step per worker count",
            "cluster": f"3 nodes x 1 CPU on {HEAD_IP} (head; the learner, num_cpus=0) and {', '.join(NODE_IPS)}",
        },
        "caveats": [
            f"3 one-CPU nodes on a {os.cpu_count()}-CPU machine: with 3 workers, plus the learner and the driver, "
            "the CPUs are oversubscribed, so the 3-worker figure measures contention, not what a third machine "
            "would add; only 1 -> 2 workers can scale, and other work on a shared machine shows in every figure",
            "learner CPU times are the learner actor's own (thread and process CPU time around step()), not "
            "wall time, so that waiting for workers and for a busy CPU is not counted as learner cost",
            "memory: tracemalloc sees the Python heap (numpy included, torch not); VmHWM the whole process",
        ],
    }
    with loopback_cluster() as cluster:
        up = time.perf_counter()
        out["training"] = training_scaling(config, counts, iterations, warmup)
        trained = time.perf_counter()
        out["learner"] = learner_scaling(probe, meta_batches, counts, repeats)
        probed = time.perf_counter()
    phases = {"cluster_start": up - start, "training": trained - up, "learner": probed - trained,
              "teardown": time.perf_counter() - probed}
    out["cluster"] = {**_describe(cluster, phases["cluster_start"]), "phase_wall_s": phases}
    out["learner"]["memory"]["explanation"] = _memory_explanation(out["learner"], config)
    out["wall_s"] = time.perf_counter() - start
    return out


def _memory_explanation(learner: dict[str, Any], config: Config) -> str:
    from metaray.core.policy import flatten
    from metaray.core.task_worker import TaskWorker

    mem = learner["memory"]
    paper = int(flatten(TaskWorker(config).template).numel())
    size = learner.get("task_group_size", config.rollout.task_group_size)
    beyond = mem["beyond_rows_bytes"]
    lo, hi = min(beyond, key=int), max(beyond, key=int)
    verdict = "flat" if mem["flat"] else "not flat"
    return (
        f"{verdict} beyond the rows: the Python heap's peak is {beyond[lo] / 1e6:.2f} MB at meta-batch {lo} and "
        f"{beyond[hi] / 1e6:.2f} MB at {hi} once the rows the step returns are left out "
        f"({mem['beyond_rows_bytes_per_task']:.0f} bytes per task; most of the constant is Ray's: one ray.get of even "
        f"a small result allocates about 1 MB for a moment). The rows ({mem['row_bytes_per_task']:.0f} bytes a task, "
        "tasks.parquet's table) are O(meta-batch) by design; they are the objects the workers sent, not copies. "
        f"Vectors come back as one in-order sum per group of {size} tasks, so what can wait to be folded is one "
        f"vector per group: with the navigation2d-maml policy ({paper} parameters) at most "
        f"{4 * paper * 2000 / size / 1e6:.1f} MB at meta-batch 2,000, where per-task vectors would be "
        f"{4 * paper * 2000 / 1e6:.1f} MB; the running sum is O(parameters).")
