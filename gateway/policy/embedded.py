"""The embedded backend: the policy folder compiled by regopy (rego-cpp) into one bundle.

Evaluation runs inline on the event loop. It is synchronous C++ and CPU-bound, so a thread would
add a hand-off (~50-100 us on this machine) without freeing any CPU, and an interpreter holds
mutable per-query state (the input), so it must not be shared across threads anyway; one engine
per process, used from the loop thread only, needs no lock.

The folder is re-read when a cheap (path, mtime, size) fingerprint changes, checked every
``reload_interval`` seconds by a background task. Every version of the folder (the first one
included) is first built and queried in a child process (``gateway.policy.check``), because
rego-cpp can abort the process on some policies; only then is it built here. A new bundle
replaces the old one only once it compiled; a broken or crashing edit is logged and the last
good bundle keeps serving.

Each bundle carries its own decision cache (``gateway.policy.cache``; ``cache_size`` entries, 0:
none), so swapping the bundle drops every cached result with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from gateway.config import DEFAULT_DECISION_CACHE_SIZE
from gateway.policy.cache import DecisionCache
from gateway.policy.check import DEFAULT_CHECK_TIMEOUT_SECONDS, check_in_subprocess
from gateway.policy.engine import DEFAULT_RELOAD_INTERVAL_SECONDS, PolicyEngine
from gateway.policy.errors import PolicyCompileError, PolicyError
from gateway.policy.rego import ENTRYPOINT_RE, CompiledPolicy, fingerprint, load_sources

logger = logging.getLogger(__name__)


class EmbeddedEngine(PolicyEngine):
    def __init__(self, policy_dir: str | os.PathLike[str], entrypoint: str, *,
                 reload_interval: float = DEFAULT_RELOAD_INTERVAL_SECONDS,
                 extra_entrypoints: tuple[str, ...] = (),
                 check_timeout: float = DEFAULT_CHECK_TIMEOUT_SECONDS,
                 cache_size: int = DEFAULT_DECISION_CACHE_SIZE) -> None:
        super().__init__(entrypoint)
        if cache_size < 0:
            raise PolicyError("the decision cache size must be 0 (off) or more")
        self.cache_size = cache_size
        self._cache_note: tuple[str, ...] = ()
        self.check_timeout = check_timeout
        self.policy_dir = os.fspath(policy_dir)
        self.reload_interval = reload_interval
        self._entrypoints = list(dict.fromkeys((entrypoint, *extra_entrypoints)))
        self._compiled: CompiledPolicy | None = None
        self._fingerprint: tuple[tuple[str, int, int], ...] = ()
        self._task: asyncio.Task[None] | None = None
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
        self._fingerprint = fingerprint(self.policy_dir)
        await check_in_subprocess(self.policy_dir, self._entrypoints, limit_seconds=self.check_timeout)
        self._compiled = self._compile()
        logger.info("policy loaded from %s (revision %s)", self.policy_dir, self.revision)
        if self.reload_interval > 0 and self._task is None:
            self._task = asyncio.create_task(self._watch(), name="policy-reload")

    async def close(self) -> None:
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
        current = fingerprint(self.policy_dir)
        if current == self._fingerprint:
            return False
        self._fingerprint = current
        try:
            await check_in_subprocess(self.policy_dir, self._entrypoints, limit_seconds=self.check_timeout)
            compiled = self._compile()
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
        return self.evaluate_sync(entrypoint, policy_input)

    def evaluate_sync(self, entrypoint: str, policy_input: Any) -> tuple[bool, Any]:
        compiled = self._compiled
        if compiled is None:
            raise PolicyError("the policy engine is not started")
        if entrypoint not in compiled.entrypoints:
            compiled = self._add_entrypoint(compiled, entrypoint)
        return compiled.evaluate(entrypoint, policy_input)

    def _add_entrypoint(self, compiled: CompiledPolicy, entrypoint: str) -> CompiledPolicy:
        """Plans exist only for entrypoints named at build time: rebuild once with one more.

        The rebuild uses the sources of the serving bundle, not the folder, so asking for a new
        rule never swaps the policy itself.
        """
        if not ENTRYPOINT_RE.match(entrypoint):
            raise PolicyError(f"invalid entrypoint {entrypoint!r}")
        self._entrypoints.append(entrypoint)
        try:
            rebuilt = CompiledPolicy(compiled.sources, self._entrypoints, cache_size=self.cache_size)
        except PolicyCompileError:
            self._entrypoints.remove(entrypoint)
            raise
        self._compiled = rebuilt
        return rebuilt
