"""GET stream fan-in (protocol 2025-06-18 / 2025-11-25): one client GET becomes one GET per
upstream session, through the per-server routes.

What an upstream sends on its stream reaches the client as follows:
- ``notifications/{tools,prompts,resources}/list_changed``: once per window (100 ms), whichever
  server sent it, since the client re-lists the merged list anyway;
- ``notifications/resources/updated``: its URI prefixed (``<server>+<uri>``);
- a server-to-client request (sampling, elicitation, roots/list, ping): its id becomes
  ``naming.encode_request_id(server, id)``, so the client's answer finds its way back;
- other notifications as they are; responses (none belong on a GET stream) are dropped.

An upstream stream that ends or fails is reopened with back-off and ``Last-Event-ID``; a server
that was down is joined late once it answers. A route that refuses the caller, a server without
a GET stream (405) or an upstream session that is gone (404) ends that server's leg only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import orjson

from gateway.aggregate.naming import encode_request_id, prefix_uri
from gateway.errors import GatewayError
from gateway.jsonrpc import validate_message
from gateway.sse import SseError, SseParser
from mcp_aggregator.errors import SESSION_LOST, UpstreamDenied, UpstreamFailed
from mcp_aggregator.upstreams import LegContext, Upstreams

logger = logging.getLogger(__name__)

LIST_CHANGED = frozenset({"notifications/tools/list_changed", "notifications/prompts/list_changed",
                          "notifications/resources/list_changed"})
RESOURCE_UPDATED = "notifications/resources/updated"
MAX_QUEUED = 1000

Join = Callable[[str], Awaitable[str | None]]


class ListChangedDedup:
    """Lets one ``list_changed`` of each kind through per ``window`` seconds."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._last: dict[str, float] = {}

    def admit(self, method: str) -> bool:
        now = self._clock()
        last = self._last.get(method)
        if last is not None and now - last < self.window:
            return False
        self._last[method] = now
        return True


def client_message(server: str, message: dict[str, Any]) -> dict[str, Any] | None:
    """What one message of ``server``'s stream becomes on the client's stream (None: dropped)."""
    method = message.get("method")
    if not isinstance(method, str):
        return None
    out = dict(message)
    if "id" in message:
        out["id"] = encode_request_id(server, message["id"])
    elif method == RESOURCE_UPDATED:
        params = message.get("params")
        if isinstance(params, dict) and isinstance(params.get("uri"), str):
            out["params"] = {**params, "uri": prefix_uri(server, params["uri"])}
    return out


class FanIn:
    """The upstream legs of one client GET, feeding one queue."""

    def __init__(self, upstreams: Upstreams, ctx: LegContext, ids: dict[str, str | None],
                 join: Join, *, window: float, backoff: float, backoff_max: float) -> None:
        self.upstreams = upstreams
        self.ctx = ctx
        self.ids = ids
        self.join = join
        self.dedup = ListChangedDedup(window)
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(MAX_QUEUED)
        # Set once every upstream stream is open (tests and logs wait on it).
        self.open: dict[str, asyncio.Event] = {server: asyncio.Event() for server in ids}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, servers: Collection[str]) -> None:
        self._tasks = [asyncio.create_task(self._follow(server)) for server in servers]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _follow(self, server: str) -> None:
        last_event_id: str | None = None
        delay = self.backoff
        while True:
            try:
                sid = self.ids.get(server)
                if sid is None:
                    sid = await self.join(server)
                    self.ids[server] = sid
                if sid is not None:
                    async with self.upstreams.stream(server, self.ctx, sid, last_event_id) as resp:
                        self.open[server].set()
                        delay = self.backoff
                        last_event_id = await self._pump(server, resp.content.iter_any(), last_event_id)
                    self.open[server].clear()
            except UpstreamDenied:
                logger.info("server %s refused the caller's GET stream", server, extra={"server": server})
                return
            except UpstreamFailed as exc:
                self.open[server].clear()
                if exc.status == 405 or exc.reason == SESSION_LOST:
                    logger.info("no GET stream from server %s: %s", server, exc.message,
                                extra={"server": server, "reason": exc.reason})
                    return
                logger.info("GET stream of server %s interrupted: %s", server, exc.message,
                            extra={"server": server, "reason": exc.reason})
            await asyncio.sleep(delay)  # back-off before reopening the upstream stream
            delay = min(delay * 2, self.backoff_max)

    async def _pump(self, server: str, chunks: Any, last_event_id: str | None) -> str | None:
        parser = SseParser()
        try:
            async for chunk in chunks:
                for event in parser.feed(chunk):
                    if event.id:
                        last_event_id = event.id
                    if not event.data:
                        continue
                    try:
                        message = validate_message(orjson.loads(event.data)).raw
                    except (orjson.JSONDecodeError, GatewayError):
                        logger.warning("dropped an event of server %s that is not JSON-RPC", server)
                        continue
                    out = client_message(server, message)
                    if out is None:
                        continue
                    if out["method"] in LIST_CHANGED and "id" not in out \
                            and not self.dedup.admit(out["method"]):
                        continue
                    await self.queue.put(out)
        except SseError as exc:
            logger.warning("GET stream of server %s broke: %s", server, exc.message)
        return last_event_id
