"""Who may call whom on the inner hops (docs/inner-tls.md): the TLS handshake proves a client
holds a certificate of the inner CA; this checks which component that certificate names (its
first DNS name, ``<identity>.<domain>``) against the identities the service accepts
(``gateway.inner_tls.PeerPolicy``), so the aggregator's or ext_authz's certificate cannot be used
to call ext_authz's /check, ext_proc, or a server with an assertion minted for another request.

The verdict depends on the connection's certificate only: an aiohttp service computes it once
per connection (then a dictionary lookup per request); a grpc.aio service reads the DNS names
gRPC already decoded at the handshake (``peer_dns`` of the call's auth context). A refusal is
403 with a JSON-RPC error (``data.reason`` ``peer_not_allowed``) or gRPC PERMISSION_DENIED, and
one warning line naming the peer's certificate."""

from __future__ import annotations

import inspect
import logging
import ssl
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.errors import FORBIDDEN
from gateway.inner_tls import (
    PEER_NOT_ALLOWED,
    InnerTlsError,
    PeerPolicy,
    PeerVerdict,
    ReloadingTls,
)

logger = logging.getLogger(__name__)

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
# gRPC's auth context key holding the DNS subject alternative names, in certificate order.
GRPC_DNS_NAMES = "peer_dns"
_REFUSAL = orjson.dumps({"jsonrpc": "2.0", "id": None, "error": {
    "code": FORBIDDEN, "message": "this component does not accept calls from your certificate",
    "data": {"reason": PEER_NOT_ALLOWED}}})


def _log_refusal(verdict: PeerVerdict, service: str, what: str) -> None:
    logger.warning("refused a call from %s to %s: its inner certificate may not call it",
                   verdict.peer or "a certificate without a DNS name", what,
                   extra={"reason": PEER_NOT_ALLOWED, "peer": verdict.peer, "service": service})


class PeerGate:
    """The per-connection check of an aiohttp service (its middleware, or called directly by a
    low-level ``web.Server`` handler)."""

    def __init__(self, policy: PeerPolicy, service: str) -> None:
        self.policy = policy
        self.service = service
        # One verdict per open connection, keyed by the connection's TLS object (an entry goes
        # with it): uvloop's transports cannot be weakly referenced, ssl.SSLObject can, and each
        # connection has its own under both event loops.
        self._verdicts: weakref.WeakKeyDictionary[ssl.SSLObject, PeerVerdict] = \
            weakref.WeakKeyDictionary()

    def verdict(self, request: web.BaseRequest) -> PeerVerdict:
        transport = request.transport
        if transport is None:  # the connection is gone
            return PeerVerdict("", False)
        tls = transport.get_extra_info("ssl_object")
        if not isinstance(tls, ssl.SSLObject):  # not a TLS connection: no certificate, refused
            return self.policy.verdict_for_peercert(None)
        verdict = self._verdicts.get(tls)
        if verdict is None:
            verdict = self.policy.verdict_for_peercert(tls.getpeercert())
            self._verdicts[tls] = verdict
        return verdict

    def refusal(self, request: web.BaseRequest) -> web.Response | None:
        """None when the connection's certificate may make this request, else the 403."""
        verdict = self.verdict(request)
        if verdict.admits(request.method, request.path):
            return None
        _log_refusal(verdict, self.service, f"{request.method} {request.path[:200]}")
        return web.Response(status=403, body=_REFUSAL, content_type="application/json")

    def middleware(self) -> Middleware:
        @web.middleware
        async def check_peer(request: web.Request, handler: Handler) -> web.StreamResponse:
            refused = self.refusal(request)
            return refused if refused is not None else await handler(request)

        return check_peer


def guard_app(app: web.Application, tls: ReloadingTls | None, service: str) -> None:
    """Under inner TLS (``tls``; None: plain text) check every request's certificate before
    anything else runs. Call before the app is started."""
    if tls is None:
        return
    if tls.peers is None:
        raise InnerTlsError("inner TLS without the accepted callers (server_tls_from_env(callers=))")
    app.middlewares.insert(0, PeerGate(tls.peers, service).middleware())


class PeerInterceptor(grpc.aio.ServerInterceptor):
    """Refuses (PERMISSION_DENIED) any call whose client certificate is not of a caller the
    policy accepts; health checks included (Envoy's come with its certificate)."""

    def __init__(self, policy: PeerPolicy, service: str) -> None:
        self.policy = policy
        self.service = service
        # method -> (the service's handler, its guarded form): built once per method.
        self._guarded: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return None
        method = handler_call_details.method
        cached = self._guarded.get(method)
        if cached is not None and cached[0] is handler:
            return cast("grpc.RpcMethodHandler[_Req, _Resp]", cached[1])
        guarded = self._guard(handler, method)
        self._guarded[method] = (handler, guarded)
        return cast("grpc.RpcMethodHandler[_Req, _Resp]", guarded)

    async def check(self, context: Any, method: str) -> None:
        """Abort the call unless its peer is accepted."""
        names = context.auth_context().get(GRPC_DNS_NAMES) or ()
        first = names[0].decode("ascii", "replace") if names else None
        verdict = self.policy.verdict(first)
        if not verdict.allowed:
            _log_refusal(verdict, self.service, method)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"{PEER_NOT_ALLOWED}: this component does not accept calls from "
                                f"your certificate")

    def _guard(self, handler: Any, method: str) -> Any:
        kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
                    if getattr(handler, k) is not None)
        inner = getattr(handler, kind)
        check = self.check
        if inspect.isasyncgenfunction(inner):
            async def streaming(request: Any, context: Any) -> Any:
                await check(context, method)
                async for item in inner(request, context):
                    yield item

            return handler._replace(**{kind: streaming})

        async def call(request: Any, context: Any) -> Any:
            await check(context, method)
            result = inner(request, context)
            return await result if inspect.isawaitable(result) else result

        return handler._replace(**{kind: call})
