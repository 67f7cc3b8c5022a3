"""The tool catalog on the request path: quarantine and argument checks for ``tools/call``, and
the background task that keeps the catalog fresh from every configured server.

Two connections to the shared SQLite catalog: the request path reads through one (an in-memory
snapshot, reloaded only when another connection committed), the refresher writes through the
other in a worker thread. A write can wait seconds on another process's lock (several instances
refresh the same file, the CLI approves); with one shared connection the event loop would wait on
that lock too.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import aiohttp

from ext_authz.errors import (
    CatalogNotLoaded,
    CatalogUnavailable,
    ToolNotApproved,
    ToolQuarantined,
    ToolUnknown,
)
from gateway.catalog import APPROVED, NEW, QUARANTINED, Catalog, CatalogError, InvalidArguments
from gateway.catalog.client import CATALOG_IDENTITY, FetchError, Listing, fetch_listing
from gateway.telemetry import metrics
from gateway.upstream import UpstreamTarget

logger = logging.getLogger(__name__)

# The first fetch retries quickly (servers usually start alongside the gateway), backing off to
# at most this, or the refresh interval if that is shorter.
FIRST_RETRY_SECONDS = 0.2
# Until a server's catalog is known its tools cannot be called, so keep trying every second.
NOT_LOADED_MAX_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 10.0
FETCH_TIMEOUT_SECONDS = 10.0
# An unknown tool triggers an early refresh of its server, at most this often: clients inventing
# tool names must not turn into a fetch storm against the servers.
KICK_COOLDOWN_SECONDS = 5.0
_KINDS = ("tool", "resource", "prompt")


class CatalogGate:
    """Request-path checks against the pinned catalog (memory only, no disk I/O per call)."""

    def __init__(self, catalog: Catalog, servers: Iterable[str], *, refresh_seconds: float) -> None:
        self.catalog = catalog
        self.refresh_seconds = refresh_seconds
        servers = tuple(servers)
        # Servers whose catalog is known: fetched by this process, or already in the shared
        # database (pins survive restarts; that is what makes a changed definition detectable).
        self.loaded: set[str] = set()
        self._loaded_events: dict[str, asyncio.Event] = {s: asyncio.Event() for s in servers}
        self._kick: dict[str, asyncio.Event] = {s: asyncio.Event() for s in servers}
        self._last_kick: dict[str, float] = {}
        for server in servers:
            if catalog.entries(server):
                self.mark_loaded(server)

    def mark_loaded(self, server: str) -> None:
        self.loaded.add(server)
        event = self._loaded_events.get(server)
        if event is not None:
            event.set()

    async def wait_loaded(self, server: str, limit: float) -> bool:
        """Wait at most ``limit`` s for the first catalog of ``server`` (a fetch may be running)."""
        event = self._loaded_events.get(server)
        if event is None:
            return False
        try:
            async with asyncio.timeout(limit):
                await event.wait()
        except TimeoutError:
            return False
        return True

    def check_call(self, server: str, tool: str, arguments: Any) -> None:
        """Raise unless ``tool`` is approved on ``server`` and ``arguments`` fit its inputSchema."""
        try:
            entry = self.catalog.get(server, tool)
        except sqlite3.Error as exc:
            logger.error("catalog read failed: %s", exc)
            raise CatalogUnavailable("the tool catalog cannot be read; try again later") from None
        if entry is None or not entry.present:
            if server not in self.loaded:
                self.kick(server)
                raise CatalogNotLoaded(
                    f"the gateway has not loaded the tool catalog of server {server!r} yet; "
                    "retry in a moment", data={"server": server})
            self.kick(server)
            raise ToolUnknown(
                f"unknown tool {tool!r}: server {server!r} does not list it in the gateway's "
                f"catalog (refreshed every {self.refresh_seconds:g}s)",
                data={"server": server, "tool": tool, "state": "unknown"})
        if entry.state != APPROVED:
            target = f"{server}/{tool}"
            data = {"server": server, "tool": tool, "state": entry.state, "hash": entry.hash}
            if entry.state == NEW:
                raise ToolNotApproved(
                    f"tool {target!r} has not been approved yet; an operator must run "
                    f"`mcp-gateway catalog approve {target}`", data=data)
            raise ToolQuarantined(
                f"tool {target!r} is quarantined: its definition changed since it was approved; "
                f"an operator must review it and run `mcp-gateway catalog approve {target}`",
                data=data)
        invalid: InvalidArguments | None = self.catalog.validate_entry_arguments(entry, arguments)
        if invalid is not None:
            invalid.data = {**(invalid.data or {}), "server": server}
            raise invalid

    def kick(self, server: str) -> None:
        """Ask the refresher to fetch ``server`` now (rate limited per server)."""
        now = time.monotonic()
        last = self._last_kick.get(server)
        if last is not None and now - last < KICK_COOLDOWN_SECONDS:
            return
        event = self._kick.get(server)
        if event is not None:
            self._last_kick[server] = now
            event.set()

    def wait_kick(self, server: str) -> asyncio.Event:
        return self._kick[server]

    def update_gauge(self) -> None:
        counts = dict.fromkeys(self._kick, 0)
        for entry in self.catalog.entries(kind="tool"):
            if entry.present and entry.state == QUARANTINED and entry.server in counts:
                counts[entry.server] += 1
        for server, n in counts.items():
            metrics.QUARANTINED_TOOLS.labels(server).set(n)


class CatalogRefresher:
    """Fetches every server's listing with the gateway's own identity and records it.

    One task per server: right away at start-up (retrying fast while the server is not up yet),
    then every ``interval`` seconds, or earlier when the gate asks for it.
    """

    def __init__(self, gate: CatalogGate, writer: Catalog,
                 server_targets: Mapping[str, tuple[UpstreamTarget, ...]],
                 http: aiohttp.ClientSession,
                 identity: Callable[[str], Mapping[str, str]] | None = None) -> None:
        self.gate = gate
        # server -> fresh headers naming the gateway (a caller assertion) for each request;
        # None: the bare identity headers CATALOG_IDENTITY.
        self.identity = identity
        self._writer = writer
        self._urls = server_targets
        self._http = http
        self.interval = gate.refresh_seconds
        self._tasks: list[asyncio.Task[None]] = []
        self._attempted: dict[str, asyncio.Event] = {s: asyncio.Event() for s in server_targets}

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(server), name=f"catalog-refresh:{server}")
                       for server in self._urls]

    async def wait_first_attempts(self, limit: float) -> None:
        """Wait (at most ``limit`` s) until every server was tried once, successfully or not."""
        try:
            async with asyncio.timeout(limit):
                for event in self._attempted.values():
                    await event.wait()
        except TimeoutError:
            pending = sorted(s for s, e in self._attempted.items() if not e.is_set())
            logger.warning("catalog: no answer yet from %s; retrying in the background", pending)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _run(self, server: str) -> None:
        retry = FIRST_RETRY_SECONDS
        while True:
            try:
                ok = await self.refresh_server(server)
            except Exception:  # top-level handler of a background task: log, keep refreshing
                logger.exception("catalog refresh of %s failed unexpectedly", server)
                ok = False
            self._attempted[server].set()
            if ok:
                retry = FIRST_RETRY_SECONDS
                delay = self.interval
            else:
                delay = retry
                cap = MAX_RETRY_SECONDS if server in self.gate.loaded else NOT_LOADED_MAX_RETRY_SECONDS
                retry = min(retry * 2, cap, self.interval)
            event = self.gate.wait_kick(server)
            event.clear()
            try:
                async with asyncio.timeout(delay):
                    await event.wait()
            except TimeoutError:
                pass

    async def refresh_server(self, server: str) -> bool:
        """Fetch ``server`` from its first instance that answers and record the listing."""
        errors = []
        for target in self._urls[server]:
            url = target.url
            try:
                async with asyncio.timeout(FETCH_TIMEOUT_SECONDS):
                    listing = await self._fetch(server, target)
            except FetchError as exc:
                errors.append(f"{url}: {exc.message}")
                continue
            except TimeoutError:
                errors.append(f"{url}: timed out")
                continue
            try:
                changed = await asyncio.to_thread(self._record, server, {
                    "tool": listing.tools, "resource": listing.resources, "prompt": listing.prompts})
            except (CatalogError, sqlite3.Error) as exc:
                logger.error("catalog of %s not recorded: %s", server, exc)
                return False
            for name in changed:
                logger.warning("tool %s/%s changed its definition: quarantined until "
                               "`mcp-gateway catalog approve %s/%s`", server, name, server, name)
            self.gate.mark_loaded(server)
            self.gate.update_gauge()
            logger.debug("catalog of %s refreshed from %s: %d tools", server, url, len(listing.tools))
            return True
        logger.warning("catalog refresh of %s failed: %s", server, "; ".join(errors))
        return False

    async def _fetch(self, server: str, target: UpstreamTarget) -> Listing:
        identity = self.identity
        if identity is None:
            return await fetch_listing(self._http, target, headers=CATALOG_IDENTITY)
        return await fetch_listing(self._http, target, headers={},
                                   per_request=lambda: identity(server))

    def _record(self, server: str, lists: Mapping[str, list[dict[str, Any]]]) -> list[str]:
        changed: list[str] = []
        for kind in _KINDS:
            report = self._writer.refresh(server, lists[kind], kind=kind, actor="ext_authz:refresh")
            if kind == "tool":
                changed = report.changed
        return changed
