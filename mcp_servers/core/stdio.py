"""MCP over stdio: newline-delimited JSON-RPC on stdin and stdout, one connection per process.

The connection speaks one protocol era, fixed by its first request (as the official SDKs do):
- ``initialize`` makes it one session of 2025-06-18 / 2025-11-25 (``initialize`` →
  ``notifications/initialized`` → requests); a 2026-07-28 envelope afterwards is -32600.
- a request whose ``params._meta`` carries protocol 2026-07-28 makes it stateless: every request
  carries its own version and client capabilities; ``initialize`` afterwards is -32022.
``ping`` and ``server/discover`` before either are answered without fixing the era.

Requests are answered by the same code as over HTTP (:meth:`Transport.answer`: dispatch, audit,
metrics). Progress, log messages, list changes and the server's own requests (sampling,
elicitation) are written to stdout in order with the answers; stdout carries JSON-RPC only (the
process's fd 1 is pointed at stderr, where the logs go). EOF on stdin ends the process: requests
in flight finish (within ``shutdown_timeout``), then it exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator
from typing import IO, Any

import orjson

from gateway.errors import GatewayError, InvalidRequest, PayloadTooLarge
from gateway.jsonrpc import Message, best_effort_id, error_response, parse_message, result_response
from gateway.mcp import LATEST_HANDSHAKE_VERSION, META_PROTOCOL_VERSION, MODERN_VERSION
from gateway.telemetry.audit import AuditWriter
from gateway.telemetry.logs import bind_request
from mcp_servers.core.context import Channel, ToolContext
from mcp_servers.core.errors import ClientRequestFailed
from mcp_servers.core.server import MCPServer
from mcp_servers.core.session import Session
from mcp_servers.core.settings import ServerSettings
from mcp_servers.core.streams import EventStream, new_token
from mcp_servers.core.transport import (
    ANONYMOUS,
    Transport,
    UnsupportedVersion,
    handshake_params,
    modern_envelope,
    request_meta,
    track_inflight,
)

logger = logging.getLogger(__name__)

HANDSHAKE = "handshake"
MODERN = "modern"
READ_CHUNK = 65536


def claim_stdout() -> IO[bytes]:
    """A private handle on the process's stdout for JSON-RPC; fd 1 then points at stderr, so a
    stray ``print`` (ours or a library's) lands in the logs, never in the protocol stream."""
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    return out


class _Output:
    """Writes one JSON-RPC message per line; a closed stdout ends the connection."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self.closed = asyncio.Event()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.connect_write_pipe(
                lambda: asyncio.streams.FlowControlMixin(loop), self._raw)
        except ValueError:  # a regular file: plain blocking writes
            return
        self._writer = asyncio.StreamWriter(transport, protocol, None, loop)

    async def send(self, message: dict[str, Any]) -> None:
        if self.closed.is_set():
            return
        data = orjson.dumps(message) + b"\n"
        async with self._lock:
            try:
                if self._writer is not None:
                    self._writer.write(data)
                    await self._writer.drain()
                else:
                    self._raw.write(data)
                    self._raw.flush()
            except (ConnectionError, OSError) as exc:
                logger.info("stdout closed: %s", exc)
                self.closed.set()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()  # every write was drained: nothing is left in its buffer
        else:
            with contextlib.suppress(OSError):
                self._raw.close()


class _StdoutChannel(Channel):
    """A request's way back to the client: straight to stdout, in order with its answer."""

    def __init__(self, out: _Output, *, back_channel: bool) -> None:
        super().__init__(EventStream(max_buffered=1), sse_allowed=True, fallback=None,
                         back_channel=back_channel)
        self._out = out

    async def send(self, message: dict[str, Any]) -> bool:
        await self._out.send(message)
        return True

    async def detach(self) -> None:
        """Nothing to close: stdio has one connection for the whole session."""


async def _open_stdin(limit: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), sys.stdin)
    except ValueError:  # a regular file: read it in a thread
        def pump() -> None:
            fd = sys.stdin.fileno()
            while chunk := os.read(fd, READ_CHUNK):
                loop.call_soon_threadsafe(reader.feed_data, chunk)
            loop.call_soon_threadsafe(reader.feed_eof)
        threading.Thread(target=pump, name="stdin", daemon=True).start()
    return reader


async def _lines(reader: asyncio.StreamReader) -> AsyncIterator[bytes | None]:
    """Lines without their newline until EOF; ``None`` for a line longer than the reader's limit
    (skipped whole)."""
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                yield exc.partial
            return
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)
            while True:
                try:
                    await reader.readuntil(b"\n")
                    break
                except asyncio.LimitOverrunError as more:
                    await reader.readexactly(more.consumed)
                except asyncio.IncompleteReadError:
                    break
            yield None
            continue
        if line.strip():
            yield line.rstrip(b"\r\n")


