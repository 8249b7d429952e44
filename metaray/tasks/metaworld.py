"""Meta-World's meta-learning benchmarks ML1 and ML10 (Yu et al., 2019) as task families.

A Meta-World benchmark is a set of env classes (a Sawyer arm and one manipulation skill:
reach, push, pick-place, door-open, ...) and, per class and split, 50 task variants (the
object and goal positions, fixed per variant). The goal is not in the 39-dim observation
(the benchmarks' "partially observable" setting), so a policy must infer it from rewards.

- ``metaworld-ml1`` (option ``env_name``): one class; training tasks are the benchmark's 50
  train variants, held-out tasks its 50 test variants (other goal positions).
- ``metaworld-ml10``: training tasks come from the 10 train classes, held-out tasks from
  the 5 test classes (skills never seen in training).

A task is ``{"env_name": "reach-v3", "split": "train" | "test", "variant": i}``, ``i`` in
[0, 50): an index into that split's variants of that class, as the benchmark built them
with ``benchmark_seed``. ``sample_tasks`` draws train tasks, ``sample_eval_tasks`` (used by
held-out evaluation) test tasks, both from the given rng only.

Envs report ``info["success"]`` (the skill's own success criterion); an episode succeeds
when any of its steps did, as the benchmark counts it. The envs are deterministic given
the task (the variant fixes every position), so an episode depends on the task and the
actions only. Needs the ``metaworld`` extra (``pip install 'metaray[metaworld]'``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from metaray.limits import short_repr
from metaray.tasks.base import Task
from metaray.tasks.batched import EnvList

SPLITS = ("train", "test")
VARIANTS = 50
"""Task variants per class and split (Meta-World's ``_N_GOALS``)."""
MAX_PATH_LENGTH = 500
"""Meta-World's episode length: its envs truncate there (presets use it as rollout.horizon)."""


def _metaworld() -> Any:
    try:
        import metaworld
    except ImportError as err:
        raise ValueError(f"the Meta-World families need the metaworld extra: pip install 'metaray[metaworld]' "
                         f"({err})") from None
    return metaworld


# The benchmark's tasks, built once per process for each (benchmark, seed, split): building
# resets every class 50 times (ML1 0.7-1.2 s a split, ML10's train split 4-8 s). Every family
# object in the process (the driver's probe, its TaskWorker, a service replica) shares them.
_TASKS: dict[tuple[Any, ...], list[Any]] = {}
_TASKS_LOCK = threading.Lock()


def _split_tasks(key: tuple[Any, ...], classes: OrderedDict, args_kwargs: dict[str, Any], seed: int) -> list[Any]:
    """Exactly the task list metaworld.ML1/ML10 build for one split (a test compares them),
    without building the other split too."""
    with _TASKS_LOCK:
        if key not in _TASKS:
            metaworld = _metaworld()
            _TASKS[key] = metaworld._make_tasks(classes, args_kwargs, metaworld._ML_OVERRIDE, seed=seed)
        return _TASKS[key]


class _SeededReset(gym.Wrapper):
    """Meta-World's ``reset`` ignores its seed; this one seeds the env (its spaces and
    np_random, which the benchmarks' tasks never draw from) as gymnasium asks.

    ``pending``, when set, gives the ``metaworld.Task`` to set before the first reset: an env
    made only for its spaces (the driver's probes) never builds the benchmark's task list."""

    pending: Callable[[], Any] | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        if self.pending is not None:
            self.env.unwrapped.set_task(self.pending())
            self.pending = None
        if seed is not None:
            self.env.unwrapped.seed(seed)
        return self.env.reset(seed=seed, options=options)


class _Pool:
    """Idle env instances per class, reused across tasks and iterations (``set_task`` per
    task, ``reset`` per episode): building a Meta-World env (~0.1 s, ~20 MiB) costs as
    much as ~300 env steps. The instances held, idle or in use, never exceed the most ever
    in use at once: an idle instance of another class is dropped before one is built past
    that, so switching classes (ML10) does not grow it."""

    def __init__(self) -> None:
        self.idle: dict[str, list[gym.Env]] = {}
        self.in_use = self.peak = 0
        self.built = 0  # instances constructed (tests and measurements read it)
        self.lock = threading.Lock()

    def acquire(self, name: str, cls: type, n: int) -> list[gym.Env]:
        with self.lock:
            mine = self.idle.setdefault(name, [])
            take = [mine.pop() for _ in range(min(n, len(mine)))]
            self.in_use += n
            self.peak = max(self.peak, self.in_use)
            missing = n - len(take)
            held = self.in_use - missing + sum(len(v) for v in self.idle.values())
            for other in [k for k in self.idle if k != name]:
                while self.idle[other] and held + missing > self.peak:
                    self.idle[other].pop().close()
                    held -= 1
            self.built += missing
        return take + [_SeededReset(cls()) for _ in range(missing)]

    def __getstate__(self) -> dict[str, Any]:  # a copied family starts with an empty pool
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    def release(self, name: str, envs: list[gym.Env]) -> None:
        with self.lock:
            self.in_use -= len(envs)
            self.idle.setdefault(name, []).extend(envs)

    def close(self) -> None:
        with self.lock:
            for envs in self.idle.values():
                for env in envs:
                    env.close()
            self.idle.clear()


class _PooledEnvList(EnvList):
    """An EnvList whose close() gives its envs back to the family's pool."""

    def __init__(self, envs: list[gym.Env], pool: _Pool, name: str) -> None:
        super().__init__(envs)
        self._pool, self._name = pool, name

    def close(self) -> None:
        envs, self.envs = self.envs, []
        if envs:
            self._pool.release(self._name, envs)


class _MetaWorld:
    """What ML1 and ML10 share: tasks as dicts, lazily built benchmark tasks, the env pool."""

    kind = ""
    task_bounds = {"variant": (0, VARIANTS - 1)}
    env_bytes = 24 << 20
    """Memory one env holds (measured 20.7 MiB, nearly all MuJoCo's model buffer), for estimate_memory."""

    def __init__(self, benchmark_seed: int) -> None:
        if isinstance(benchmark_seed, bool) or not isinstance(benchmark_seed, int) or not \
                0 <= benchmark_seed < 2**32 - 1:
            raise ValueError(f"benchmark_seed must be an integer in [0, 2^32 - 1) (got {short_repr(benchmark_seed)})")
        self.benchmark_seed = benchmark_seed
        _metaworld()  # a missing extra fails here, with the config's other errors
        self._pool = _Pool()

    @property
    def env_dict(self) -> Any:
        return _metaworld().env_dict

    # -- the benchmark's classes and tasks -------------------------------------------------------

    def classes(self, split: str) -> OrderedDict:
        """Class name -> env class of a split, in the benchmark's order."""
        raise NotImplementedError

    def _args_kwargs(self, split: str) -> dict[str, Any]:
        raise NotImplementedError

    def _seed(self, split: str) -> int:
        return self.benchmark_seed

    def benchmark_tasks(self, split: str) -> list[Any]:
        """The split's ``metaworld.Task`` list: VARIANTS per class, in class order."""
        classes = self.classes(split)
        key = (self.kind, tuple(classes), split, self.benchmark_seed)
        return _split_tasks(key, classes, self._args_kwargs(split), self._seed(split))

    # -- the family contract ---------------------------------------------------------------------

    def sample_tasks(self, n: int, rng: np.random.Generator) -> list[Task]:
        """``n`` train tasks: the classes in turn from a random one, each class's variants in a
        random order (so a meta-batch of 10 on ML10 holds each class once)."""
        return self._draw("train", n, rng)

    def sample_eval_tasks(self, n: int, rng: np.random.Generator) -> list[Task]:
        """``n`` held-out tasks, from the test split (ML1: test goals; ML10: the test classes)."""
        return self._draw("test", n, rng)

    def _draw(self, split: str, n: int, rng: np.random.Generator) -> list[Task]:
        names = list(self.classes(split))
        start = int(rng.integers(len(names)))
        orders = [rng.permutation(VARIANTS) for _ in names]
        picks = [0] * len(names)
        tasks = []
        for i in range(n):
            c = (start + i) % len(names)
            tasks.append({"env_name": names[c], "split": split, "variant": int(orders[c][picks[c] % VARIANTS])})
            picks[c] += 1
        return tasks

    def check_task(self, task: Task) -> None:
        split, name, variant = task.get("split"), task.get("env_name"), task.get("variant")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)} (got {short_repr(split)})")
        allowed = list(self.classes(split))
        if name not in allowed:
            raise ValueError(f"env_name {short_repr(name)} is not a {split} class of {self.kind}; "
                             f"allowed: {', '.join(allowed)}")
        if isinstance(variant, bool) or not isinstance(variant, int | np.integer) or not 0 <= variant < VARIANTS:
            raise ValueError(f"variant must be an integer in [0, {VARIANTS - 1}] (got {short_repr(variant)})")

    def _task(self, task: Task) -> Any:
        self.check_task(task)
        position = list(self.classes(task["split"])).index(task["env_name"])
        found = self.benchmark_tasks(task["split"])[position * VARIANTS + int(task["variant"])]
        assert found.env_name == task["env_name"], (found.env_name, task)
        return found

    def make_env(self, task: Task) -> gym.Env:
        """A fresh env for the task, which it takes on its first reset (see _SeededReset)."""
        self.check_task(task)
        env = _SeededReset(self.classes(task["split"])[task["env_name"]]())
        env.pending = lambda: self._task(task)
        return env

    def make_batched_env(self, task: Task, n: int, horizon: int) -> EnvList:
        """The task's ``n`` episodes on env instances from the family's pool (see _Pool);
        step for step what ``make_env`` gives (a test compares them)."""
        found = self._task(task)
        name = task["env_name"]
        envs = self._pool.acquire(name, self.classes(task["split"])[name], n)
        for env in envs:
            env.unwrapped.set_task(found)
        return _PooledEnvList(envs, self._pool, name)


