"""The Envoy ``envoy.service.auth.v3.Authorization`` servicer (grpc.aio), and the decision core
both transports share (:meth:`AuthorizationServicer.decide`: an :class:`HttpRequest` in, a
:class:`Verdict` out; ``ext_authz.http_front`` serves the same core over Envoy's HTTP mode).

Order of checks, cheapest refusal first: known server -> token (401) -> body (400/413) -> rate
limit (429) -> policy (403) -> tool catalog for ``tools/call`` (quarantine 403, arguments 400,
catalog not loaded 503) -> audit entry on disk for audited methods (503 if it cannot be written).
The aggregate endpoints (``/mcp``, ``/mcp/<virtual>``; ``ext_authz.aggregate``) run the same
checks: a message aimed at one server is decided as on ``/mcp/<server>`` with the real server and
tool (plus ``input.mcp.via``) after its sealed session id is opened (another owner's, an altered
or an ended one: 404), and Envoy routes it there by ``x-mcp-route``; anything else is routed to
the aggregator, undecided here because each of its calls to a server is decided on that server's
route.

Every path ends in exactly one decision log line, one metrics update and one span. Anything
unexpected is answered 500 (deny): the service fails closed and keeps running.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from opentelemetry.trace import INVALID_SPAN, Span

from ext_authz.aggregate import FastPath, ToAggregator, UnknownTarget, UpstreamNotInSession, resolve
from ext_authz.catalog import CatalogGate
from ext_authz.decision_log import DecisionRecord, log_decision
from ext_authz.errors import (
    AuthError,
    CatalogNotLoaded,
    CatalogUnavailable,
    InvalidToken,
    KeysUnavailable,
    PolicyDenied,
    RateLimited,
    RateLimitUnavailable,
    SqlParserBusy,
    UnknownServer,
)
from ext_authz.front import DecisionCore
from ext_authz.jwt import TokenVerifier
from ext_authz.ratelimit import RateLimiter, limits_for
from ext_authz.request import (
    MCP_PATH_PREFIX,
    PARTIAL_BODY_HEADER,
    HttpRequest,
    bearer_token,
    check_query,
    http_request,
    policy_input,
    server_of,
)
from ext_authz.response import (
    Verdict,
    bearer_challenge,
    error_body,
    ext_proc_metadata,
    identity_headers,
    mask_types,
    needs_inspection,
)
from ext_authz.sessions import (
    AGGREGATE_SERVER,
    MAX_SESSION_ID_CHARS,
    NOT_FOUND_MESSAGE,
    SESSION_HEADER,
    MemorySessionStore,
    SessionBinder,
    SessionNotFound,
    SessionStoreUnavailable,
    session_id_of,
    visible_ascii,
)
from ext_authz.settings import Settings
from gateway.aggregate.session_token import (
    MAX_TOKEN_CHARS,
    AggregateSession,
    InvalidSessionId,
    SessionSealer,
)
from gateway.aggregate.views import View, view_of_path
from gateway.assertion import CATALOG_CALLER, MAX_REDACT_FIELDS, AssertionSigner, signer_for
from gateway.caller import Caller, SessionOwner
from gateway.credentials.provider import CredentialProvider
from gateway.errors import GatewayError, InvalidRequest, PayloadTooLarge, UnsupportedEncoding
from gateway.jsonrpc import Message, best_effort_id, parse_message
from gateway.mcp import McpContext, extract_context
from gateway.policy.input import VIA_DIRECT
from gateway.telemetry import (
    AuditEntry,
    AuditUnavailable,
    AuditWriter,
    args_digest,
    bind,
    current_trace_ids,
    metrics,
    start_server_span,
    unbind,
)
from gateway.telemetry.audit import AUDITED_METHODS, redact_entry
from gateway.wire import (
    AGGREGATE_HEADERS,
    AGGREGATOR_ROUTE,
    ASSERTION_HEADER,
    IDENTITY_HEADERS,
    INSPECT_HEADER,
    ROUTE_HEADER,
    VIEW_HEADER,
)

logger = logging.getLogger(__name__)

# Methods that carry a JSON-RPC message; GET (SSE stream) and DELETE (session end) do not.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_TRACE_HEADERS = ("traceparent", "tracestate")
SPAN_NAME = "ext_authz.check"
# SQL parses running or waiting on the SQL thread; the worst parse within the SQL bounds is
# ~45 ms, so the last of them is answered well inside Envoy's ext_authz timeout.
MAX_SQL_QUEUE = 4
# Bounded well below Envoy's ext_authz timeout (500 ms by default).
CATALOG_WAIT_SECONDS = 0.25
SERVICE = "ext_authz"


class PolicyDecision(Protocol):
    """The shape of ``gateway.policy.Decision``."""

    @property
    def allow(self) -> bool: ...
    @property
    def reason(self) -> str: ...
    @property
    def http_status(self) -> int: ...
    @property
    def headers(self) -> dict[str, str]: ...
    @property
    def obligations(self) -> dict[str, Any]: ...
    @property
    def missing_scope(self) -> str | None: ...
    @property
    def error_code(self) -> str | None: ...


class PolicyEngine(Protocol):
    """The shape of ``gateway.policy.PolicyEngine`` that the servicer uses."""

    @property
    def revision(self) -> str | None: ...

    async def decide(self, policy_input: dict[str, Any]) -> PolicyDecision: ...


class AuthorizationServicer(pb_grpc.AuthorizationServicer, DecisionCore):  # type: ignore[misc]  # generated stubs are untyped
    """``catalog`` and ``audit`` are optional so the decision core can be exercised alone;
    ``start_service`` always passes both."""

    def __init__(self, settings: Settings, verifier: TokenVerifier, limiter: RateLimiter,
                 engine: PolicyEngine, *, clock: Callable[[], float] = time.time,
                 catalog: CatalogGate | None = None, audit: AuditWriter | None = None,
                 tracing: bool = False, sessions: SessionBinder | None = None,
                 credentials: CredentialProvider | None = None) -> None:
        self._settings = settings
        self._verifier = verifier
        self._limiter = limiter
        self._engine = engine
        self._dry_run = settings.policy.dry_run
        self._clock = clock
        self._catalog = catalog
        self._audit = audit
        self._tracing = tracing
        self._sql_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sql-facts")
        self._sql_queued = 0
        # Never without a binding: a servicer built without one keeps its own in memory.
        self._sessions = sessions or SessionBinder(MemorySessionStore(
            ttl=settings.session_idle_seconds, max_bindings=settings.max_session_bindings))
        self._sealer = SessionSealer(settings.session_keys) if settings.session_keys else None
        # With identity.assertion on, an upstream gets a signed assertion instead of the identity
        # headers; a key file that cannot be read fails start-up (ConfigError naming the key).
        self._signer: AssertionSigner | None = \
            signer_for(settings.identity, settings.public_url) if settings.identity.assertion else None
        # Built without secrets, a static credential is refused (503), never skipped.
        self._credentials = credentials or CredentialProvider(settings.credentials, {})
        # A token exchange whose subject is the caller assertion mints it with the same signer.
        self._credentials.use_signer(self._signer)

    async def Check(self, request: pb.CheckRequest, context: grpc.aio.ServicerContext[Any, Any] | None
                    ) -> pb.CheckResponse:
        req = http_request(request)
        trace_headers = {name: req.headers[name] for name in _TRACE_HEADERS if name in req.headers}
        # Envoy's span for this Check travels in the gRPC metadata; the checked request's headers
        # carry only what the client sent. Prefer Envoy's so the span joins the request's trace.
        if context is not None:
            grpc_trace = {k: v for k, v in (context.invocation_metadata() or ())
                          if k in _TRACE_HEADERS and isinstance(v, str)}
            if grpc_trace:
                trace_headers = grpc_trace
        return (await self.decide(req, trace_headers)).check_response()

    async def decide(self, req: HttpRequest, trace_headers: dict[str, str]) -> Verdict:
        """Decide one request: exactly one decision log line, metrics update and span each."""
        start = time.perf_counter()
        request_id = req.headers.get("x-request-id")
        rec = DecisionRecord(decision_id=new_decision_id(), request_id=request_id, sub=None,
                             method=None, tool=None, server=None, allow=False,
                             reason="internal_error", http_status=500, latency_ms=0.0,
                             dry_run=self._dry_run)
        facts = _Facts(req)
        # Every log line of this check carries its ids, whichever module writes it.
        log_fields = bind(request_id=request_id, decision_id=rec.decision_id)
        # Without an exporter and without a caller's trace there is nothing a span could add
        # (no ids for log lines either): skip its cost.
        span_cm: AbstractContextManager[Span] = \
            start_server_span(SPAN_NAME, trace_headers, tracer_name=__name__) \
            if self._tracing or trace_headers else nullcontext(INVALID_SPAN)
        try:
            with span_cm as span:
                rec.trace_id = current_trace_ids()[0] if trace_headers or self._tracing else None
                try:
                    verdict = await self._check(req, rec, facts)
                    rec.latency_ms = (time.perf_counter() - start) * 1000.0
                    if self._audit is not None and facts.ctx is not None \
                            and facts.ctx.method in AUDITED_METHODS:
                        verdict = await self._write_audit(verdict, rec, facts)
                except Exception:  # top-level handler: whatever broke, the request is denied
                    logger.exception("authorization check failed; denying (decision %s)",
                                     rec.decision_id)
                    rec.allow, rec.reason, rec.http_status = False, "internal_error", 500
                    err = GatewayError("internal error in the authorization service",
                                       data={"decision_id": rec.decision_id})
                    verdict = Verdict.deny(500, error_body(None, err))
                if span.is_recording():
                    span.set_attributes({
                        "mcp.method": rec.method or "", "mcp.tool": rec.tool or "",
                        "mcp.server": rec.server or "", "decision": "allow" if rec.allow else "deny",
                        "decision.reason": rec.reason, "decision.id": rec.decision_id,
                        "http.response.status_code": rec.http_status})
        finally:
            unbind(log_fields)
        elapsed = time.perf_counter() - start
        rec.latency_ms = elapsed * 1000.0
        log_decision(rec)
        _count(rec, elapsed)
        return verdict

    async def _check(self, req: HttpRequest, rec: DecisionRecord, facts: _Facts) -> Verdict:
        settings = self._settings
        headers = req.headers
        server = server_of(req.path)
        if server is None or server not in settings.servers:
            view = view_of_path(settings.views, _path_only(req.path)) if settings.views else None
            if view is None:
                return self._deny(rec, UnknownServer("no MCP server is served at this path"), req)
            return await self._check_aggregate(req, rec, facts, view)
        rec.server = server
        resource = settings.resource_url(server)

        narrowed: View | None = None
        try:
            check_query(req.path)
            token = bearer_token(headers)
            try:
                claims = await self._verifier.verify(token, resource)
            except InvalidToken as err:
                if err.code != "invalid_audience" or not settings.views:
                    raise
                claims, narrowed = await self._aggregate_audience(token, server, headers, err)
        except AuthError as err:
            challenge = bearer_challenge(settings.resource_metadata_url(server), err.challenge_error)
            return self._deny(rec, err, req, {"www-authenticate": challenge})
        except KeysUnavailable as err:
            return self._deny(rec, err, req, {"retry-after": "1"})
        caller = Caller.from_claims(claims)
        rec.sub, rec.act = caller.sub, caller.act
        facts.caller = caller

        ctx: McpContext | None = None
        parsed: dict[str, Any] | None = None
        if req.method in _BODY_METHODS or req.body:
            try:
                msg = self._read_message(req)
                ctx = extract_context(msg, headers)
                if narrowed is not None:
                    _within_view(narrowed, server, ctx)
            except GatewayError as err:
                return self._deny(rec, err, req)
            parsed = facts.parsed = msg.raw
            facts.ctx = ctx
            rec.method, rec.tool = ctx.method, ctx.tool
        # Undone with the bind in Check (unbind restores what was there before that one).
        bind(sub=caller.sub, tenant=caller.tenant, client_id=caller.client_id,
             server=server, method=rec.method, tool=rec.tool)

        refused = await self._rate_limit(rec, req, caller, server,
                                         ctx.tool if ctx is not None else None)
        if refused is not None:
            return refused

        # After the rate limit (probing ids costs tokens), before the policy (which reads the
        # owner): a session of another issuer or subject does not exist for this caller.
        owner: SessionOwner | None = None
        try:
            session_id = session_id_of(headers)
            if session_id is not None:
                owner = await self._sessions.owner(server, session_id, caller.owner)
        except SessionStoreUnavailable as err:
            return self._deny(rec, err, req, {"retry-after": "1"})
        except GatewayError as err:
            return self._deny(rec, err, req)

        outcome = await self._govern(
            req, rec, policy_req=req, parsed=parsed, ctx=ctx, caller=caller, server=server,
            resource=resource, owner=owner, metadata_url=settings.resource_metadata_url(server))
        if isinstance(outcome, Verdict):
            return outcome
        decision = outcome

        if req.method == "DELETE" and session_id is not None:
            # The client ends its session: its id is refused from now on, whatever the upstream
            # answers (ext_authz never sees that answer).
            try:
                await self._sessions.end(server, session_id)
            except SessionStoreUnavailable as err:
                return self._deny(rec, err, req, {"retry-after": "1"})

        upstream, metadata = self._allowed(req, rec, decision, caller, server, resource)
        creds = await self._credential(rec, req, caller, token, server)
        if isinstance(creds, Verdict):
            return creds
        return Verdict.allow(upstream, metadata, credentials=creds)

    def _read_message(self, req: HttpRequest) -> Message:
        """The request's one JSON-RPC message, strictly parsed; raises GatewayError."""
        headers = req.headers
        if req.method not in _BODY_METHODS:
            # Decided as the message in its body, a GET would be authorised as something
            # other than the stream it opens: one request, one thing to decide.
            raise InvalidRequest(f"a {req.method} request carries no JSON-RPC message")
        if headers.get(PARTIAL_BODY_HEADER) == "true":
            raise PayloadTooLarge("the request body exceeds the gateway's limit")
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise UnsupportedEncoding(
                f"Content-Encoding {encoding!r} is not accepted; send the JSON-RPC body "
                "uncompressed")
        return parse_message(req.body, max_bytes=self._settings.max_request_bytes)

    async def _aggregate_audience(self, token: str, server: str, headers: dict[str, str],
                                  refusal: InvalidToken) -> tuple[dict[str, Any], View | None]:
        """A token that is not for ``/mcp/<server>`` itself: one for ``/mcp`` (the union of the
        servers, so no more power here than there) is accepted; one for a virtual server only
        when the request names that view in VIEW_HEADER and the view holds the server, and then
        the request is narrowed to the view (returned). Else the original refusal."""
        settings = self._settings
        try:
            return await self._verifier.verify(token, settings.aggregate_resource), None
        except InvalidToken as err:
            if err.code != "invalid_audience":
                raise
        name = headers.get(VIEW_HEADER)
        view = settings.views.get(name) if name else None
        if view is None or view.is_aggregate or not view.allows_server(server):
            raise refusal
        try:
            return await self._verifier.verify(token, settings.view_resource(view)), view
        except InvalidToken as err:
            if err.code != "invalid_audience":
                raise
        raise refusal

    async def _check_aggregate(self, req: HttpRequest, rec: DecisionRecord, facts: _Facts,
                               view: View) -> Verdict:
        """A request to an aggregate endpoint: a message aimed at one server is governed exactly
        as on ``/mcp/<server>`` (policy input, rate limits, catalog, audit: the real server and
        tool) and routed there by Envoy with the rewrite computed here; anything else goes to
        the aggregator, whose calls to each server are governed on that server's route."""
        settings = self._settings
        headers = req.headers
        resource = settings.view_resource(view)
        metadata_url = settings.view_metadata_url(view)
        try:
            check_query(req.path)
            token = bearer_token(headers)
            try:
                claims = await self._verifier.verify(token, resource)
            except InvalidToken as err:
                # A virtual server is a narrower view of /mcp: the /mcp token serves it too.
                if err.code != "invalid_audience" or view.is_aggregate:
                    raise
                claims = await self._verifier.verify(token, settings.aggregate_resource)
        except AuthError as err:
            return self._deny(rec, err, req, {"www-authenticate": bearer_challenge(
                metadata_url, err.challenge_error)})
        except KeysUnavailable as err:
            return self._deny(rec, err, req, {"retry-after": "1"})
        caller = Caller.from_claims(claims)
        rec.sub, rec.act = caller.sub, caller.act
        facts.caller = caller

        msg: Message | None = None
        try:
            if req.method in _BODY_METHODS or req.body:
                msg = self._read_message(req)
                client_ctx = extract_context(msg, headers)  # the client's Mcp-Name etc. checked
                rec.method, rec.tool = client_ctx.method, client_ctx.tool
            route = resolve(msg, req.body, view)
        except GatewayError as err:
            return self._deny(rec, err, req)
        server = route.server if isinstance(route, FastPath) else AGGREGATOR_ROUTE
        rec.server = server
        bind(sub=caller.sub, tenant=caller.tenant, client_id=caller.client_id, server=server,
             method=rec.method)

        tool = route.target if isinstance(route, FastPath) and rec.method == "tools/call" else None
        rec.tool = tool
        refused = await self._rate_limit(rec, req, caller, server, tool)
        if refused is not None:
            return refused

        # The sealed id names its owner and view: another caller's, another view's, an altered
        # or an ended one does not exist (404), exactly as on /mcp/<server>.
        owner: SessionOwner | None = None
        session_id: str | None = None
        try:
            session_id = session_id_of(headers, max_chars=MAX_TOKEN_CHARS)
            if session_id is not None:
                owner, session = await self._aggregate_session(session_id, view, caller)
                if isinstance(route, FastPath):
                    upstream_sid = session.upstream.get(route.server)
                    if upstream_sid is None:
                        upstream_sid = await self._sessions.late_joined(session_id, route.server)
                    if upstream_sid is None or not _valid_upstream_sid(upstream_sid):
                        raise UpstreamNotInSession(
                            f"server {route.server} is unavailable in this session (it was not "
                            "reachable when the session started); start a new session",
                            data={"server": route.server})
                    route = route.with_upstream_sid(upstream_sid)
        except SessionStoreUnavailable as err:
            return self._deny(rec, err, req, {"retry-after": "1"})
        except GatewayError as err:
            return self._deny(rec, err, req)

        if isinstance(route, ToAggregator):
            return await self._to_aggregator(req, rec, caller, owner, session_id)

        assert msg is not None
        # From here on the request is what the server receives, as on /mcp/<server>.
        server_path = _server_path(req.path, route.server)
        server_headers = _as_server_headers(headers, route, server_path, len(req.body))
        try:
            ctx = extract_context(Message(route.message, msg.kind), server_headers)
        except GatewayError as err:
            return self._deny(rec, err, req)
        facts.ctx, facts.parsed = ctx, route.message
        policy_req = HttpRequest(req.id, req.method, server_path, req.host, req.scheme,
                                 server_headers, req.body, req.source_address)
        outcome = await self._govern(
            req, rec, policy_req=policy_req, parsed=route.message, ctx=ctx, caller=caller,
            server=route.server, resource=settings.resource_url(route.server), owner=owner,
            metadata_url=metadata_url, via=view.via, exposed_name=route.exposed_name)
        if isinstance(outcome, Verdict):
            return outcome
        upstream, metadata = self._allowed(req, rec, outcome, caller, route.server,
                                           settings.resource_url(route.server))
        upstream.update(route.headers())
        if route.upstream_sid is not None:
            upstream[SESSION_HEADER] = route.upstream_sid
        if _MCP_NAME in headers and ctx.name is not None:
            upstream[_MCP_NAME] = ctx.name  # the server checks it against the rewritten body
        creds = await self._credential(rec, req, caller, token, route.server)
        if isinstance(creds, Verdict):
            return creds
        return Verdict.allow(upstream, metadata, aggregate=True, credentials=creds)

    async def _aggregate_session(self, session_id: str, view: View, caller: Caller
                                 ) -> tuple[SessionOwner, AggregateSession]:
        """The sealed session and its owner; SessionNotFound unless it opens, belongs to the
        caller and this view, and was not ended."""
        if self._sealer is None:
            raise SessionNotFound(NOT_FOUND_MESSAGE)
        try:
            session = self._sealer.open(session_id)
        except InvalidSessionId:
            raise SessionNotFound(NOT_FOUND_MESSAGE) from None
        owner = SessionOwner(session.issuer, session.subject, session.tenant)
        if not owner.same_principal(caller.owner) or session.view != view.name:
            raise SessionNotFound(NOT_FOUND_MESSAGE)
        # Records the sealed owner on first sight, and answers "ended" after a DELETE.
        await self._sessions.owner(AGGREGATE_SERVER, session_id, owner)
        return owner, session

    async def _to_aggregator(self, req: HttpRequest, rec: DecisionRecord, caller: Caller,
                             owner: SessionOwner | None, session_id: str | None) -> Verdict:
        """Route to the aggregator. No policy here: each of its calls to a server is decided on
        that server's route with this caller's token, which it therefore keeps."""
        if owner is not None:
            try:
                self._sessions.check_tenant(owner, caller.owner)
            except GatewayError as err:
                return self._deny(rec, err, req)
        if req.method == "DELETE" and session_id is not None:
            try:
                await self._sessions.end(AGGREGATE_SERVER, session_id)
            except SessionStoreUnavailable as err:
                return self._deny(rec, err, req, {"retry-after": "1"})
        rec.allow, rec.http_status, rec.reason = True, 200, "to_aggregator"
        # The aggregator is one service for /mcp and every virtual server: one audience.
        upstream = self._identity(caller, None, rec.decision_id, self._settings.aggregate_resource)
        upstream[ROUTE_HEADER] = AGGREGATOR_ROUTE
        return Verdict.allow(upstream, None, keep_token=True, aggregate=True)

    async def _govern(self, req: HttpRequest, rec: DecisionRecord, *, policy_req: HttpRequest,
                      parsed: dict[str, Any] | None, ctx: McpContext | None, caller: Caller,
                      server: str, resource: str, owner: SessionOwner | None, metadata_url: str,
                      via: str = VIA_DIRECT, exposed_name: str | None = None
                      ) -> PolicyDecision | Verdict:
        """Policy, session tenant and tool catalog for one request to ``server``: the decision,
        or the refusal. ``policy_req`` is the request as the policy sees it (on an aggregate
        endpoint: as if sent to ``/mcp/<server>``); ``req`` the one the client sent."""
        build = functools.partial(
            policy_input, policy_req, parsed_body=parsed, mcp=ctx, caller=caller, server=server,
            resource=resource, now=self._clock(),
            session=owner.as_policy_input() if owner is not None else None, via=via,
            exposed_name=exposed_name)
        try:
            document = await self._parse_sql(build) if _has_sql(ctx) else build()
        except SqlParserBusy as err:
            return self._deny(rec, err, req, {"retry-after": "1"})
        except GatewayError as err:  # an argument over the gateway's bounds (InputLimitExceeded)
            return self._deny(rec, err, req)
        decision = await self._engine.decide(document)
        rec.policy_allow = decision.allow
        rec.policy_revision = self._engine.revision
        rec.obligations = decision.obligations or None
        if not decision.allow and not self._dry_run:
            status = decision.http_status if 400 <= decision.http_status <= 599 else 403
            deny_headers = dict(decision.headers)
            if decision.missing_scope:
                deny_headers["www-authenticate"] = bearer_challenge(
                    metadata_url, "insufficient_scope",
                    scope=decision.missing_scope)
            code = decision.error_code or decision.reason or "policy_denied"
            refusal = PolicyDenied(f"request denied by policy ({code})", code=code, http_status=status)
            return self._deny(rec, refusal, req, deny_headers)
        if owner is not None:
            # Whatever the policy (or dry-run) said: a session never changes tenant.
            try:
                self._sessions.check_tenant(owner, caller.owner)
            except GatewayError as err:
                return self._deny(rec, err, req)

        # After the policy: a caller the policy refuses learns nothing about the catalog.
        if self._catalog is not None and ctx is not None and ctx.method == "tools/call":
            try:
                if ctx.tool is None:
                    raise InvalidRequest('tools/call needs "params.name"')
                try:
                    self._catalog.check_call(server, ctx.tool, ctx.arguments)
                except CatalogNotLoaded:
                    # check_call kicked a fetch; right after start-up it is often about to land.
                    if not await self._catalog.wait_loaded(server, CATALOG_WAIT_SECONDS):
                        raise
                    self._catalog.check_call(server, ctx.tool, ctx.arguments)
            except (CatalogNotLoaded, CatalogUnavailable) as err:
                return self._deny(rec, err, req, {"retry-after": "1"})
            except GatewayError as err:
                return self._deny(rec, err, req)

        return decision

    def _allowed(self, req: HttpRequest, rec: DecisionRecord, decision: PolicyDecision,
                 caller: Caller, server: str, resource: str
                 ) -> tuple[dict[str, str], dict[str, Any]]:
        """The upstream headers and ext_proc metadata of an allowed request to ``server``."""
        rec.allow, rec.http_status = True, 200
        rec.reason = decision.reason or "allowed"
        if not decision.allow:
            rec.reason = f"dry_run:{decision.error_code or decision.reason or 'policy_denied'}"
        mask = mask_types(decision.obligations)
        # Identity headers win over policy-provided headers of the same name, and only the
        # gateway decides about inspection and routing.
        upstream = {**decision.headers, **self._identity(
            caller, rec.tool, rec.decision_id, self._settings.audience(server),
            _redaction(decision.obligations.get("audit_redact")))}
        if self._signer is not None:
            for name in IDENTITY_HEADERS:  # a policy header never stands in for the assertion
                upstream.pop(name, None)
        upstream.pop(INSPECT_HEADER, None)
        for name in AGGREGATE_HEADERS:
            upstream.pop(name, None)
        if needs_inspection(rec.method, mask, req.method):
            upstream[INSPECT_HEADER] = "1"
        metadata = ext_proc_metadata(
            method=rec.method, server=server, tool=rec.tool, caller=caller, resource=resource,
            mask=mask, decision_id=rec.decision_id, request_id=rec.request_id,
            obligations=decision.obligations, http_method=req.method)
        return upstream, metadata


    @property
    def catalog_identity(self) -> Callable[[str], dict[str, str]] | None:
        """Fresh headers naming the gateway itself towards ``server`` (its catalog fetch), or
        None without assertions (the fetch sends the bare CATALOG_IDENTITY headers)."""
        signer = self._signer
        if signer is None:
            return None
        return lambda server: {ASSERTION_HEADER: signer.mint(
            CATALOG_CALLER, self._settings.audience(server), new_decision_id())}

    def _identity(self, caller: Caller, tool: str | None, decision_id: str, audience: str,
                  audit_redact: list[str] | None = None) -> dict[str, str]:
        """Who the upstream request acts for: a signed assertion for ``audience`` when
        identity.assertion is on (ES256, ~30 us), else the identity headers. The assertion also
        carries the decision's audit_redact obligation, so the server's own audit entry of the
        call leaves out what ext_authz's leaves out (bare headers cannot: they are not signed)."""
        if self._signer is None:
            return identity_headers(caller, tool, decision_id)
        return {ASSERTION_HEADER: self._signer.mint(caller, audience, decision_id, tool,
                                                    audit_redact)}

    async def _parse_sql(self, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Build an input whose facts parse SQL (pure Python, up to tens of ms within its bounds,
        gateway/policy/sql.py) on the one SQL thread: the loop keeps the GIL every switch
        interval instead of competing with a crowd of parsing threads, and a burst beyond
        ``MAX_SQL_QUEUE`` waiting parses is refused at once (503) instead of queueing."""
        if self._sql_queued >= MAX_SQL_QUEUE:
            raise SqlParserBusy("the gateway is parsing too many SQL texts; retry shortly")
        self._sql_queued += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._sql_thread, build)
        finally:
            self._sql_queued -= 1

    async def _write_audit(self, verdict: Verdict, rec: DecisionRecord, facts: _Facts) -> Verdict:
        """Put the entry on disk before the answer leaves; no entry, no answer (503)."""
        assert self._audit is not None and facts.ctx is not None
        ctx, caller = facts.ctx, facts.caller
        digest = None
        if ctx.method == "tools/call":
            digest = args_digest(ctx.arguments)
        elif ctx.method == "prompts/get" and facts.parsed is not None:
            params = facts.parsed.get("params")
            if isinstance(params, dict) and params.get("arguments") is not None:
                digest = args_digest(params["arguments"])
        entry = AuditEntry(
            method=str(ctx.method), server=rec.server or "", target=ctx.name,
            sub=rec.sub, client_id=caller.client_id if caller is not None else None,
            tenant=caller.tenant if caller is not None else None,
            decision="allow" if rec.allow else "deny", reason=rec.reason,
            status="allowed" if rec.allow else "denied", latency_ms=round(rec.latency_ms, 3),
            request_id=rec.request_id, decision_id=rec.decision_id, args_digest=digest,
            trace_id=rec.trace_id, service=SERVICE)
        if rec.obligations and "audit_redact" in rec.obligations:
            entry = redact_entry(entry, rec.obligations["audit_redact"])
        try:
            await self._audit.write(entry)
        except AuditUnavailable as err:
            logger.error("audit entry not written (%s); refusing the request", err.message)
            if not rec.allow:
                return verdict  # refused either way
            return self._deny(rec, err, facts.req, {"retry-after": "1"})
        return verdict

    async def _credential(self, rec: DecisionRecord, req: HttpRequest, caller: Caller, token: str,
                          server: str) -> Mapping[str, str] | Verdict:
        """The upstream credential's headers for an allowed request (last: a caller refused
        earlier never costs a token exchange), or the refusal when it cannot be had."""
        try:
            return await self._credentials.headers(server, caller, token,
                                                   decision_id=rec.decision_id)
        except GatewayError as err:
            retry = {"retry-after": "1"} if err.http_status == 503 else None
            return self._deny(rec, err, req, retry)

    async def _rate_limit(self, rec: DecisionRecord, req: HttpRequest, caller: Caller,
                          server: str, tool: str | None) -> Verdict | None:
        """The per-user and per-tool limits for one request: None when it may go on, else the
        refusal (429, or 503 when the shared counter store cannot be reached)."""
        try:
            await self._limiter.acquire(limits_for(
                self._settings.rate_limits, issuer=caller.issuer or "", sub=caller.sub,
                server=server, tool=tool))
        except RateLimited as err:
            metrics.RATE_LIMIT_REJECTIONS.labels(err.scope).inc()
            return self._deny(rec, err, req, {"retry-after": str(err.retry_after)})
        except RateLimitUnavailable as err:
            metrics.RATE_LIMIT_REJECTIONS.labels("store_unavailable").inc()
            return self._deny(rec, err, req, {"retry-after": "1"})
        return None

    def _deny(self, rec: DecisionRecord, err: GatewayError, req: HttpRequest,
              headers: dict[str, str] | None = None) -> Verdict:
        rec.allow, rec.reason, rec.http_status = False, err.code, err.http_status
        data = err.data if isinstance(err.data, dict) else {}
        err.data = {**data, "decision_id": rec.decision_id}
        rid = best_effort_id(req.body) if req.body else None
        return Verdict.deny(err.http_status, error_body(rid, err), headers)

_MCP_NAME = "mcp-name"


def _path_only(path: str) -> str:
    for sep in ("?", "#"):
        path = path.split(sep, 1)[0]
    return path


def _server_path(path: str, server: str) -> str:
    """The path the request would have had on ``/mcp/<server>`` (query kept)."""
    q = path.find("?")
    return f"{MCP_PATH_PREFIX}{server}" + (path[q:] if q != -1 else "")


def _as_server_headers(headers: dict[str, str], route: FastPath, path: str, body_len: int
                       ) -> dict[str, str]:
    """The request's headers as the server receives them on ``path``: its own name in
    Mcp-Name, its own session id, the rewritten body's length."""
    out = dict(headers)
    if _MCP_NAME in out and route.target is not None:
        out[_MCP_NAME] = route.target
    if SESSION_HEADER in out:
        if route.upstream_sid is None:
            del out[SESSION_HEADER]
        else:
            out[SESSION_HEADER] = route.upstream_sid
    if ":path" in out:
        out[":path"] = path
    if "content-length" in out:
        out["content-length"] = str(body_len - route.rewrite.length + len(route.rewrite.to))
    return out


