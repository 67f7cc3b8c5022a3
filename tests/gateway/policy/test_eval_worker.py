"""Policy evaluation off the event loop: the worker pool (deadline, abandoned workers, bounded
threads and queue) and the embedded engine on it (cheap decisions pass a hostile one, a slow
evaluation becomes policy_error, the pool recovers, reloads stay correct, a shared bundle)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.policy.embedded import EmbeddedEngine
from gateway.policy.errors import PolicyBusyError, PolicyError, PolicyTimeoutError
from gateway.policy.eval_worker import EvalPool
from gateway.policy.rego import CompiledPolicy, PendingEval, load_sources, new_interpreter

pytestmark = pytest.mark.timeout(120)

WAIT = 60.0  # bound of every wait on a worker thread (seconds)
LONG = 30.0  # a budget that never fires in these tests

# One input is expensive on purpose: a comprehension over numbers.range(1, input.n) (~4 us per
# element here: 150000 elements are ~0.5 s of CPU), the cheap one is a comparison.
POLICY = """package mcp.authz
import rego.v1
default decision := {"allow": false, "reason": "default_deny"}
decision := {"allow": true, "reason": "%s"} if {
	input.kind == "cheap"
	input.i >= 0 # read, so that each i is its own cache key
}
decision := {"allow": true, "reason": sprintf("%s_%%d", [count(above)])} if input.kind == "slow"
above := [x | some x in numbers.range(1, input.n); x > 3]
"""
SLOW_N = 150_000
SLOW = {"kind": "slow", "n": SLOW_N}


def cheap(i: int = 0) -> dict[str, Any]:
    return {"kind": "cheap", "i": i}  # each i a distinct cache key (a miss)


async def until(check: Callable[[], bool], what: str) -> None:
    """Poll a condition that a worker thread brings about, within WAIT seconds."""
    async with asyncio.timeout(WAIT):
        while not check():
            await asyncio.sleep(0.005)
    assert check(), what


# ------------------------------------------------------------------------------ the pool

class Gate:
    """A job that blocks its worker until released: a stand-in for an evaluation that runs long."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, state: object) -> str:
        self.started.set()
        self.release.wait(WAIT)
        return "slow done"


def quick(state: object) -> str:
    return "quick"


def make_pool(workers: int = 1, max_abandoned: int = 1, max_waiting: int = 8) -> EvalPool[object]:
    return EvalPool(object, workers=workers, max_abandoned=max_abandoned, max_waiting=max_waiting)


async def test_a_quick_job_finishes_while_a_long_one_runs() -> None:
    """With two workers, a quick job is answered while the other worker is still blocked."""
    pool = make_pool(workers=2)
    gate = Gate()
    slow = asyncio.create_task(pool.run(gate, LONG))
    await until(gate.started.is_set, "the long job started")
    assert await pool.run(quick, LONG) == "quick"
    assert not slow.done()
    gate.release.set()
    assert await slow == "slow done"
    pool.close()


async def test_deadline_abandons_and_replaces_the_worker() -> None:
    """A job past its budget raises PolicyTimeoutError; a fresh worker serves the next caller."""
    pool = make_pool(workers=1, max_abandoned=1)
    gate = Gate()
    with pytest.raises(PolicyTimeoutError):
        await pool.run(gate, 0.01)
    assert gate.started.is_set() and not gate.release.is_set()  # the worker still runs it
    assert (pool.live, pool.abandoned) == (0, 1)
    assert await pool.run(quick, LONG) == "quick"  # a replacement, while the old one is stuck
    assert (pool.live, pool.abandoned) == (1, 1)
    gate.release.set()
    await until(lambda: pool.abandoned == 0, "the abandoned worker ended")
    assert pool.live == 1  # it left: the replacement already holds the only place
    assert await pool.run(quick, LONG) == "quick"
    pool.close()


async def test_abandoned_workers_are_bounded_and_busy_is_refused_at_once() -> None:
    """Past max_abandoned no new thread starts: callers get PolicyBusyError, not an endless queue."""
    pool = make_pool(workers=1, max_abandoned=1, max_waiting=0)
    gates = [Gate(), Gate()]
    for gate in gates:
        with pytest.raises(PolicyTimeoutError):
            await pool.run(gate, 0.01)
    assert (pool.live, pool.abandoned) == (0, 2)  # two threads: workers + max_abandoned
    discarded: list[bool] = []
    with pytest.raises(PolicyBusyError):
        await pool.run(quick, LONG, discard=lambda: discarded.append(True))
    assert discarded == [True] and pool.refused == 1
    gates[0].release.set()  # the first stuck one ends and rejoins: a place is free
    await until(lambda: pool.live == 1, "a finished worker rejoined")
    assert await pool.run(quick, LONG) == "quick"
    gates[1].release.set()
    await until(lambda: pool.abandoned == 0, "the last abandoned worker ended")
    assert pool.live == 1
    pool.close()


