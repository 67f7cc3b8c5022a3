"""Requests to one child: id remapping, progress tokens, cancellation, crash answers, respawn.

Every request sent to a child gets a per-child integer id (clients on different sessions or
stateless requests may reuse ids), and its ``_meta.progressToken`` is replaced the same way, so
progress finds its request. A :class:`Link` owns the current :class:`Child` and starts a new one
with backoff when it dies; its ``handshake`` (the stored ``initialize`` params) is replayed first.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.errors import INTERNAL_ERROR
from gateway.jsonrpc import error_response
from mcp_bridge.child import Child, ExitInfo
from mcp_bridge.errors import BridgeBusy, UpstreamProtocolError, UpstreamUnavailable
from mcp_bridge.settings import BridgeSettings
from mcp_servers.core.errors import REQUEST_CANCELLED
from mcp_servers.core.streams import EventStream

logger = logging.getLogger(__name__)

ClientId = str | int
# A child that stays up this long has recovered: its backoff starts again from the minimum.
STABLE_SECONDS = 10.0


@dataclass(slots=True, eq=False)
class Exchange:
    """One request to a child and where its answer and progress go."""

    client_id: ClientId | None
    method: str
    stream: EventStream
    future: asyncio.Future[dict[str, Any]]
    modern: bool = False
    bridge_id: int | None = None
    progress_token: Any = None
    cancelled: bool = False
    notifications: int = 0
    http_status: int = 200
    translate: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    async def publish(self, message: dict[str, Any]) -> None:
        self.notifications += 1
        await self.stream.publish(message)

    async def finish(self, response: dict[str, Any], http_status: int = 200) -> None:
        if self.future.done():
            return
        response = {**response, "id": self.client_id}
        if self.translate is not None and "result" in response:
            response = self.translate(response)
        self.http_status = http_status
        self.future.set_result(response)
        if not self.cancelled:
            await self.stream.publish(response)
        await self.stream.finish()


class Owner(Protocol):
    """Who gets what a child sends that is not an answer (a session or the pool)."""

    async def child_notification(self, link: Link, message: dict[str, Any]) -> None: ...

    async def child_request(self, link: Link, message: dict[str, Any]) -> None: ...

    async def child_restarted(self, link: Link) -> None: ...

    async def link_failed(self, link: Link) -> None: ...


class ExitLog:
    """Recent child exits of the whole bridge: crash-looping means too many in the window."""

    def __init__(self, settings: BridgeSettings) -> None:
        self._times: collections.deque[float] = collections.deque(maxlen=settings.crash_loop_exits)
        self._window = settings.crash_loop_window
        self.restarts = 0

    def record(self) -> None:
        self._times.append(time.monotonic())

    @property
    def crash_looping(self) -> bool:
        return (len(self._times) == self._times.maxlen
                and time.monotonic() - self._times[0] < self._window)


class Link:
    """The current child of a session or pool slot, with its pending requests."""

    def __init__(self, settings: BridgeSettings, label: str, owner: Owner, exits: ExitLog,
                 handshake: Callable[[Link], Awaitable[None]] | None = None) -> None:
        self.settings = settings
        self.label = label
        self.owner = owner
        self.exits = exits
        self.handshake = handshake
        self.child: Child | None = None
        self.ready = asyncio.Event()
        self.closed = False
        self.pending: dict[int, Exchange] = {}
        self._ids = itertools.count(1)
        self._progress: dict[str, Exchange] = {}
        self._failures = 0
        self._started_at = 0.0
        self._respawn: asyncio.Task[None] | None = None

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    async def start(self) -> None:
        """Spawn and hand-shake a child; raises UpstreamUnavailable/UpstreamProtocolError."""
        child = Child(self.settings, self.label, self._on_message, self._on_exit)
        self.child = child
        await child.start()
        self._started_at = time.monotonic()
        try:
            if self.handshake is not None:
                await asyncio.wait_for(self.handshake(self), self.settings.start_timeout)
        except (TimeoutError, UpstreamUnavailable, UpstreamProtocolError) as exc:
            stopped = (await child.stop()).reason == "stopped"
            if stopped and isinstance(exc, TimeoutError):
                # A hung start counts as a crash; a refused initialize (the client's params) not.
                self.exits.record()
            if isinstance(exc, TimeoutError):
                raise UpstreamUnavailable(f"the stdio server did not complete its handshake within "
                                          f"{self.settings.start_timeout:g} s") from None
            raise
        self.ready.set()

    async def start_or_retry(self) -> None:
        """Start a child now, or keep retrying with backoff in the background."""
        try:
            await self.start()
        except (UpstreamUnavailable, UpstreamProtocolError) as exc:
            logger.warning("child did not start", extra={"child": self.label, "error": exc.message})
            if self.child is None or self.child.pid is None:
                self.exits.record()  # never spawned: no exit handler counts this one
            if not self.closed and (self._respawn is None or self._respawn.done()):
                self._respawn = asyncio.create_task(self._restart())

    async def wait_ready(self) -> Child:
        if self.closed:
            raise UpstreamUnavailable("the stdio server's session has ended")
        if not self.ready.is_set():
            try:
                await asyncio.wait_for(self.ready.wait(), self.settings.start_timeout)
            except TimeoutError:
                raise UpstreamUnavailable("the stdio server is restarting; retry later") from None
        if self.closed or self.child is None:
            raise UpstreamUnavailable("the stdio server's session has ended")
        return self.child

    def new_exchange(self, client_id: ClientId | None, method: str, *, modern: bool = False) -> Exchange:
        loop = asyncio.get_running_loop()
        return Exchange(client_id=client_id, method=method,
                        stream=EventStream(max_buffered=self.settings.max_buffered_events),
                        future=loop.create_future(), modern=modern)

    async def request(self, message: dict[str, Any], exchange: Exchange, *,
                      wait: bool = True) -> None:
        """Send a request (its id and progress token remapped) for ``exchange`` to the child."""
        child = await self.wait_ready() if wait else self.child
        if child is None:
            raise UpstreamUnavailable("the stdio server is not running")
        if len(self.pending) >= self.settings.max_in_flight_per_child:
            raise BridgeBusy("too many requests in flight to this stdio server; retry later")
        bid = next(self._ids)
        out = {**message, "id": bid}
        params = message.get("params")
        if isinstance(params, dict):
            meta = params.get("_meta")
            if isinstance(meta, dict) and "progressToken" in meta:
                token = f"{self.label}.{bid}"
                exchange.progress_token = meta["progressToken"]
                self._progress[token] = exchange
                out["params"] = {**params, "_meta": {**meta, "progressToken": token}}
        exchange.bridge_id = bid
        self.pending[bid] = exchange
        try:
            child.send(out)
        except (BridgeBusy, UpstreamUnavailable):
            self._forget(bid)
            raise

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """A request of the bridge's own (handshake); the result or UpstreamProtocolError."""
        exchange = self.new_exchange(None, method)
        await self.request({"jsonrpc": "2.0", "method": method, "params": params}, exchange, wait=False)
        answer = await exchange.future
        if "error" in answer:
            err = answer["error"]
            raise UpstreamProtocolError(f"{method} failed: {err.get('message')}",
                                        data={"upstream_error": err})
        result = answer.get("result")
        return result if isinstance(result, dict) else {}

    def notify(self, message: dict[str, Any]) -> None:
        if self.child is None or not self.child.alive:
            raise UpstreamUnavailable("the stdio server is not running")
        self.child.send(message)

    async def cancel(self, exchange: Exchange, reason: str | None = None) -> None:
        """Tell the child the request is cancelled (with the child's id) and forget it: a server
        should not answer a cancelled request, and a late answer is dropped as unknown."""
        if exchange.future.done() or exchange.bridge_id is None:
            return
        exchange.cancelled = True
        self._forget(exchange.bridge_id)
        params: dict[str, Any] = {"requestId": exchange.bridge_id}
        if reason:
            params["reason"] = reason
        try:
            self.notify({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params})
        except (BridgeBusy, UpstreamUnavailable):
            logger.info("could not forward a cancellation", extra={"child": self.label})
        cancelled = {"code": REQUEST_CANCELLED, "message": "request cancelled"}
        await exchange.finish(error_response(None, cancelled))

    def _forget(self, bid: int) -> Exchange | None:
        exchange = self.pending.pop(bid, None)
        if exchange is not None:
            for token, owner in list(self._progress.items()):
                if owner is exchange:
                    del self._progress[token]
        return exchange

    # ---- from the child -------------------------------------------------------------------------

    def _on_message(self, message: dict[str, Any]) -> None:
        asyncio.get_running_loop().create_task(self._dispatch(message))

    async def _dispatch(self, message: dict[str, Any]) -> None:
        if "method" not in message:
            rid = message.get("id")
            exchange = self._forget(rid) if isinstance(rid, int) else None
            if exchange is None:
                logger.info("dropped an answer to an unknown request", extra={"child": self.label})
                return
            await exchange.finish(message)
            return
        if "id" in message:
            await self.owner.child_request(self, message)
            return
        if message.get("method") == "notifications/progress":
            params = message.get("params")
            token = params.get("progressToken") if isinstance(params, dict) else None
            exchange = self._progress.get(token) if isinstance(token, str) else None
            if exchange is not None and isinstance(params, dict):
                params = {**params, "progressToken": exchange.progress_token}
                await exchange.publish({**message, "params": params})
            return
        await self.owner.child_notification(self, message)

    def _on_exit(self, child: Child, info: ExitInfo) -> None:
        asyncio.get_running_loop().create_task(self._exited(child, info))

    async def _exited(self, child: Child, info: ExitInfo) -> None:
        if child is not self.child:
            return
        self.ready.clear()
        pending = list(self.pending.values())
        self.pending.clear()
        self._progress.clear()
        for exchange in pending:
            data = {"reason": "upstream_exited", "exit_status": info.status, "exit": info.reason}
            if info.reason == "line_too_long":
                data["reason"] = "upstream_protocol_error"
            await exchange.finish(error_response(exchange.bridge_id, {
                "code": INTERNAL_ERROR, "message": "the stdio server exited during the request",
                "data": data}), http_status=502 if exchange.modern else 200)
        if self.closed or info.reason == "stopped":
            return
        self.exits.record()
        if self._respawn is None or self._respawn.done():
            self._respawn = asyncio.create_task(self._restart())

    async def _restart(self) -> None:
        if time.monotonic() - self._started_at >= STABLE_SECONDS:
            self._failures = 0
        while not self.closed:
            delay = min(self.settings.restart_backoff * (2 ** self._failures),
                        self.settings.restart_backoff_max)
            self._failures += 1
            await asyncio.sleep(delay)  # backoff between respawns, not a readiness wait
            if self.closed:
                return
            try:
                await self.start()
            except (UpstreamUnavailable, UpstreamProtocolError) as exc:
                logger.warning("restart failed", extra={"child": self.label, "error": exc.message,
                                                        "failures": self._failures})
                if self._failures >= self.settings.max_failed_restarts and self.owner is not None:
                    await self.owner.link_failed(self)
                    if self.closed:
                        return
                continue
            self.exits.restarts += 1
            logger.info("child restarted",
                        extra={"child": self.label, "pid": self.child.pid if self.child else None})
            await self.owner.child_restarted(self)
            return

    async def close(self) -> None:
        self.closed = True
        self.ready.set()  # waiters wake and see the link closed
        if self._respawn is not None and self._respawn is not asyncio.current_task():
            self._respawn.cancel()  # (when the restart loop itself gives up, it just returns)
        if self.child is not None:
            await self.child.stop()
        for exchange in list(self.pending.values()):
            await exchange.finish(error_response(None, {
                "code": INTERNAL_ERROR, "message": "the bridge is stopping the stdio server",
                "data": {"reason": "upstream_unavailable"}}), http_status=503)
        self.pending.clear()
