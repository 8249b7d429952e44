"""Bounds on what config input may ask for, and an estimate of the memory a config needs.

Three layers keep careless or hostile input from exhausting a machine before anything useful
is said about it:

* Reading: a config file is at most ``MAX_CONFIG_BYTES`` of UTF-8 text, and YAML (files and
  ``--set`` values alike) is composed by :class:`BoundedLoader`, which refuses more than
  ``MAX_YAML_NODES`` values after alias expansion (a "billion laughs" fails in milliseconds),
  nesting deeper than ``MAX_YAML_DEPTH``, recursive aliases, and integers longer than
  ``MAX_INT_DIGITS`` digits. Values echoed in messages go through :func:`short_repr`.
* Fields: the config models bound every size (``le=`` in :mod:`metaray.config`).
* Memory: :func:`estimate_memory` adds up what the processes of a run hold, and
  :func:`check_embedded` / :func:`check_cluster` refuse a config that cannot fit, before the
  run directory is written.
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
import reprlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from metaray.config import Config
    from metaray.core.policy import SpaceSpec

MAX_CONFIG_BYTES = 1 << 20
"""A config file larger than 1 MiB is refused unread (the presets are under 1 KiB)."""
MAX_YAML_NODES = 100_000
"""Values (scalars, lists, mappings) a YAML document may expand to, counting every alias use."""
MAX_YAML_DEPTH = 64
"""Nesting of lists and mappings (a config needs 4 levels; task.options may need a few more)."""
MAX_INT_DIGITS = 100
"""Digits of an integer in YAML (2**64 has 20): longer ones are refused before int() sees them."""
MAX_ECHO = 100
"""Characters of an input value echoed in a message."""

MiB, GiB = 1 << 20, 1 << 30


class InputLimitError(ValueError):
    """Config input beyond one of the bounds above; the message says which."""


# -- echoing input ------------------------------------------------------------------------------


class _ShortRepr(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple, self.maxset = 3, 4, 6, 6, 6
        self.maxstring = self.maxother = self.maxlong = MAX_ECHO

    def repr_int(self, x: int, level: int) -> str:
        # repr() of an int over 4300 digits raises ValueError, and is quadratic below that.
        if x.bit_length() > 256:
            return f"<an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits>"
        return super().repr_int(x, level)


_SHORT = _ShortRepr()


def short_repr(value: Any, limit: int = MAX_ECHO) -> str:
    """repr(value), bounded in the time and memory it takes and cut to ``limit`` characters."""
    try:
        text = _SHORT.repr(value)
    except Exception:  # a repr that fails must not hide the message it was meant for
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(text: str, limit: int = 600) -> str:
    """A message on one line of at most ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- reading YAML -------------------------------------------------------------------------------


def _at(mark: Any) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


class BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that counts what the document expands to while composing it.

    Every node composed counts one, and every alias counts the whole expanded size of the node
    it names, so the count is the number of values a consumer walking the result (validation,
    deepcopy, repr, dumping) would visit; composing stops at ``MAX_YAML_NODES``. Depth is
    counted too: the composer recurses, so a document nested thousands deep would otherwise
    end in a RecursionError.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0
        self._expanded: dict[int, int] = {}  # id(anchored node) -> its expanded size
        self._open: set[str] = set()  # anchors of collections still being composed

    def _count(self, n: int, mark: Any) -> None:
        self._nodes += n
        if self._nodes > MAX_YAML_NODES:
            raise InputLimitError(f"YAML expands to more than {MAX_YAML_NODES:,} values{_at(mark)} "
                                  "(aliases of aliases, as in a 'billion laughs'?)")

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise InputLimitError(f"YAML alias *{short_repr(event.anchor, 40)}{_at(event.start_mark)} "
                                      "refers to a collection that contains it (a recursive structure)")
            node = super().compose_node(parent, index)
            self._count(self._expanded.get(id(node), 1), event.start_mark)
            return node
        if self._depth >= MAX_YAML_DEPTH:
            raise InputLimitError(f"YAML nests deeper than {MAX_YAML_DEPTH} levels{_at(event.start_mark)}")
        anchor, start = event.anchor, self._nodes
        self._count(1, event.start_mark)
        if anchor is not None:
            self._open.add(anchor)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open.discard(anchor)
        if anchor is not None:
            self._expanded[id(node)] = self._nodes - start
        return node

    def construct_yaml_int(self, node: Any) -> int:
        digits = node.value.replace("_", "").lstrip("+-")
        if len(digits) > MAX_INT_DIGITS:
            raise InputLimitError(f"an integer of {len(digits):,} digits{_at(node.start_mark)}; "
                                  f"at most {MAX_INT_DIGITS} are allowed")
        return super().construct_yaml_int(node)


BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)


def load_yaml(text: str) -> Any:
    """yaml.safe_load within the bounds above: InputLimitError beyond them, yaml.YAMLError for
    bad syntax, ValueError for a scalar no value fits (2001-13-45 as a date)."""
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    except RecursionError:  # not reached within MAX_YAML_DEPTH; kept as a last guard
        raise InputLimitError("YAML nests too deeply") from None
    finally:
        loader.dispose()


def read_text(path: Path) -> str:
    """A config file's text: at most MAX_CONFIG_BYTES of UTF-8 (a UTF-8 byte-order mark is
    dropped); InputLimitError naming what the file is otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise InputLimitError(f"cannot read config file {path}: {err.strerror or err}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise InputLimitError(f"config file {path} is larger than {MAX_CONFIG_BYTES // MiB} MiB; "
                              "a config is a few lines of YAML")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputLimitError(f"config file {path} is UTF-16 (or UTF-32) text; save it as UTF-8")
    if b"\x00" in data:
        raise InputLimitError(f"config file {path} holds NUL bytes: a binary file, not YAML text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputLimitError(f"config file {path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                              f"{err.start}); a config is YAML saved as UTF-8") from None
    return text.removeprefix("\ufeff")


# -- memory -------------------------------------------------------------------------------------

WORKER_BASE = 256 * MiB
"""A worker actor with torch, gymnasium and metaray imported (measured: 215 MiB PSS)."""
LEARNER_BASE = 320 * MiB
"""The learner actor (measured: 265 MiB PSS)."""
DRIVER_BASE = 320 * MiB
"""The `metaray train` process (measured: 260 MiB PSS)."""
RAY_BASE = 400 * MiB
"""An embedded Ray's own processes: GCS, raylet, agents, monitors (measured: 335 MiB PSS)."""
ROW_BYTES = 4 * 1024
"""A metrics row the driver keeps per iteration, and a task's row and draw."""
OBJECT_STORE_BYTES = 300 * MiB
"""The embedded Ray's object store, as metaray.runtime.cluster sizes it (METARAY_OBJECT_STORE_BYTES)."""


def probe_spec(config: Config) -> SpaceSpec | None:
    """The observation and action spaces of the config's family, from one env of one task;
    None when the family cannot make one (the run's own start then says why)."""
    import numpy as np

    from metaray.core.policy import SpaceSpec
    from metaray.tasks import make_family

    try:
        family = make_family(config.task.family, config.task.options)
        env = family.make_env(family.sample_tasks(1, np.random.default_rng(0))[0])
        try:
            return SpaceSpec.from_env(env)
        finally:
            env.close()
    except Exception:
        return None


def count_params(spec: SpaceSpec, hidden_sizes: list[int]) -> int:
    """The policy's parameters (metaray.core.policy.Policy): an MLP, and log_std when continuous."""
    dims = [spec.obs_dim, *hidden_sizes, spec.act_dim]
    return sum(a * b + b for a, b in itertools.pairwise(dims)) + (0 if spec.discrete else spec.act_dim)


def tasks_per_worker(config: Config) -> int:
    """The most tasks one worker holds in an iteration: whole groups, split as evenly as the
    learner splits them (metaray.runtime.learner.split_calls)."""
    m, g, w = config.outer.meta_batch_size, config.rollout.task_group_size, config.resources.num_workers
    groups = math.ceil(m / g)
    return min(m, math.ceil(groups / min(w, groups)) * g)


