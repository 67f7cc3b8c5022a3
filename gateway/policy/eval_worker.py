"""Policy evaluation off the event loop: a bounded pool of threads, one interpreter each, with a
deadline per evaluation.

Why threads: rego-cpp evaluation is synchronous C++ whose cost the policy and the input decide,
so on the loop one expensive query stalls every other caller of the process. ctypes releases the
GIL for the C call, so the loop keeps answering (cache hits, token checks, other decisions)
while a worker evaluates. An interpreter holds the current input, so each worker owns one and
never shares it; the compiled bundle is shared read-only (``rego.CompiledPolicy``).

Why not ``concurrent.futures.ThreadPoolExecutor``: rego-cpp cannot cancel an evaluation, so a
worker that misses its deadline keeps running until the query ends by itself (rego-cpp stops
every query after 10 million statements: seconds, not forever). The pool *abandons* such a
worker: the caller gets ``PolicyTimeoutError`` at the deadline, a fresh worker may take the
stuck one's place, and the stuck one leaves (or rejoins, if a place is free) when its query
ends. Abandoned workers are bounded (``max_abandoned``): past that bound the pool shrinks
instead of growing, so a flood of hostile inputs costs at most ``workers + max_abandoned``
threads. Callers wait for a free worker in a bounded queue (``max_waiting``), within the same
deadline; past that bound they get ``PolicyBusyError`` at once instead of queueing without
bound.

Every piece of pool state is touched only on the event-loop thread (workers report back through
``call_soon_threadsafe``), so the pool needs no lock.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from gateway.policy.errors import PolicyBusyError, PolicyError, PolicyTimeoutError

logger = logging.getLogger(__name__)

T = TypeVar("T")
S = TypeVar("S")  # the per-worker state (an interpreter)

_STOP = object()
_ids = itertools.count(1)


class _Job(Generic[S]):
    __slots__ = ("fn", "future", "loop")

    def __init__(self, fn: Callable[[S], Any], future: asyncio.Future[Any],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.fn = fn
        self.future = future
        self.loop = loop


class _Worker(Generic[S]):
    """One thread with its own state, fed one job at a time."""

    __slots__ = ("abandoned", "broken", "inbox", "name", "thread")

    def __init__(self, pool: EvalPool[S]) -> None:
        self.name = f"policy-eval-{next(_ids)}"
        self.inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.abandoned = False
        self.broken = False
        # Daemon: a stuck evaluation must not keep the process alive at exit.
        self.thread = threading.Thread(target=self._main, args=(pool._make_state, pool._finished),
                                       name=self.name, daemon=True)
        self.thread.start()

    def _main(self, make_state: Callable[[], S],
              finished: Callable[[_Worker[S], _Job[S], bool, Any], None]) -> None:
        try:
            state = make_state()  # created on this thread, used only here
        except BaseException as exc:  # noqa: BLE001 - a thread's top level: every job fails with it
            self._fail_forever(exc, finished)
            return
        while True:
            item = self.inbox.get()
            if item is _STOP:
                return
            assert isinstance(item, _Job)
            try:
                outcome, ok = item.fn(state), True
            except BaseException as exc:  # noqa: BLE001 - a thread's top level: the caller re-raises it
                outcome, ok = exc, False
            try:
                item.loop.call_soon_threadsafe(finished, self, item, ok, outcome)
            except RuntimeError:  # the loop is closed: nobody waits for this worker any more
                return


    def _fail_forever(self, exc: BaseException,
                      finished: Callable[[_Worker[S], _Job[S], bool, Any], None]) -> None:
        # Without its state this worker can run nothing: answer its job with the error and
        # leave the pool (``_finished`` with a broken worker retires it), so it never holds a
        # place it cannot serve.
        self.broken = True
        item = self.inbox.get()
        if isinstance(item, _Job):
            with contextlib.suppress(RuntimeError):  # the loop is closed
                item.loop.call_soon_threadsafe(finished, self, item, False, exc)


class EvalPool(Generic[S]):
    """Runs ``fn(state)`` on a worker thread with a deadline; see the module docstring."""

    def __init__(self, make_state: Callable[[], S], *, workers: int, max_abandoned: int,
                 max_waiting: int) -> None:
        if workers < 1 or max_abandoned < 0 or max_waiting < 0:
            raise ValueError("an evaluation pool needs workers >= 1, max_abandoned >= 0, "
                             "max_waiting >= 0")
        self._make_state = make_state
        self.workers = workers
        self.max_abandoned = max_abandoned
        self.max_waiting = max_waiting
        self._idle: list[_Worker[S]] = []
        self._live = 0  # started and not abandoned: idle or busy
        self._abandoned = 0
        self._waiters: collections.deque[asyncio.Future[_Worker[S]]] = collections.deque()
        self._closed = False
        self.timeouts = 0
        self.refused = 0

    @property
    def live(self) -> int:
        return self._live

    @property
    def abandoned(self) -> int:
        return self._abandoned

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def run(self, fn: Callable[[S], T], budget: float, *,
                  discard: Callable[[], None] | None = None) -> T:
        """``fn(state)`` on a worker, its result or exception; at most ``budget`` seconds in all.

        ``discard`` is called (on the loop) when ``fn`` is never handed to a worker (busy,
        deadline spent waiting, caller cancelled), so the caller can free what ``fn`` would
        have consumed. Once handed over, ``fn`` runs to its end on the worker, awaited or not.
        """
        handed = False
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + budget
            worker = await self._acquire(loop, deadline)
            job_future: asyncio.Future[T] = loop.create_future()
            worker.inbox.put(_Job(fn, job_future, loop))
            handed = True
            # A timer rather than asyncio.wait/wait_for: it costs less per call (measured).
            timer = loop.call_at(deadline, self._expire, worker, job_future, budget)
            try:
                # Cancelling the caller cancels job_future: the worker's answer is then dropped.
                return await job_future
            finally:
                timer.cancel()
        finally:
            if not handed and discard is not None:
                discard()

    async def _acquire(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Worker[S]:
        if self._closed:
            raise PolicyError("the policy evaluation pool is closed")
        if self._idle:
            return self._idle.pop()
        if self._can_start():
            return self._start()
        if len(self._waiters) >= self.max_waiting:
            self.refused += 1
            raise PolicyBusyError(f"all {self.workers} policy workers are busy and "
                                  f"{len(self._waiters)} requests wait")
        waiter: asyncio.Future[_Worker[S]] = loop.create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait((waiter,), timeout=max(0.0, deadline - loop.time()))
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # A worker handed to us just as we were cancelled: pass it on.
                self._release(waiter.result())
            waiter.cancel()
            self._forget(waiter)
            raise
        if waiter.cancelled():  # the pool closed
            raise PolicyError("the policy evaluation pool is closed")
        if waiter.done():
            return waiter.result()
        waiter.cancel()
        self._forget(waiter)  # a caller that gave up no longer counts against max_waiting
        self.timeouts += 1
        raise PolicyTimeoutError("no policy worker became free before the deadline")

    def _forget(self, waiter: asyncio.Future[_Worker[S]]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

    def _can_start(self) -> bool:
        return (self._live < self.workers
                and self._live + self._abandoned < self.workers + self.max_abandoned)

    def _start(self) -> _Worker[S]:
        try:
            worker = _Worker(self)
        except RuntimeError as exc:  # the system refused another thread
            raise PolicyBusyError(f"cannot start a policy worker: {exc}") from None
        self._live += 1
        return worker

    def _expire(self, worker: _Worker[S], job_future: asyncio.Future[Any], budget: float) -> None:
        if job_future.done():
            return
        job_future.set_exception(PolicyTimeoutError(
            f"policy evaluation exceeded its {budget * 1000:.0f} ms deadline"))
        self._abandon(worker)

    def _abandon(self, worker: _Worker[S]) -> None:
        worker.abandoned = True
        self._live -= 1
        self._abandoned += 1
        self.timeouts += 1
        logger.warning("policy evaluation on %s passed its deadline; the worker is abandoned until "
                       "its query ends (%d abandoned, %d live)", worker.name, self._abandoned,
                       self._live)
        # Its place is free: a queued caller may get a fresh worker now.
        while self._waiters and self._can_start():
            waiter = self._waiters.popleft()
            if not waiter.done():
                try:
                    waiter.set_result(self._start())
                except PolicyBusyError as exc:
                    waiter.set_exception(exc)

    def _finished(self, worker: _Worker[S], job: _Job[S], ok: bool, outcome: Any) -> None:
        if not job.future.done():
            if ok:
                job.future.set_result(outcome)
            else:
                job.future.set_exception(outcome)
        if worker.broken:  # its state could not be made: retire it, never hand it out again
            if worker.abandoned:
                self._abandoned -= 1
            else:
                self._live -= 1
            return
        if worker.abandoned:
            self._abandoned -= 1
            if self._closed or self._live >= self.workers:
                worker.inbox.put(_STOP)
                return
            worker.abandoned = False
            self._live += 1
            logger.info("abandoned policy worker %s finished and rejoins the pool", worker.name)
        self._release(worker)

    def _release(self, worker: _Worker[S]) -> None:
        if self._closed:
            self._live -= 1
            worker.inbox.put(_STOP)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return
        self._idle.append(worker)

    def close(self) -> None:
        """Stop idle workers now and busy ones when they finish; later calls fail closed."""
        self._closed = True
        for worker in self._idle:
            worker.inbox.put(_STOP)
        self._live -= len(self._idle)
        self._idle.clear()
        while self._waiters:
            self._waiters.popleft().cancel()
