"""The embedded backend: the policy folder compiled by regopy (rego-cpp) into one bundle.

Cache hits are answered on the event loop (~15 us: pruning, a canonical key, a dict lookup).
A miss runs on a worker thread with its own interpreter (``gateway.policy.eval_worker``), under
a deadline (``policy.eval_timeout_ms``): what an evaluation costs depends on the policy and the
input, and on the loop one expensive query would stall every other caller of the process. The
loop builds the input and parses the answer; the worker only sets the input and runs the query,
with the GIL released for the C call. A query that misses its deadline is answered
``policy_error`` (fail closed, 503) and its worker is abandoned and replaced (rego-cpp cannot
cancel it); when every worker is busy and the wait queue is full the answer is ``policy_error``
at once.

The folder is re-read when a cheap (path, mtime, size) fingerprint changes, checked every
``reload_interval`` seconds by a background task. Every version of the folder (the first one
included) is first built and queried in a child process (``gateway.policy.check``), because
rego-cpp can abort the process on some policies; only then is it built here. A new bundle
replaces the old one only once it compiled; a broken or crashing edit is logged and the last
good bundle keeps serving. Builds (the first, reloads, a rebuild for a new entrypoint) run on a
helper thread, one at a time: compiling takes ~0.2 s, longer than the evaluation deadline. An
evaluation holds the bundle it started with until it ends, so a new bundle never frees one a
worker still reads.

Each bundle carries its own decision cache (``gateway.policy.cache``; ``cache_size`` entries, 0:
none), so swapping the bundle drops every cached result with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from gateway.config import (
    DEFAULT_DECISION_CACHE_SIZE,
    DEFAULT_EVAL_MAX_ABANDONED,
    DEFAULT_EVAL_MAX_WAITING,
    DEFAULT_EVAL_TIMEOUT_MS,
    DEFAULT_EVAL_WORKERS,
)
from gateway.policy.cache import DecisionCache
from gateway.policy.check import DEFAULT_CHECK_TIMEOUT_SECONDS, check_in_subprocess
from gateway.policy.engine import DEFAULT_RELOAD_INTERVAL_SECONDS, PolicyEngine
from gateway.policy.errors import PolicyCompileError, PolicyError
from gateway.policy.eval_worker import EvalPool
from gateway.policy.rego import (
    ENTRYPOINT_RE,
    CompiledPolicy,
    PendingEval,
    fingerprint,
    load_sources,
    new_interpreter,
)

logger = logging.getLogger(__name__)


class EmbeddedEngine(PolicyEngine):
    def __init__(self, policy_dir: str | os.PathLike[str], entrypoint: str, *,
                 reload_interval: float = DEFAULT_RELOAD_INTERVAL_SECONDS,
                 extra_entrypoints: tuple[str, ...] = (),
                 check_timeout: float = DEFAULT_CHECK_TIMEOUT_SECONDS,
                 cache_size: int = DEFAULT_DECISION_CACHE_SIZE,
                 eval_timeout_ms: int = DEFAULT_EVAL_TIMEOUT_MS,
                 eval_workers: int = DEFAULT_EVAL_WORKERS,
                 eval_max_abandoned: int = DEFAULT_EVAL_MAX_ABANDONED,
                 eval_max_waiting: int = DEFAULT_EVAL_MAX_WAITING) -> None:
        super().__init__(entrypoint)
        if cache_size < 0:
            raise PolicyError("the decision cache size must be 0 (off) or more")
        if eval_timeout_ms < 1:
            raise PolicyError("the policy evaluation deadline must be at least 1 ms")
        self.eval_timeout = eval_timeout_ms / 1000.0
        try:
            self.pool: EvalPool[Any] = EvalPool(new_interpreter, workers=eval_workers,
                                                max_abandoned=eval_max_abandoned,
                                                max_waiting=eval_max_waiting)
        except ValueError as exc:
            raise PolicyError(str(exc)) from None
        self.cache_size = cache_size
        self._cache_note: tuple[str, ...] = ()
        self.check_timeout = check_timeout
        self.policy_dir = os.fspath(policy_dir)
        self.reload_interval = reload_interval
        self._entrypoints = list(dict.fromkeys((entrypoint, *extra_entrypoints)))
        self._compiled: CompiledPolicy | None = None
        self._fingerprint: tuple[tuple[str, int, int], ...] = ()
        self._task: asyncio.Task[None] | None = None
        self._build_lock = asyncio.Lock()
        self.last_error: str | None = None

    @property
    def revision(self) -> str | None:
        """A digest of the sources of the bundle now serving (for logs and status)."""
        return self._compiled.sources.digest if self._compiled else None

    @property
    def decision_cache(self) -> DecisionCache | None:
        """The cache of the bundle now serving (None: off, or the policy is not cacheable)."""
        return self._compiled.cache if self._compiled else None

    async def start(self) -> None:
        async with self._build_lock:
            self._fingerprint = fingerprint(self.policy_dir)
            await check_in_subprocess(self.policy_dir, self._entrypoints,
                                      limit_seconds=self.check_timeout)
            self._compiled = await asyncio.to_thread(self._compile)
        logger.info("policy loaded from %s (revision %s)", self.policy_dir, self.revision)
        if self.reload_interval > 0 and self._task is None:
            self._task = asyncio.create_task(self._watch(), name="policy-reload")

    async def close(self) -> None:
        self.pool.close()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    def _compile(self) -> CompiledPolicy:
        # Tests are left out of the serving bundle: they never run there and cost compile time.
        sources = load_sources(self.policy_dir, include_tests=False)
        compiled = CompiledPolicy(sources, self._entrypoints, cache_size=self.cache_size)
        if compiled.cache_disabled_by != self._cache_note:  # once per change, not per reload
            self._cache_note = compiled.cache_disabled_by
            if compiled.cache_disabled_by:
                logger.warning("policy decision cache off: the policy calls %s, whose result is not "
                               "a function of input and data", ", ".join(compiled.cache_disabled_by))
        return compiled

    async def reload_if_changed(self) -> bool:
        """Check and rebuild if the folder changed; True when a new bundle now serves."""
        async with self._build_lock:
            current = fingerprint(self.policy_dir)
            if current == self._fingerprint:
                return False
            self._fingerprint = current
            try:
                await check_in_subprocess(self.policy_dir, self._entrypoints,
                                          limit_seconds=self.check_timeout)
                # Compiling the shipped policy takes ~0.2 s: on the loop it would hold up every
                # caller past the evaluation deadline.
                compiled = await asyncio.to_thread(self._compile)
            except PolicyCompileError as exc:
                self.last_error = str(exc)
                logger.error("policy reload failed, still serving revision %s: %s", self.revision, exc)
                return False
            if self._compiled is not None and compiled.sources.digest == self._compiled.sources.digest:
                return False
            self._compiled = compiled
            self.last_error = None
            logger.info("policy reloaded from %s (revision %s)", self.policy_dir, self.revision)
            return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            await self.reload_if_changed()

    async def evaluate(self, entrypoint: str, policy_input: Any) -> tuple[bool, Any]:
        compiled = self._compiled
        if compiled is None or entrypoint not in compiled.entrypoints:
            compiled = await self._serving_async(entrypoint)
        step = compiled.lookup(entrypoint, policy_input)
        if not isinstance(step, PendingEval):
            return step  # a cache hit: cheaper than the hop to a worker

        def job(interp: Any) -> tuple[str, bool]:
            # `compiled` (and its bundle) stays referenced until this returns, reload or not.
            return compiled.run_pending(interp, step)

        text, ok = await self.pool.run(job, self.eval_timeout,
                                       discard=lambda: compiled.discard(step))
        return compiled.finish(step, text, ok)

    def evaluate_sync(self, entrypoint: str, policy_input: Any) -> tuple[bool, Any]:
        """Evaluate on the calling thread, without a deadline (tools and tests, never a service)."""
        return self._serving(entrypoint).evaluate(entrypoint, policy_input)

    def _serving(self, entrypoint: str) -> CompiledPolicy:
        compiled = self._compiled
        if compiled is None:
            raise PolicyError("the policy engine is not started")
        if entrypoint not in compiled.entrypoints:
            compiled = self._install(entrypoint, self._rebuilt_with(compiled, entrypoint))
        return compiled

    async def _serving_async(self, entrypoint: str) -> CompiledPolicy:
        """The serving bundle, rebuilt off the loop first when it lacks ``entrypoint``."""
        async with self._build_lock:  # one build at a time: no reload or rebuild is lost
            compiled = self._compiled
            if compiled is None:
                raise PolicyError("the policy engine is not started")
            if entrypoint in compiled.entrypoints:
                return compiled
            rebuilt = await asyncio.to_thread(self._rebuilt_with, compiled, entrypoint)
            return self._install(entrypoint, rebuilt)

    def _rebuilt_with(self, compiled: CompiledPolicy, entrypoint: str) -> CompiledPolicy:
        """Plans exist only for entrypoints named at build time: rebuild once with one more.

        The rebuild uses the sources of the serving bundle, not the folder, so asking for a new
        rule never swaps the policy itself.
        """
        if not ENTRYPOINT_RE.match(entrypoint):
            raise PolicyError(f"invalid entrypoint {entrypoint!r}")
        return CompiledPolicy(compiled.sources, [*self._entrypoints, entrypoint],
                              cache_size=self.cache_size)

    def _install(self, entrypoint: str, rebuilt: CompiledPolicy) -> CompiledPolicy:
        if entrypoint not in self._entrypoints:
            self._entrypoints.append(entrypoint)
        self._compiled = rebuilt
        return rebuilt