def _valid_upstream_sid(value: str) -> bool:
    # It becomes a header value: the same alphabet and bound as a client's session id.
    return 0 < len(value) <= MAX_SESSION_ID_CHARS and visible_ascii(value) and "," not in value


def _within_view(view: View, server: str, ctx: McpContext) -> None:
    """A request on ``/mcp/<server>`` under a virtual server's token: only what the view holds."""
    if ctx.method == "tools/call" and (ctx.tool is None or not view.allows(server, ctx.tool)):
        raise UnknownTarget(f"unknown tool {ctx.tool!r} on {view.path()}",
                            data={"name": ctx.tool})


@dataclass(slots=True)
class _Facts:
    """What one check learnt, for the audit entry after the decision."""

    req: HttpRequest
    caller: Caller | None = None
    ctx: McpContext | None = None
    parsed: dict[str, Any] | None = None


_ID_BYTES = 16
_ID_POOL_SIZE = 256
_id_pool = b""
_id_pos = 0
_id_lock = threading.Lock()


def new_decision_id() -> str:
    """A random (version 4) UUID as 32 hex digits, like ``uuid.uuid4().hex``.

    ``uuid4()`` makes one getrandom() system call per id; on the event loop of a busy service a
    system call also hands the GIL to the gRPC and audit threads. One call per 256 ids instead.
    """
    global _id_pool, _id_pos
    with _id_lock:  # never the same slice twice, whichever thread asks
        if _id_pos >= len(_id_pool):
            _id_pool, _id_pos = os.urandom(_ID_BYTES * _ID_POOL_SIZE), 0
        n = int.from_bytes(_id_pool[_id_pos:_id_pos + _ID_BYTES])
        _id_pos += _ID_BYTES
    return f"{n & _UUID_CLEAR | _UUID4_SET:032x}"