async def test_waiting_callers_share_the_budget() -> None:
    """A caller queued behind a busy worker gets PolicyTimeoutError when the budget is spent."""
    pool = make_pool(workers=1, max_abandoned=0, max_waiting=4)
    gate = Gate()
    slow = asyncio.create_task(pool.run(gate, LONG))
    await until(gate.started.is_set, "the long job started")
    discarded: list[bool] = []
    with pytest.raises(PolicyTimeoutError):
        await pool.run(quick, 0.01, discard=lambda: discarded.append(True))
    assert discarded == [True]  # never handed to a worker
    queued = asyncio.create_task(pool.run(quick, LONG))
    await until(lambda: len(pool._waiters) == 1, "the second caller queued")
    gate.release.set()
    assert await slow == "slow done" and await queued == "quick"
    pool.close()


async def test_a_cancelled_caller_frees_its_place() -> None:
    """A caller cancelled while queued discards its job; one cancelled while running leaves the
    worker to finish and return to the pool."""
    pool = make_pool(workers=1, max_abandoned=0, max_waiting=4)
    gate = Gate()
    running = asyncio.create_task(pool.run(gate, LONG))
    await until(gate.started.is_set, "the long job started")
    discarded: list[bool] = []
    queued = asyncio.create_task(pool.run(quick, LONG, discard=lambda: discarded.append(True)))
    await until(lambda: len(pool._waiters) == 1, "the second caller queued")
    queued.cancel()
    running.cancel()
    for task in (queued, running):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert discarded == [True]
    gate.release.set()
    await until(lambda: pool.idle == 1, "the worker came back")
    assert await pool.run(quick, LONG) == "quick" and pool.live == 1
    pool.close()


async def test_worker_errors_reach_the_caller_and_the_worker_survives() -> None:
    """An exception raised by a job is raised to its caller; the same worker serves the next job."""
    pool = make_pool()

    def fails(state: object) -> str:
        raise PolicyError("boom")

    with pytest.raises(PolicyError, match="boom"):
        await pool.run(fails, LONG)
    assert await pool.run(quick, LONG) == "quick" and pool.live == 1
    pool.close()
    with pytest.raises(PolicyError):
        await pool.run(quick, LONG)