class MetaWorldML1(_MetaWorld):
    kind = "ML1"

    def __init__(self, env_name: str = "reach-v3", benchmark_seed: int = 0) -> None:
        super().__init__(benchmark_seed)
        allowed = list(self.env_dict.ALL_V3_ENVIRONMENTS)
        if env_name not in allowed:
            raise ValueError(f"env_name {short_repr(env_name)} is not a Meta-World v3 env; "
                             f"allowed: {', '.join(allowed)}")
        self.env_name = env_name

    def classes(self, split: str) -> OrderedDict:
        return OrderedDict([(self.env_name, self.env_dict.ALL_V3_ENVIRONMENTS[self.env_name])])

    def _args_kwargs(self, split: str) -> dict[str, Any]:
        return {self.env_name: self.env_dict.ML1_ARGS_KWARGS[self.env_name]}

    def _seed(self, split: str) -> int:
        return self.benchmark_seed + (split == "test")  # what metaworld.ML1 does


class MetaWorldML10(_MetaWorld):
    kind = "ML10"

    def __init__(self, benchmark_seed: int = 0) -> None:
        super().__init__(benchmark_seed)

    def classes(self, split: str) -> OrderedDict:
        return self.env_dict.ML10_V3[split]

    def _args_kwargs(self, split: str) -> dict[str, Any]:
        return self.env_dict.ML10_ARGS_KWARGS[split]
