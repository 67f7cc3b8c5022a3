"""What a handler sees of its request: identity, protocol, cancellation, and the way back.

Messages a handler sends (progress, logs, sampling and elicitation requests) go out on the SSE
stream of the request that is being handled; the transport turns the answer into SSE the first
time one is sent. A client that accepts only JSON gets them on its session's GET stream instead,
or not at all.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Protocol

from gateway.caller import Caller
from mcp_servers.core.errors import ClientRequestFailed
from mcp_servers.core.settings import LOG_LEVELS
from mcp_servers.core.streams import EventStream, new_token

if TYPE_CHECKING:
    from mcp_servers.core.session import Session

logger = logging.getLogger(__name__)

LIST_KINDS = ("tools", "resources", "prompts")
# From 2026-07-28 on, log delivery is a per-request opt-in (``_meta`` logLevel); absent means off.
LOG_OFF = "off"


class Channel:
    """The way from one request's handler back to the client."""

    def __init__(self, stream: EventStream, *, sse_allowed: bool, fallback: EventStream | None,
                 back_channel: bool = True) -> None:
        self.stream = stream
        self.sse_allowed = sse_allowed
        self.fallback = fallback
        # 2026-07-28 exchanges have no back-channel: the server cannot send requests to the client.
        self.back_channel = back_channel

    @property
    def can_request(self) -> bool:
        if not self.back_channel:
            return False
        return self.sse_allowed or (self.fallback is not None and self.fallback.attached)

    async def send(self, message: dict[str, Any]) -> bool:
        if self.sse_allowed:
            await self.stream.publish(message)
            return True
        if self.fallback is not None:
            await self.fallback.publish(message)
            return True
        logger.debug("dropped %s: client accepts no SSE and has no GET stream", message.get("method"))
        return False

    async def detach(self) -> None:
        if self.sse_allowed:
            await self.stream.detach()


class ServerHooks(Protocol):
    """What a context needs from the server: broadcasting and client-request bookkeeping."""

    async def resource_updated(self, uri: str, origin: Session | None, channel: Channel) -> None: ...

    async def list_changed(self, kind: str, origin: Session | None, channel: Channel) -> None: ...

    async def client_request(self, channel: Channel, session: Session | None, method: str,
                             params: dict[str, Any]) -> dict[str, Any]: ...


class ToolContext:
    """Per-request context handed to every tool, resource, prompt and completion handler."""

    def __init__(self, *, request_id: str | int | None, caller: Caller | None, protocol_version: str,
                 session: Session | None, client_capabilities: dict[str, Any],
                 channel: Channel, hooks: ServerHooks, meta: dict[str, Any],
                 log_level: str | None, cancelled: asyncio.Event | None = None,
                 http_request_id: str | None = None, decision_id: str | None = None,
                 audit_redact: Any = None) -> None:
        self.request_id = request_id
        # The decision's audit_redact obligation from the verified assertion (None: none): the
        # fields this server's audit entry of the call leaves out.
        self.audit_redact = audit_redact
        # x-request-id (Envoy's) and the gateway's x-mcp-decision-id: what logs and audit join on.
        self.http_request_id = http_request_id
        self.decision_id = decision_id
        # Who the gateway says the request acts for (gateway.caller); None without a gateway.
        self.caller = caller
        self.protocol_version = protocol_version
        self.session = session
        self.client_capabilities = client_capabilities
        self.meta = meta
        self.cancelled = cancelled or asyncio.Event()
        self._channel = channel
        self._hooks = hooks
        self._log_level = log_level

    @property
    def user(self) -> str | None:
        return self.caller.sub if self.caller is not None else None

    @property
    def issuer(self) -> str | None:
        return self.caller.issuer if self.caller is not None else None

    @property
    def tenant(self) -> str | None:
        return self.caller.tenant if self.caller is not None else None

    @property
    def roles(self) -> tuple[str, ...] | None:
        return self.caller.roles if self.caller is not None else None

    @property
    def client_id(self) -> str | None:
        return self.caller.client_id if self.caller is not None else None

    @property
    def session_id(self) -> str | None:
        return self.session.id if self.session is not None else None

    @property
    def progress_token(self) -> str | int | None:
        token = self.meta.get("progressToken")
        return token if isinstance(token, (str, int)) and not isinstance(token, bool) else None

    async def progress(self, progress: float, total: float | None = None,
                       message: str | None = None) -> None:
        """Send notifications/progress; a no-op unless the request carried a progressToken."""
        token = self.progress_token
        if token is None:
            return
        params: dict[str, Any] = {"progressToken": token, "progress": progress}
        if total is not None:
            params["total"] = total
        if message is not None:
            params["message"] = message
        await self._channel.send({"jsonrpc": "2.0", "method": "notifications/progress", "params": params})

    async def log(self, level: str, data: Any, logger: str | None = None) -> None:
        """Send notifications/message if ``level`` passes the client's logging/setLevel threshold."""
        if level not in LOG_LEVELS:
            raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LOG_LEVELS)}")
        threshold = self.session.log_level if self.session is not None else self._log_level
        if threshold == LOG_OFF:
            return
        if threshold is not None and LOG_LEVELS.index(level) < LOG_LEVELS.index(threshold):
            return
        params: dict[str, Any] = {"level": level, "data": data}
        if logger is not None:
            params["logger"] = logger
        await self._channel.send({"jsonrpc": "2.0", "method": "notifications/message", "params": params})

    async def sample(self, messages: list[dict[str, Any]], max_tokens: int,
                     **kwargs: Any) -> dict[str, Any]:
        """sampling/createMessage round trip; extra keyword arguments are sent as params."""
        if "sampling" not in self.client_capabilities:
            raise ClientRequestFailed("the client does not support sampling")
        params = {"messages": messages, "maxTokens": max_tokens, **kwargs}
        return await self._hooks.client_request(self._channel, self.session,
                                                 "sampling/createMessage", params)

    async def elicit(self, message: str, requested_schema: dict[str, Any]) -> dict[str, Any]:
        """elicitation/create round trip (form mode); returns the client's result."""
        if "elicitation" not in self.client_capabilities:
            raise ClientRequestFailed("the client does not support elicitation")
        params = {"message": message, "requestedSchema": requested_schema}
        return await self._hooks.client_request(self._channel, self.session, "elicitation/create", params)

    async def notify_resource_updated(self, uri: str) -> None:
        await self._hooks.resource_updated(uri, self.session, self._channel)

    async def notify_list_changed(self, kind: str) -> None:
        if kind not in LIST_KINDS:
            raise ValueError(f"kind must be one of {LIST_KINDS}, not {kind!r}")
        await self._hooks.list_changed(kind, self.session, self._channel)

    async def close_stream(self) -> None:
        """Close the request's SSE connection now; the client resumes with GET + Last-Event-ID.

        SEP-1699 polling: lets a long call run without holding a connection open.
        """
        await self._channel.detach()


def new_request_id() -> str:
    return "srv-" + new_token(12)