# Version 4 in bits 76-79, RFC 4122 variant (0b10) in bits 62-63.
_UUID_CLEAR = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)
_UUID4_SET = (0x4 << 76) | (0x2 << 62)


def _reset_ids_after_fork() -> None:
    # A forked child must never hand out the ids its parent will hand out too.
    global _id_pool, _id_pos, _id_lock
    _id_pool, _id_pos, _id_lock = b"", 0, threading.Lock()


os.register_at_fork(after_in_child=_reset_ids_after_fork)


# Label children are looked up once per distinct label set (labels() costs a lock and a tuple
# per call); metrics.bounded() still decides each label value the first time it is seen.
_MAX_CACHED_SERIES = 4096
_request_series: dict[tuple[str, str, str | None, str], Any] = {}
_latency_series = {True: metrics.DECISION_LATENCY.labels("allow"),
                   False: metrics.DECISION_LATENCY.labels("deny")}


def _count(rec: DecisionRecord, seconds: float) -> None:
    decision = "allow" if rec.allow else rec.reason
    key = (rec.server or "", rec.method or "", rec.tool, decision)
    series = _request_series.get(key)
    if series is None:
        series = metrics.REQUESTS.labels(
            metrics.bounded("server", key[0]), metrics.bounded("method", key[1]),
            metrics.bounded("tool", key[2]), metrics.bounded("decision", decision))
        if len(_request_series) < _MAX_CACHED_SERIES:
            _request_series[key] = series
    series.inc()
    _latency_series[rec.allow].observe(seconds)


def _has_sql(ctx: McpContext | None) -> bool:
    return ctx is not None and isinstance(ctx.arguments, dict) \
        and isinstance(ctx.arguments.get("sql"), str)


def _redaction(value: Any) -> list[str] | None:
    """The audit_redact obligation as the assertion carries it: a short list of short names as
    is; anything else (a policy's mistake) as one unknown name, which makes the server redact
    every field, as redact_entry does for ext_authz's own entry."""
    if value is None:
        return None
    if isinstance(value, list) and len(value) <= MAX_REDACT_FIELDS \
            and all(isinstance(v, str) and len(v) <= 64 for v in value):
        return value
    return ["invalid"]