async def test_a_refused_thread_is_a_busy_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the system refuses a new thread the caller gets PolicyBusyError and no place is lost."""
    class NoThread(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    pool = make_pool(workers=1)
    monkeypatch.setattr(threading, "Thread", NoThread)
    with pytest.raises(PolicyBusyError):
        await pool.run(quick, LONG)
    assert pool.live == 0
    monkeypatch.undo()
    assert await pool.run(quick, LONG) == "quick" and pool.live == 1
    pool.close()


@pytest.mark.parametrize("kwargs", [{"workers": 0}, {"max_abandoned": -1}, {"max_waiting": -1}])
def test_pool_bounds_are_checked(kwargs: dict[str, int]) -> None:
    """A pool without a worker or with negative bounds is refused."""
    with pytest.raises(ValueError):
        make_pool(**kwargs)


# ------------------------------------------------------------------------------ the engine

def write_policy(folder: Path, tag: str = "v1") -> None:
    (folder / "authz.rego").write_text(POLICY % (tag, tag), encoding="utf-8")


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[EmbeddedEngine]:
    write_policy(tmp_path)
    eng = EmbeddedEngine(tmp_path, "mcp/authz/decision", reload_interval=0, cache_size=0,
                         eval_timeout_ms=int(LONG * 1000), eval_workers=2)
    await eng.start()
    yield eng
    await eng.close()


async def test_cheap_decision_completes_while_a_hostile_one_runs(engine: EmbeddedEngine) -> None:
    """A cheap miss is decided while an expensive evaluation of another caller is still running."""
    slow = asyncio.create_task(engine.decide(SLOW))
    await until(lambda: engine.pool.live == 1 and engine.pool.idle == 0, "the slow one is on a worker")
    for i in range(3):
        d = await engine.decide(cheap(i))
        assert d.allow and d.reason == "v1"
        assert not slow.done()
    d = await slow
    assert d.allow and d.reason == f"v1_{SLOW_N - 3}"


async def test_the_event_loop_stays_free_during_an_evaluation(engine: EmbeddedEngine) -> None:
    """Loop callbacks run while a worker evaluates (inline evaluation would run them only after)."""
    ticks = 0
    slow = asyncio.create_task(engine.decide(SLOW))
    while not slow.done() and ticks < 5:
        await asyncio.sleep(0)
        ticks += 1
    assert ticks == 5 and not slow.done()
    assert (await slow).allow


async def test_deadline_turns_a_slow_evaluation_into_policy_error(tmp_path: Path) -> None:
    """Past policy.eval_timeout_ms the decision is a 503 policy_error; cheap ones still pass."""
    write_policy(tmp_path)
    eng = EmbeddedEngine(tmp_path, "mcp/authz/decision", reload_interval=0, cache_size=0,
                         eval_timeout_ms=20, eval_workers=1, eval_max_abandoned=1, eval_max_waiting=0)
    await eng.start()
    try:
        d = await eng.decide(SLOW)
        assert not d.allow and d.error_code == "policy_error" and d.http_status == 503
        assert (eng.pool.live, eng.pool.abandoned) == (0, 1)
        assert (await eng.decide(cheap())).allow  # a replacement worker
        d = await eng.decide({**SLOW, "n": SLOW_N + 1})
        assert d.error_code == "policy_error"
        # Both places taken by stuck workers: refused at once, not queued.
        refused = eng.pool.refused
        d = await eng.decide(cheap(1))
        assert d.error_code == "policy_error" and eng.pool.refused == refused + 1
        assert eng.pool.live + eng.pool.abandoned <= 2
        await until(lambda: eng.pool.abandoned == 0, "the stuck evaluations ended")
        d = await eng.decide(cheap(2))
        assert d.allow and d.reason == "v1"  # recovered
    finally:
        await eng.close()


async def test_cache_hits_skip_the_workers(tmp_path: Path) -> None:
    """A repeated decision is answered from the cache on the loop, while every worker is busy."""
    write_policy(tmp_path)
    eng = EmbeddedEngine(tmp_path, "mcp/authz/decision", reload_interval=0,
                         eval_timeout_ms=int(LONG * 1000), eval_workers=1, eval_max_abandoned=0,
                         eval_max_waiting=0)
    await eng.start()
    try:
        assert (await eng.decide(cheap())).allow  # a miss, now cached
        slow = asyncio.create_task(eng.decide(SLOW))
        await until(lambda: eng.pool.idle == 0, "the slow one holds the only worker")
        assert (await eng.decide(cheap())).allow  # a hit: no worker needed
        assert (await eng.decide(cheap(1))).error_code == "policy_error"  # a miss: busy
        assert not slow.done()
        assert (await slow).allow
    finally:
        await eng.close()


async def test_reload_while_an_evaluation_runs(engine: EmbeddedEngine, tmp_path: Path) -> None:
    """A reload during an evaluation: that one ends on its own bundle, the next ones use the new one."""
    # Longer than the default slow input, so the reload starts well inside it; whether the
    # reload's compile (another thread) ends before it does not matter: its answer is v1's.
    n = SLOW_N * 4
    slow = asyncio.create_task(engine.decide(SLOW | {"n": n}))
    await until(lambda: engine.pool.idle == 0 and engine.pool.live == 1, "the slow one is on a worker")
    write_policy(tmp_path, "v2")
    assert not slow.done()  # the reload below starts while the evaluation runs
    assert await engine.reload_if_changed()
    d = await engine.decide(cheap())
    assert d.allow and d.reason == "v2"
    old = await slow
    assert old.allow and old.reason == f"v1_{n - 3}"
    # New entrypoints rebuild the bundle too; the workers follow.
    assert await engine.query("mcp/authz/above", {"n": 6}) == [4, 5, 6]
    assert (await engine.decide(SLOW | {"n": 15})).reason == "v2_12"


async def test_bundles_are_compiled_off_the_loop(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The first build, a reload and a rebuild for a new entrypoint all compile on another thread
    (compiling the shipped policy takes ~0.2 s: longer than the evaluation deadline)."""
    import gateway.policy.embedded as embedded

    threads: list[int] = []

    class Recording(CompiledPolicy):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            threads.append(threading.get_ident())
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(embedded, "CompiledPolicy", Recording)
    write_policy(tmp_path)
    eng = EmbeddedEngine(tmp_path, "mcp/authz/decision", reload_interval=0)
    await eng.start()
    try:
        write_policy(tmp_path, "v2")
        assert await eng.reload_if_changed()
        assert await eng.query("mcp/authz/above", {"n": 5}) == [4, 5]
        assert len(threads) == 3 and threading.get_ident() not in threads
        assert (await eng.decide(cheap())).reason == "v2"
    finally:
        await eng.close()