class StdioConnection:
    """The protocol state of one stdio connection: its era, its session, its requests in flight."""

    def __init__(self, server: MCPServer, settings: ServerSettings, out: _Output) -> None:
        self.server = server
        self.settings = settings
        # The HTTP transport's request answering, client-request bookkeeping and notifications.
        self.transport = Transport(server, settings)
        self.out = out
        self.era: str | None = None
        self.session: Session | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def receive(self, line: bytes | None) -> None:
        """Handle one line from stdin; every refused request is answered with a JSON-RPC error."""
        limit = self.settings.max_body_bytes
        try:
            if line is None:
                raise PayloadTooLarge(f"a line exceeds the limit of {limit} bytes", data={"limit": limit})
            msg = parse_message(line, max_bytes=limit, max_depth=self.settings.max_depth)
        except GatewayError as exc:
            logger.info("refused a line: %s", exc.message, extra={"reason": exc.code})
            await self.out.send(error_response(best_effort_id(line or b""), exc.to_rpc_error()))
            return
        try:
            await self._route(msg)
        except GatewayError as exc:
            logger.info("refused %s: %s", msg.method, exc.message, extra={"reason": exc.code})
            if msg.kind == "request":
                await self.out.send(error_response(msg.id, exc.to_rpc_error()))

    async def _route(self, msg: Message) -> None:
        if msg.kind == "response":
            self.transport.client_response(msg, self.session)
            return
        if msg.method == "initialize":
            await self._initialize(msg)
            return
        if self.era == MODERN or (self.era is None and _is_modern(msg)):
            if msg.kind == "notification":
                return  # 2026-07-28 has no client-to-server notifications
            version, capabilities = modern_envelope(msg, None, header=False)
            self.era = MODERN
            self._start(msg, session=None, version=version, modern=True, capabilities=capabilities)
            return
        session = self.session
        if session is None:
            if msg.kind == "notification":
                return
            if msg.method not in ("ping", "server/discover"):
                raise InvalidRequest(f"send initialize first, or use protocol {MODERN_VERSION} with "
                                     "params._meta on every request", code="session_required")
            self._start(msg, session=None, version=LATEST_HANDSHAKE_VERSION, modern=False, capabilities={})
            return
        if _is_modern(msg):
            raise InvalidRequest(f"this connection was initialized with protocol "
                                 f"{session.protocol_version}; {MODERN_VERSION} requests need a new one")
        if msg.kind == "notification":
            await self.transport.notification(msg, session)
            return
        session.initialized = True  # as over HTTP: a request racing notifications/initialized is fine
        self._start(msg, session=session, version=session.protocol_version, modern=False,
                    capabilities=session.client_capabilities)

    async def _initialize(self, msg: Message) -> None:
        if msg.kind != "request":
            raise InvalidRequest("initialize must be a request with an id")
        if self.era == MODERN:
            raise UnsupportedVersion(f"this connection speaks protocol {MODERN_VERSION}, which has no "
                                     "initialize; start a new connection for a session")
        if self.session is not None:
            raise InvalidRequest("this connection is initialized already")
        version, capabilities, info = handshake_params(msg.params)
        self.session = await self.transport.sessions.create(
            owner=ANONYMOUS, protocol_version=version, client_capabilities=capabilities, client_info=info)
        self.era = HANDSHAKE
        logger.info("session created", extra={"session": self.session.id[:8], "protocol_version": version})
        await self.out.send(result_response(msg.id, self.server.initialize_result(version)))

    def _start(self, msg: Message, *, session: Session | None, version: str, modern: bool,
               capabilities: dict[str, Any]) -> None:
        rid = msg.id
        assert rid is not None
        meta, log_level = request_meta(msg, modern)
        cancelled = asyncio.Event()
        ctx = ToolContext(request_id=rid, caller=None, protocol_version=version, session=session,
                          client_capabilities=capabilities,
                          channel=_StdoutChannel(self.out, back_channel=not modern), hooks=self.transport,
                          meta=meta, log_level=log_level, cancelled=cancelled)
        task = asyncio.create_task(self._respond(msg, ctx, modern, cancelled))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if session is not None:
            track_inflight(session, rid, task, cancelled)

    async def _respond(self, msg: Message, ctx: ToolContext, modern: bool, cancelled: asyncio.Event) -> None:
        with bind_request(request_id=new_token(8)):
            body, _status = await self.transport.answer(msg, ctx, modern)
        # A cancelled request gets no answer: the client already moved on.
        if not cancelled.is_set():
            await self.out.send(body)

    async def close(self) -> None:
        """Let requests in flight finish (bounded), then end the session."""
        for pending in list(self.transport.pending.values()):
            if not pending.future.done():
                pending.future.set_exception(ClientRequestFailed(
                    f"stdin closed before the client answered {pending.method}"))
        if self._tasks:
            _done, late = await asyncio.wait(set(self._tasks), timeout=self.settings.shutdown_timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        await self.transport.close()


def _is_modern(msg: Message) -> bool:
    meta = msg.params.get("_meta")
    version = meta.get(META_PROTOCOL_VERSION) if isinstance(meta, dict) else None
    return isinstance(version, str) and version >= MODERN_VERSION


async def serve_stdio(server: MCPServer, settings: ServerSettings, stop: asyncio.Event,
                      protocol_out: IO[bytes], audit: AuditWriter | None = None) -> None:
    """Serve one connection on stdin / ``protocol_out`` until EOF or ``stop``; the server's
    lifespans (and the audit trail) are open around it."""
    out = _Output(protocol_out)
    await out.open()
    connection = StdioConnection(server, settings, out)
    async with contextlib.AsyncExitStack() as stack:
        if audit is not None:
            await stack.enter_async_context(
                contextlib.asynccontextmanager(connection.transport.recorder.run_audit)(audit))
        for lifespan in server.lifespans:
            await stack.enter_async_context(contextlib.asynccontextmanager(lifespan)())
        reader = await _open_stdin(settings.max_body_bytes + 1)
        logger.info("serving on stdio", extra={"server": server.name})

        async def read() -> None:
            async for line in _lines(reader):
                await connection.receive(line)
                if out.closed.is_set():
                    return

        waits = {asyncio.create_task(read()), asyncio.create_task(stop.wait()),
                 asyncio.create_task(out.closed.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            await connection.close()
            await out.close()
    logger.info("stopped", extra={"server": server.name})