def estimate_memory(config: Config, spec: SpaceSpec | None = None, embedded: bool = True) -> dict[str, Any]:
    """Bytes a run of ``config`` needs at its peak, by process and by cause; errs high.

    A worker holds its share of the meta-batch (``tasks_per_worker``): every inner batch and
    the post-adaptation batch of each task, ``inner.episodes x rollout.horizon`` steps each
    (observation, action, reward, mask, advantage, log-probability, and the sampler's and the
    baseline's buffers on the way), the activations MAML's second-order graph keeps for one
    task, the ``horizon x horizon`` discount matrices of the advantages, and parameter-sized
    tensors (inner steps, gradients, each task's update vector). The constants come from
    measurements of navigation2d runs (peak proportional set size of each process) and are
    rounded up. The learner holds the parameters,
    Adam's moments and up to one update vector per task of the meta-batch. The driver keeps a
    row per iteration. An embedded Ray adds its own processes and object store.

    ``spec`` (the family's spaces) defaults to a probe of the family; without one, 64
    observation and 8 action dimensions are assumed.
    """
    from metaray.core.policy import SpaceSpec

    spec = spec or probe_spec(config) or SpaceSpec(64, 0, 8, False)
    w = config.resources.num_workers
    m, batches = config.outer.meta_batch_size, config.inner.steps + 1
    steps = config.inner.episodes * config.rollout.horizon  # steps of one batch, padded to the horizon
    horizon, tasks = config.rollout.horizon, tasks_per_worker(config)
    n_params = count_params(spec, config.policy.hidden_sizes)
    hidden = sum(config.policy.hidden_sizes)
    discount_steps = horizon
    from metaray.algorithms.base import resolve_algorithm

    if resolve_algorithm(config.algorithm).memory_based:  # RL²: one batch of trials; the GRU keeps ~6 gates a step
        width, inputs = config.rl2.hidden_size, spec.obs_dim + spec.act_dim + 2
        batches, steps, discount_steps = 1, steps * config.rl2.episodes_per_trial, 0
        dims = [width + inputs, *config.policy.hidden_sizes]
        n_params = 3 * width * (inputs + width + 2) + sum(a * b + b for a, b in itertools.pairwise(dims)) + \
            (dims[-1] + 1) * (spec.act_dim + 1) + (0 if spec.discrete else spec.act_dim)
        hidden = 3 * width + sum(config.policy.hidden_sizes)
    f32, f64 = 4, 8
    from metaray.tasks import resolve_family_class

    try:  # a family may declare what one env holds (Meta-World's hold a MuJoCo model each)
        env_bytes = int(getattr(resolve_family_class(config.task.family), "env_bytes", 0))
    except ValueError:
        env_bytes = 0
    per_worker = {
        "process": WORKER_BASE,
        "envs": tasks * config.inner.episodes * env_bytes,
        # Every batch of every task it holds, with the sampler's buffers and the linear baseline's
        # float64 features on the way (measured: 270 bytes a step for 2 observation and 2 action
        # dimensions, 5 to 10 tasks, 100,000 steps a batch).
        "episodes": tasks * batches * steps * (16 * (spec.obs_dim + spec.act_dim) + 200),
        # One task's graph: each batch's activations, and their gradients with create_graph
        # (measured: 1,600 to 3,900 bytes a step for hidden_sizes [64, 64] to [256, 256]).
        "graph": batches * steps * f32 * (spec.obs_dim + 5 * hidden + 4 * spec.act_dim),
        "discounting": 3 * discount_steps * discount_steps * f64,
        # parameters, inner steps, gradients and optimizer temporaries; each task's update vector
        "parameters": f32 * n_params * (12 + 4 * config.inner.steps) + f32 * n_params * 3 * tasks,
    }
    learner = {"process": LEARNER_BASE, "parameters": f32 * n_params * 8, "results": f32 * n_params * m}
    driver = {"process": DRIVER_BASE, "parameters": f32 * n_params * 4,
              "history": ROW_BYTES * (config.outer.iterations + m + config.eval.tasks)}
    store = int(os.environ.get("METARAY_OBJECT_STORE_BYTES", OBJECT_STORE_BYTES))
    ray_bytes = RAY_BASE + store if embedded else 0
    causes = {
        "processes": w * per_worker["process"] + learner["process"] + driver["process"] + ray_bytes,
        "episodes": w * per_worker["episodes"],
        "envs": w * per_worker["envs"],
        "graph": w * per_worker["graph"],
        "discounting": w * per_worker["discounting"],
        "parameters": w * per_worker["parameters"] + learner["parameters"] + driver["parameters"],
        "results": learner["results"],
        "history": driver["history"],
    }
    worker_total, learner_total, driver_total = (sum(p.values()) for p in (per_worker, learner, driver))
    return {
        "total": w * worker_total + learner_total + driver_total + ray_bytes,
        "workers": w,
        "worker": worker_total,
        "learner": learner_total,
        "driver": driver_total,
        "ray": ray_bytes,
        "tasks_per_worker": tasks,
        "params": n_params,
        "causes": causes,
    }


CAUSE_KEYS = {
    "processes": "resources.num_workers (one process each)",
    "episodes": "inner.episodes x rollout.horizon x inner.steps x tasks per worker "
                "(outer.meta_batch_size / resources.num_workers)",
    "envs": "inner.episodes x tasks per worker (the family's env_bytes each)",
    "graph": "inner.episodes x rollout.horizon x policy.hidden_sizes",
    "discounting": "rollout.horizon (a horizon x horizon discount matrix)",
    "parameters": "policy.hidden_sizes",
    "results": "outer.meta_batch_size x policy.hidden_sizes (an update vector per task)",
    "history": "outer.iterations",
}


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / MiB:.0f} MiB"


def _drivers(estimate: dict[str, Any]) -> str:
    causes = sorted(estimate["causes"].items(), key=lambda kv: -kv[1])
    top = [causes[0]] + [c for c in causes[1:2] if c[1] >= causes[0][1] / 3]
    return "; ".join(f"{_gib(v)} from {CAUSE_KEYS[k]}" for k, v in top)


