"""Fault-tolerant dispatch of per-task calls over restartable worker actors.

Workers die (preempted nodes, OOM kills, ``ray.kill``) and some never start (a cluster
short of CPUs, an autoscaler still adding nodes). Calls go only to workers that have
answered a ping. A task whose worker dies is run again, with the same task and the same
seed, on a live worker; a task slower than ``task_timeout_s`` is dispatched a second time
and the first answer wins. Each task index is answered exactly once, so the update is the
same as if nothing had happened.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError

try:  # raised while a restarting actor cannot take calls
    from ray.exceptions import ActorUnavailableError
except ImportError:  # pragma: no cover - older Ray
    ActorUnavailableError = RayActorError  # type: ignore[misc,assignment]

LOST = (RayActorError, ActorUnavailableError)
"""What a call raises when its worker died or is restarting."""


class NoLiveWorkerError(RuntimeError):
    pass


class WorkerStartError(RuntimeError):
    """A worker's constructor failed: retrying cannot help (a family that does not import, say)."""


def _raise_if_init_failed(err: Exception) -> None:
    if getattr(err, "actor_init_failed", False):
        raise WorkerStartError(f"a worker actor failed to start: {err}") from None


@dataclass
class FaultCounters:
    worker_failures: int = 0
    worker_restarts: int = 0
    task_retries: int = 0
    task_timeouts: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Flight:
    index: int
    worker: int
    started: float


@dataclass
class WorkerPool:
    workers: list[ray.actor.ActorHandle]
    task_timeout_s: float | None = None
    no_worker_timeout_s: float = 300.0
    depth: int = 2  # calls queued per worker, so a worker never idles waiting for the next
    counters: FaultCounters = field(default_factory=FaultCounters)
    # Ray's wait and get, injectable so that unit tests can drive the dispatch logic without Ray.
    wait: Callable[..., tuple[list, list]] = field(default=ray.wait, repr=False, compare=False)
    get: Callable[[ray.ObjectRef], Any] = field(default=ray.get, repr=False, compare=False)
    _pings: dict[int, ray.ObjectRef | None] = field(default_factory=dict)  # not (yet, again) ready
    _retry_at: dict[int, float] = field(default_factory=dict)  # when to ping a restarting worker again
    _failed: set[int] = field(default_factory=set)  # answered a ping only before a failure

    def __post_init__(self) -> None:
        self._pings = {w: actor.ping.remote() for w, actor in enumerate(self.workers)}

    def settle(self, timeout: float) -> None:
        """Wait up to ``timeout`` for every worker not yet ready to answer its ping."""
        deadline = time.monotonic() + timeout
        while self._pings and time.monotonic() < deadline:
            self._poll_pings(timeout=min(1.0, max(0.0, deadline - time.monotonic())))

    def ready(self) -> list[int]:
        return [w for w in range(len(self.workers)) if w not in self._pings]

    def mark_down(self, w: int) -> None:
        """Stop dispatching to ``w`` until it answers a ping again (Ray restarts it)."""
        if w not in self._pings:
            self.counters.worker_failures += 1
            self._failed.add(w)
            self._pings[w] = self.workers[w].ping.remote()

    def _poll_pings(self, timeout: float = 0) -> None:
        now = time.monotonic()
        for w, ref in self._pings.items():
            if ref is None and now >= self._retry_at.get(w, 0.0):
                self._pings[w] = self.workers[w].ping.remote()
        outstanding = [r for r in self._pings.values() if r is not None]
        if not outstanding:  # nothing to wait on (restarting workers, or none at all): don't spin
            if timeout > 0:
                time.sleep(min(timeout, 0.2))
            return
        ready, _ = self.wait(outstanding, num_returns=len(outstanding), timeout=timeout)
        for w, ref in list(self._pings.items()):
            if ref is None or ref not in ready:
                continue
            try:
                self.get(ref)
            except LOST as err:
                _raise_if_init_failed(err)
                self._pings[w], self._retry_at[w] = None, time.monotonic() + 0.5  # restarting: ask later
                continue
            del self._pings[w]
            if w in self._failed:
                self._failed.discard(w)
                self.counters.worker_restarts += 1

    def map(self, call: Callable[[ray.actor.ActorHandle, int], ray.ObjectRef], indices: list[int],
            on_result: Callable[[int, int, Any], None]) -> None:
        """Run ``call(worker, index)`` once per index; ``on_result(index, worker, value)`` in arrival order.

        Application errors (a bug, a failing env) propagate; losing a worker does not.
        """
        queue = deque(indices)
        done: set[int] = set()
        flights: dict[ray.ObjectRef, _Flight] = {}
        load = [0] * len(self.workers)
        idle_since = time.monotonic()
        while len(done) < len(indices):
            self._poll_pings()
            ready = self.ready()
            while queue and ready:  # each call to the least-loaded ready worker, up to depth
                w = min(ready, key=lambda w: load[w])
                if load[w] >= self.depth:
                    break
                index = queue.popleft()
                if index not in done:
                    flights[call(self.workers[w], index)] = _Flight(index, w, time.monotonic())
                    load[w] += 1
            if not flights:  # nobody to run on yet: wait for a worker to come (back) up
                if time.monotonic() - idle_since > self.no_worker_timeout_s:
                    raise NoLiveWorkerError(f"no worker answered for {self.no_worker_timeout_s:.0f}s")
                self._poll_pings(timeout=1.0)
                continue
            idle_since = time.monotonic()
            ready, _ = self.wait(list(flights), num_returns=1, timeout=1.0)
            for ref in ready:
                flight = flights.pop(ref)
                load[flight.worker] -= 1
                try:
                    value = self.get(ref)
                except LOST as err:
                    _raise_if_init_failed(err)
                    self.mark_down(flight.worker)
                    if flight.index not in done:
                        self.counters.task_retries += 1
                        queue.appendleft(flight.index)
                    continue
                if flight.index not in done:  # a straggler's twin may have answered first
                    done.add(flight.index)
                    on_result(flight.index, flight.worker, value)
            self._redispatch_stragglers(flights, queue, done)

    def _redispatch_stragglers(self, flights: dict[ray.ObjectRef, _Flight], queue: deque, done: set[int]) -> None:
        if self.task_timeout_s is None:
            return
        now = time.monotonic()
        for flight in flights.values():
            if flight.index not in done and now - flight.started > self.task_timeout_s:
                flight.started = float("inf")  # one twin per straggler
                self.counters.task_timeouts += 1
                queue.append(flight.index)
