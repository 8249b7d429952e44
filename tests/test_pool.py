"""Unit tests of ``WorkerPool``'s dispatch logic, with stand-in actors and a simulated clock.

This is the one place in the suite where fakes are the right tool: these tests check the
pool's bookkeeping (readiness, re-runs, straggler twins, exactly-once answers, depth,
timeouts), not Ray. The real pool over real Ray actors is tested end to end in
``test_reliability.py``; here nothing starts Ray.

The stand-ins: ``FakeActor`` has ``.ping.remote()`` and ``.run.remote(index)`` returning
``FakeRef``s whose outcome (a value, a LOST ``RayActorError``, an application error, or never)
and completion time are decided from the actor's script when the call is made. An actor runs
its calls one after another, like a Ray actor with one thread. ``FakeRay.wait`` / ``FakeRay.get``
are injected into the pool and ``FakeRay`` replaces the pool module's ``time``, so ``wait``
and ``sleep`` advance simulated time instead of real time: each test runs in milliseconds.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from metaray.runtime import pool as pool_module
from metaray.runtime.pool import NoLiveWorkerError, WorkerPool, WorkerStartError

pytestmark = pytest.mark.timeout(60)

NEVER = math.inf
MAX_SIM_TIME = 10_000.0  # a pool that loops forever fails the test instead of hanging it


@dataclass(eq=False)  # identity hashing, like object refs used as dict keys
class FakeRef:
    sim: FakeRay
    actor: FakeActor | None
    kind: str  # "ping" or "run"
    index: int | None
    submitted: float
    ready_at: float  # NEVER: the call never completes
    value: Any = None
    error: BaseException | None = None
    collected: bool = False

    def __repr__(self) -> str:
        return f"FakeRef({self.kind} {self.index} on {self.actor and self.actor.name} @{self.ready_at})"


@dataclass
class FakeRay:
    """A simulated clock plus stand-ins for ``ray.wait`` / ``ray.get`` over ``FakeRef``s."""

    now: float = 0.0
    refs: list[FakeRef] = field(default_factory=list)
    attempts: dict[int, int] = field(default_factory=dict)  # run calls made so far, per index
    calls: int = 0

    # -- the pool's ``time`` module
    def monotonic(self) -> float:
        self._tick()
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self._advance(self.now + seconds)

    def _advance(self, t: float) -> None:
        self._tick()
        assert t < MAX_SIM_TIME, "the pool never finished (simulation ran away)"
        self.now = max(self.now, t)

    def _tick(self) -> None:
        self.calls += 1
        assert self.calls < 100_000, "the pool spins without simulated time passing"

    # -- ray.wait / ray.get
    def wait(self, refs: list[FakeRef], num_returns: int = 1, timeout: float | None = None):
        assert timeout is not None, "the pool must never block without a timeout"
        assert len(set(map(id, refs))) == len(refs), "ray.wait refuses duplicate refs"
        assert 1 <= num_returns <= len(refs)
        # advance to the time the num_returns-th ref completes, or to the timeout
        times = sorted(r.ready_at for r in refs)
        self._advance(min(times[num_returns - 1], self.now + timeout))
        ready = [r for r in refs if r.ready_at <= self.now][:num_returns]  # input order, as Ray
        return ready, [r for r in refs if r not in ready]

    def get(self, ref: FakeRef) -> Any:
        assert ref.ready_at <= self.now, f"get on an unfinished {ref} would block"
        if ref.kind == "run" and not ref.collected:
            ref.actor.outstanding -= 1
        ref.collected = True
        if ref.error is not None:
            raise ref.error
        return ref.value

    def runs(self, index: int | None = None) -> list[FakeRef]:
        return [r for r in self.refs if r.kind == "run" and (index is None or r.index == index)]


def lost(msg: str = "the actor died") -> RayActorError:
    return RayActorError(error_msg=msg)


@dataclass
class FakeActor:
    """A worker actor's script: when it answers pings, when it dies and comes back, how long calls take.

    ``deaths`` are (die_at, restart_at) intervals in which the actor is down; calls running or queued
    at ``die_at`` fail with a LOST error then, pings while down fail at once with
    ``ActorUnavailableError`` (as for a restarting actor), and ``restart_at=NEVER`` means gone for good.
    """

    sim: FakeRay
    name: int
    born_at: float = 0.0  # first ping answered then; NEVER: it never becomes ready
    init_error: bool = False  # its constructor failed: every ping raises actor_init_failed
    deaths: list[tuple[float, float]] = field(default_factory=list)
    duration: Callable[[int, int], float] = lambda index, attempt: 1.0  # NEVER: the call never returns
    app_errors: dict[int, BaseException] = field(default_factory=dict)
    busy_until: float = 0.0
    outstanding: int = 0  # run calls submitted and not yet collected by the pool
    max_outstanding: int = 0

    def __post_init__(self) -> None:
        self.ping = _Method(self._ping)
        self.run = _Method(self._run)

    def _down(self, t: float) -> tuple[float, float] | None:
        return next(((d, r) for d, r in self.deaths if d <= t < r), None)

    def _next_death(self, t: float) -> float:
        return min((d for d, _ in self.deaths if d >= t), default=NEVER)

    def _ref(self, kind: str, index: int | None, ready_at: float, value: Any = None, error=None) -> FakeRef:
        ref = FakeRef(self.sim, self, kind, index, self.sim.now, ready_at, value, error)
        self.sim.refs.append(ref)
        return ref

    def _ping(self) -> FakeRef:
        now = self.sim.now
        if self.init_error:
            err = RayActorError(error_msg="__init__ raised ImportError", actor_init_failed=True)
            return self._ref("ping", None, max(now, self.born_at), error=err)
        if self._down(now):
            return self._ref("ping", None, now, error=ActorUnavailableError("restarting", None))
        return self._ref("ping", None, max(now, self.born_at), value={"worker": self.name})

    def _run(self, index: int) -> FakeRef:
        now = self.sim.now
        self.outstanding += 1
        self.max_outstanding = max(self.max_outstanding, self.outstanding)
        attempt = self.sim.attempts.get(index, 0)
        self.sim.attempts[index] = attempt + 1
        if self._down(now):  # submitted to a dead actor
            return self._ref("run", index, now, error=lost())
        start = max(now, self.born_at, self.busy_until)  # an actor not yet started queues its calls
        end = start + self.duration(index, attempt)
        death = self._next_death(now)
        if end > death:  # still running or queued when the actor dies
            self.busy_until = death
            return self._ref("run", index, death, error=lost())
        self.busy_until = end
        if index in self.app_errors:
            return self._ref("run", index, end, error=self.app_errors[index])
        return self._ref("run", index, end, value=(index, self.name, attempt))


@dataclass
class _Method:
    fn: Callable[..., FakeRef]

    def remote(self, *args: Any) -> FakeRef:
        return self.fn(*args)


@pytest.fixture
def sim(monkeypatch) -> FakeRay:
    fake = FakeRay()
    monkeypatch.setattr(pool_module, "time", fake)  # the pool's monotonic / sleep run on simulated time
    return fake


def make_pool(sim: FakeRay, actors: list[FakeActor], **kwargs: Any) -> WorkerPool:
    return WorkerPool(actors, wait=sim.wait, get=sim.get, **kwargs)


def run_map(pool: WorkerPool, indices: list[int]) -> list[tuple[int, int, Any]]:
    results: list[tuple[int, int, Any]] = []
    pool.map(lambda actor, i: actor.run.remote(i), indices, lambda i, w, v: results.append((i, w, v)))
    return results


def check_answered_once(results: list[tuple[int, int, Any]], indices: list[int]) -> dict[int, tuple[int, Any]]:
    """Each index answered exactly once, by the worker that computed the value that was routed."""
    assert sorted(i for i, _, _ in results) == sorted(indices)
    for index, worker, (v_index, v_worker, _attempt) in results:
        assert (v_index, v_worker) == (index, worker)
    return {i: (w, v) for i, w, v in results}


def check_first_answer_won(sim: FakeRay, results: list[tuple[int, int, Any]]) -> None:
    """The value routed for each index is its earliest successful answer."""
    for index, _, value in results:
        answers = [r for r in sim.runs(index) if r.error is None and r.collected]
        assert value == min(answers, key=lambda r: r.ready_at).value


def test_production_defaults_are_rays_wait_and_get():
    pool = WorkerPool([])
    assert pool.wait is ray.wait and pool.get is ray.get


@pytest.mark.parametrize("workers", [1, 3])
def test_every_index_answered_exactly_once_and_routed_to_on_result(sim, workers):
    durations = itertools.cycle([0.3, 1.7, 0.9, 2.4, 0.1])
    table = {i: next(durations) for i in range(40)}
    actors = [FakeActor(sim, w, duration=lambda i, a: table[i]) for w in range(workers)]
    pool = make_pool(sim, actors)
    indices = list(range(40))
    results = run_map(pool, indices)

    check_answered_once(results, indices)
    assert len(sim.runs()) == 40  # nothing ran twice
    assert {w for _, w, _ in results} == set(range(workers))  # every worker got work
    assert pool.counters.as_dict() == {"worker_failures": 0, "worker_restarts": 0, "task_retries": 0,
                                       "task_timeouts": 0}
    # results arrive in completion order
    arrival = [next(r.ready_at for r in sim.runs(i)) for i, _, _ in results]
    assert arrival == sorted(arrival)


def test_indices_subset_and_empty_map(sim):
    pool = make_pool(sim, [FakeActor(sim, 0), FakeActor(sim, 1)])
    assert run_map(pool, []) == []
    check_answered_once(run_map(pool, [7, 3, 11]), [7, 3, 11])


def test_dead_worker_tasks_rerun_elsewhere_and_it_rejoins_after_restart(sim):
    actors = [FakeActor(sim, 0, deaths=[(2.5, 6.0)]), FakeActor(sim, 1), FakeActor(sim, 2)]
    pool = make_pool(sim, actors, depth=2)
    indices = list(range(30))
    results = run_map(pool, indices)
    by_index = check_answered_once(results, indices)

    lost_runs = [r for r in sim.runs() if isinstance(r.error, RayActorError)]
    assert lost_runs and {r.actor.name for r in lost_runs} == {0}
    assert all(r.ready_at == 2.5 for r in lost_runs)  # all lost when worker 0 died
    assert len(lost_runs) == 2  # the depth=2 calls in flight on worker 0
    for r in lost_runs:  # re-run, with its index, on a live worker
        worker, (_, _, attempt) = by_index[r.index]
        assert worker != 0 and attempt == 1
    # nothing was sent to worker 0 while it was down, and it took work again once back
    assert not [r for r in sim.runs() if r.actor.name == 0 and 2.5 <= r.submitted < 6.0]
    assert [r for r in sim.runs() if r.actor.name == 0 and r.submitted >= 6.0 and r.error is None]
    assert any(w == 0 and sim.runs(i)[-1].submitted >= 6.0 for i, w, _ in results)
    # pings while it was restarting failed (retried later), and one after the restart succeeded
    pings = [r for r in sim.refs if r.kind == "ping" and r.actor.name == 0]
    assert any(isinstance(r.error, ActorUnavailableError) for r in pings)
    assert pings[-1].error is None and pings[-1].submitted >= 6.0
    assert pool.counters.worker_failures == 1
    assert pool.counters.task_retries == 2
    assert pool.counters.worker_restarts == 1
    assert pool.counters.task_timeouts == 0
    assert pool.ready() == [0, 1, 2]


def test_worker_restart_counted_by_settle_after_map(sim):
    actors = [FakeActor(sim, 0, deaths=[(1.5, 50.0)]), FakeActor(sim, 1)]
    pool = make_pool(sim, actors, depth=1)
    check_answered_once(run_map(pool, list(range(6))), list(range(6)))
    assert pool.counters.worker_failures == 1 and pool.counters.task_retries == 1
    assert pool.counters.worker_restarts == 0 and pool.ready() == [1]  # the map ended before it came back
    pool.settle(timeout=10.0)
    assert pool.ready() == [1]  # still down
    pool.settle(timeout=100.0)
    assert pool.ready() == [0, 1] and pool.counters.worker_restarts == 1


def test_worker_that_never_becomes_ready_gets_nothing(sim):
    actors = [FakeActor(sim, 0), FakeActor(sim, 1, born_at=NEVER), FakeActor(sim, 2, born_at=3.0)]
    pool = make_pool(sim, actors)
    indices = list(range(25))
    results = run_map(pool, indices)
    check_answered_once(results, indices)
    assert not [r for r in sim.runs() if r.actor.name == 1]
    assert {w for _, w, _ in results} == {0, 2}
    assert min(r.submitted for r in sim.runs() if r.actor.name == 2) >= 3.0  # not before its first ping
    assert pool.ready() == [0, 2]
    assert pool.counters.worker_failures == 0


def test_settle_waits_for_pings_up_to_its_timeout(sim):
    actors = [FakeActor(sim, 0, born_at=2.0), FakeActor(sim, 1, born_at=7.0), FakeActor(sim, 2, born_at=NEVER)]
    pool = make_pool(sim, actors)
    assert pool.ready() == []
    pool.settle(timeout=5.0)
    assert pool.ready() == [0] and sim.now == pytest.approx(5.0)
    pool.settle(timeout=5.0)
    assert pool.ready() == [0, 1]


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_never_more_than_depth_calls_in_flight_per_worker(sim, depth):
    durations = itertools.cycle([0.5, 3.0, 0.2, 1.1, 2.2, 0.05])
    table = {i: next(durations) for i in range(60)}
    actors = [FakeActor(sim, w, duration=lambda i, a: table[i]) for w in range(3)]
    pool = make_pool(sim, actors, depth=depth)
    check_answered_once(run_map(pool, list(range(60))), list(range(60)))
    assert [a.max_outstanding for a in actors] == [depth] * 3  # the limit is reached and never passed
    assert all(a.outstanding == 0 for a in actors)


def test_dispatch_goes_to_the_least_loaded_worker(sim):
    # worker 0 is slow: with depth 2 it holds 2 calls for a long time while worker 1 takes the rest
    actors = [FakeActor(sim, 0, duration=lambda i, a: 100.0), FakeActor(sim, 1, duration=lambda i, a: 1.0)]
    pool = make_pool(sim, actors, depth=2)
    results = run_map(pool, list(range(10)))
    check_answered_once(results, list(range(10)))
    assert len([r for r in sim.runs() if r.actor.name == 0]) == 2
    assert sorted(i for i, w, _ in results if w == 0) == [0, 2]  # first dispatch alternates by load


@pytest.mark.parametrize("late", [7.5, 9.0, NEVER], ids=["original-wins", "twin-wins", "original-never-answers"])
def test_straggler_gets_one_twin_and_the_first_answer_wins(sim, late):
    # Index 0's first attempt takes `late` seconds, past the 5s task timeout; its twin, dispatched at
    # the first check after 5s (t=6) to an idle worker, takes 2.5s, so the straggler is seen again
    # (t=7, t=8) while both are out. Index 11, dispatched at t=5, takes 4.5s and keeps the map running
    # until t=9.5, so whichever answer comes second still arrives during the map, and must be dropped.
    def duration(index: int, attempt: int) -> float:
        if index == 0:
            return late if attempt == 0 else 2.5
        return 4.5 if index == 11 else 1.0

    actors = [FakeActor(sim, w, duration=duration) for w in range(3)]
    pool = make_pool(sim, actors, task_timeout_s=5.0, depth=1)
    indices = list(range(12))
    results = run_map(pool, indices)
    by_index = check_answered_once(results, indices)

    original, twin = sim.runs(0)  # exactly one twin, however long the original stays slow
    assert original.actor.name == 0 and twin.actor.name != 0
    assert twin.submitted == 6.0 and twin.ready_at == 8.5
    first, second = sorted([original, twin], key=lambda r: r.ready_at)
    assert by_index[0] == (first.actor.name, first.value)  # the first answer was routed ...
    if second.ready_at != NEVER:
        assert second.collected and second.ready_at < sim.now  # ... the second arrived during the map, ignored
    check_first_answer_won(sim, results)
    assert len(sim.runs()) == 13
    assert pool.counters.task_timeouts == 1
    assert pool.counters.task_retries == 0 and pool.counters.worker_failures == 0


def test_twin_queued_behind_pending_work_is_dropped_if_the_original_answers_first(sim):
    # Index 0 takes 7s on worker 0; at t=6 its twin joins the back of the queue, behind work worker 1
    # has not reached yet. The original answers at t=7, before the twin's turn: the twin is never sent.
    actors = [FakeActor(sim, 0, duration=lambda i, a: 7.0 if i == 0 else 1.0), FakeActor(sim, 1)]
    pool = make_pool(sim, actors, task_timeout_s=5.0, depth=1)
    indices = list(range(20))
    by_index = check_answered_once(run_map(pool, indices), indices)
    assert len(sim.runs(0)) == 1 and by_index[0][0] == 0
    assert len(sim.runs()) == 20
    assert pool.counters.task_timeouts == 1


def test_no_task_timeout_means_no_twins(sim):
    actors = [FakeActor(sim, w, duration=lambda i, a: 50.0 if i == 0 else 1.0) for w in range(2)]
    pool = make_pool(sim, actors)  # task_timeout_s=None
    check_answered_once(run_map(pool, list(range(8))), list(range(8)))
    assert len(sim.runs(0)) == 1 and pool.counters.task_timeouts == 0


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_no_live_worker_error_when_none_is_ever_ready(sim, workers):
    pool = make_pool(sim, [FakeActor(sim, w, born_at=NEVER) for w in range(workers)], no_worker_timeout_s=5.0)
    with pytest.raises(NoLiveWorkerError):
        run_map(pool, [0, 1, 2])
    assert 5.0 < sim.now < 8.0
    assert not sim.runs()


def test_no_live_worker_error_when_every_worker_dies_for_good(sim):
    actors = [FakeActor(sim, w, deaths=[(3.5, NEVER)]) for w in range(2)]
    pool = make_pool(sim, actors, no_worker_timeout_s=10.0)
    results: list = []
    with pytest.raises(NoLiveWorkerError):
        pool.map(lambda a, i: a.run.remote(i), list(range(20)), lambda i, w, v: results.append(i))
    assert sorted(results) == [0, 1, 2, 3, 4, 5]  # answered before the deaths, and only once
    assert 13.5 < sim.now < 16.0  # gave up no_worker_timeout_s after the last call was lost
    assert pool.counters.worker_failures == 2


def test_a_worker_back_before_the_no_worker_timeout_finishes_the_map(sim):
    actors = [FakeActor(sim, 0, deaths=[(1.5, 8.0)])]
    pool = make_pool(sim, actors, no_worker_timeout_s=10.0)
    check_answered_once(run_map(pool, list(range(5))), list(range(5)))
    assert pool.counters.worker_restarts == 1 and pool.counters.worker_failures == 1


@pytest.mark.parametrize("where", ["settle", "map"])
def test_worker_start_error_when_a_constructor_failed(sim, where):
    actors = [FakeActor(sim, 0), FakeActor(sim, 1, init_error=True, born_at=2.0)]
    pool = make_pool(sim, actors)
    with pytest.raises(WorkerStartError, match="failed to start"):
        if where == "settle":
            pool.settle(timeout=5.0)
        else:
            run_map(pool, list(range(50)))


def test_worker_start_error_from_a_task_call(sim):
    actor = FakeActor(sim, 0)
    pool = make_pool(sim, [actor])

    def call(a: FakeActor, i: int) -> FakeRef:
        ref = a.run.remote(i)
        ref.error = RayActorError(error_msg="init failed", actor_init_failed=True)
        return ref

    with pytest.raises(WorkerStartError):
        pool.map(call, [0], lambda i, w, v: None)


def test_application_errors_propagate_without_retry(sim):
    actors = [FakeActor(sim, w, app_errors={3: ValueError("the env exploded")}) for w in range(2)]
    pool = make_pool(sim, actors)
    with pytest.raises(ValueError, match="the env exploded"):
        run_map(pool, list(range(10)))
    assert len(sim.runs(3)) == 1
    assert pool.counters.as_dict() == {"worker_failures": 0, "worker_restarts": 0, "task_retries": 0,
                                       "task_timeouts": 0}


def test_on_result_errors_propagate(sim):
    pool = make_pool(sim, [FakeActor(sim, 0)])

    def on_result(i: int, w: int, v: Any) -> None:
        raise KeyError(i)

    with pytest.raises(KeyError):
        pool.map(lambda a, i: a.run.remote(i), [0, 1], on_result)