SKIP_ENV = "METARAY_SKIP_MEMORY_CHECK"
"""Set to 1 to run a config whose estimate exceeds the memory (the estimate errs high)."""
EMBEDDED_CPU_FACTOR = 4
"""The embedded Ray gives workers at most this many times the machine's CPUs (and at least 8)."""


def available_memory() -> int | None:
    """Bytes this machine (or its container's cgroup) can still give, or None if unknown."""
    avail: int | None = None
    try:
        import ray  # noqa: F401  (ray puts its bundled psutil on sys.path)

        psutil = importlib.import_module("psutil")
        avail = int(psutil.virtual_memory().available)
    except Exception:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = (Path(f).read_text().strip() for f in (limit_file, usage_file))
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit():
            # Page cache is reclaimable: count the working set, as the kubelet does.
            room = int(limit) - int(usage) + _inactive_file(Path(limit_file).parent / "memory.stat")
            avail = room if avail is None else min(avail, room)
        break
    return avail


def _inactive_file(stat_file: Path) -> int:
    """Reclaimable page cache from a cgroup's memory.stat (v2 ``inactive_file``, v1
    ``total_inactive_file``); 0 when unknown."""
    try:
        for line in stat_file.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file") and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _skipped() -> bool:
    return os.environ.get(SKIP_ENV, "").strip().lower() in ("1", "true", "yes")


def check_embedded(config: Config, estimate: dict[str, Any], cpus: int | None = None,
                   available: int | None = None) -> None:
    """Refuse, before anything is written, a config an embedded Ray on this machine cannot run:
    workers reserving more than ``EMBEDDED_CPU_FACTOR`` times its CPUs, or an estimate above
    its available memory."""
    from metaray.config import ConfigError

    res = config.resources
    cpus = cpus or os.cpu_count() or 1
    wanted, allowed = res.num_workers * res.cpus_per_worker, max(8, EMBEDDED_CPU_FACTOR * cpus)
    if wanted > allowed:
        raise ConfigError(
            f"resources.num_workers x resources.cpus_per_worker = {wanted:g} CPUs, more than the embedded Ray "
            f"gives on this machine's {cpus} CPUs (at most {allowed}): each worker is a process of about "
            f"{_gib(estimate['worker'])}; lower resources.num_workers (results do not depend on it), or give "
            "--address of a Ray cluster")
    if _skipped():
        return
    available = available if available is not None else available_memory()
    if available is not None and estimate["total"] > available:
        raise ConfigError(
            f"this config needs about {_gib(estimate['total'])} of memory ({estimate['workers']} workers x "
            f"{_gib(estimate['worker'])}, learner {_gib(estimate['learner'])}, driver and embedded Ray "
            f"{_gib(estimate['driver'] + estimate['ray'])}) but this machine has {_gib(available)} available; "
            f"most of it: {_drivers(estimate)}; lower those keys ({SKIP_ENV}=1 runs it anyway)")


def check_cluster(config: Config, estimate: dict[str, Any], total: float | None = None,
                  largest_node: float | None = None) -> None:
    """Refuse a config whose workers and learner exceed the connected cluster's memory (Ray's
    ``memory`` resource, over all nodes), or whose one worker exceeds its largest node's.
    Called once connected; the figures are read from Ray when not given."""
    from metaray.config import ConfigError

    if _skipped():
        return
    if total is None:
        import ray

        try:
            total = float(ray.cluster_resources().get("memory", 0))
        except Exception:  # a cluster that cannot tell: no check rather than a false refusal
            total = None
        try:
            largest_node = max((float(n.get("Resources", {}).get("memory", 0)) for n in ray.nodes()
                                if n.get("Alive")), default=0.0)
        except Exception:
            largest_node = None
    needed = estimate["total"] - estimate["driver"] - estimate["ray"]
    if total and needed > total:
        raise ConfigError(
            f"this config needs about {_gib(needed)} of cluster memory ({estimate['workers']} workers x "
            f"{_gib(estimate['worker'])}, learner {_gib(estimate['learner'])}) but the cluster has "
            f"{_gib(total)} (Ray's memory resource); most of it: {_drivers(estimate)}; lower those keys "
            f"({SKIP_ENV}=1 runs it anyway)")
    if largest_node and estimate["worker"] > largest_node:
        raise ConfigError(
            f"one worker of this config needs about {_gib(estimate['worker'])} of memory but the cluster's "
            f"largest node has {_gib(largest_node)} (Ray's memory resource); most of it: {_drivers(estimate)}; "
            f"lower those keys ({SKIP_ENV}=1 runs it anyway)")