async def test_close_fails_later_calls_closed(engine: EmbeddedEngine) -> None:
    """After close() an evaluation is a policy_error, never an allow."""
    assert (await engine.decide(cheap())).allow
    await engine.close()
    d = await engine.decide(cheap(1))
    assert not d.allow and d.error_code == "policy_error"


def test_one_bundle_many_interpreters_on_many_threads(tmp_path: Path) -> None:
    """Threads sharing one compiled bundle, each with its own interpreter, get the same answers as
    one thread; the inputs are built on another thread than the one evaluating them."""
    (tmp_path / "authz.rego").write_text("""package mcp.authz
import rego.v1
decision := {"allow": input.i % 3 == 0, "reason": sprintf("r%d", [input.i]),
             "tags": [t | some t in input.tags; startswith(t, "a")]}
""", encoding="utf-8")
    policy = CompiledPolicy(load_sources(tmp_path), ["mcp/authz/decision"])
    inputs = [{"i": i, "tags": [f"a{i}", f"b{i}", f"a{i + 1}"]} for i in range(300)]
    expected = [policy.evaluate("mcp/authz/decision", v) for v in inputs]
    failures: list[int] = []
    # Built here, on the test's thread; evaluated on the workers.
    batches = [[(i, policy.lookup("mcp/authz/decision", v)) for _ in range(4)
                for i, v in enumerate(inputs)] for _ in range(4)]

    def run(k: int) -> None:
        interp = new_interpreter()
        for i, step in batches[k]:
            assert isinstance(step, PendingEval)
            if policy.finish(step, *policy.run_pending(interp, step)) != expected[i]:
                failures.append(i)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    assert failures == []


def test_discard_frees_an_evaluation_that_never_runs(tmp_path: Path) -> None:
    """A pending evaluation can be dropped without running it; discarding twice is harmless."""
    write_policy(tmp_path)
    policy = CompiledPolicy(load_sources(tmp_path), ["mcp/authz/decision"])
    step = policy.lookup("mcp/authz/decision", cheap())
    assert not isinstance(step, tuple)
    policy.discard(step)
    policy.discard(step)
    assert step.handle == 0


async def test_callers_that_gave_up_waiting_free_their_queue_places() -> None:
    """A waiter that timed out or was cancelled no longer counts against max_waiting: the next
    caller waits for the worker instead of being refused at once."""
    pool = make_pool(workers=1, max_abandoned=0, max_waiting=2)
    gate = Gate()
    busy = asyncio.create_task(pool.run(gate, LONG))
    await until(gate.started.is_set, "the long job started")
    with pytest.raises(PolicyTimeoutError):
        await pool.run(quick, 0.01)
    cancelled = asyncio.create_task(pool.run(quick, LONG))
    await until(lambda: len(pool._waiters) == 1, "the second caller waits")
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert len(pool._waiters) == 0
    third = asyncio.create_task(pool.run(quick, LONG))
    fourth = asyncio.create_task(pool.run(quick, LONG))
    await until(lambda: len(pool._waiters) == 2, "two callers wait")
    gate.release.set()
    assert await busy == "slow done"
    assert await third == "quick" and await fourth == "quick"
    pool.close()


async def test_a_worker_whose_state_cannot_be_made_leaves_the_pool() -> None:
    """make_state failing on the worker thread fails that job and retires the worker: the pool
    starts a fresh one for the next job instead of losing a place for good."""
    attempts = 0

    def flaky_state() -> object:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("no interpreter")
        return object()

    pool: EvalPool[object] = EvalPool(flaky_state, workers=1, max_abandoned=0, max_waiting=1)
    with pytest.raises(RuntimeError, match="no interpreter"):
        await pool.run(quick, LONG)
    assert pool.live == 0
    assert await pool.run(quick, LONG) == "quick"
    assert pool.live == 1
    pool.close()
