"""The Envoy ``envoy.service.auth.v3.Authorization`` servicer (grpc.aio).

Order of checks, cheapest refusal first: known server -> token (401) -> body (400/413) -> rate
limit (429) -> policy (403). Every path ends in exactly one decision log line. Anything
unexpected is answered 500 (deny): the service fails closed and keeps running.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

from ext_authz.decision_log import DecisionRecord, log_decision
from ext_authz.errors import (
    AuthError,
    KeysUnavailable,
    PolicyDenied,
    RateLimited,
    RateLimitUnavailable,
    UnknownServer,
)
from ext_authz.jwt import TokenVerifier
from ext_authz.ratelimit import RateLimiter, limits_for
from ext_authz.request import (
    PARTIAL_BODY_HEADER,
    HttpRequest,
    bearer_token,
    check_query,
    http_request,
    policy_input,
    server_of,
)
from ext_authz.response import (
    allowed,
    bearer_challenge,
    denied,
    error_body,
    identity_headers,
)
from ext_authz.settings import Settings
from gateway.errors import GatewayError, PayloadTooLarge
from gateway.jsonrpc import best_effort_id, parse_message
from gateway.mcp import McpContext, extract_context

logger = logging.getLogger(__name__)

# Methods that carry a JSON-RPC message; GET (SSE stream) and DELETE (session end) do not.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


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

    async def decide(self, policy_input: dict[str, Any]) -> PolicyDecision: ...


class AuthorizationServicer(pb_grpc.AuthorizationServicer):  # type: ignore[misc]  # generated stubs are untyped
    def __init__(self, settings: Settings, verifier: TokenVerifier, limiter: RateLimiter,
                 engine: PolicyEngine, *, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._verifier = verifier
        self._limiter = limiter
        self._engine = engine
        self._dry_run = settings.policy.dry_run
        self._clock = clock

    async def Check(self, request: pb.CheckRequest, context: grpc.aio.ServicerContext[Any, Any] | None
                    ) -> pb.CheckResponse:
        start = time.perf_counter()
        rec = DecisionRecord(decision_id=uuid.uuid4().hex, request_id=None, sub=None, method=None,
                             tool=None, server=None, allow=False, reason="internal_error",
                             http_status=500, latency_ms=0.0, dry_run=self._dry_run)
        try:
            response = await self._check(request, rec)
        except Exception:  # top-level handler: whatever broke, the request is denied
            logger.exception("authorization check failed; denying (decision %s)", rec.decision_id)
            rec.allow, rec.reason, rec.http_status = False, "internal_error", 500
            err = GatewayError("internal error in the authorization service",
                               data={"decision_id": rec.decision_id})
            response = denied(500, error_body(None, err))
        rec.latency_ms = (time.perf_counter() - start) * 1000.0
        log_decision(rec)
        return response

    async def _check(self, request: pb.CheckRequest, rec: DecisionRecord) -> pb.CheckResponse:
        settings = self._settings
        req = http_request(request)
        headers = req.headers
        rec.request_id = headers.get("x-request-id")
        server = server_of(req.path)
        if server is None or server not in settings.servers:
            return self._deny(rec, UnknownServer("no MCP server is served at this path"), req)
        rec.server = server
        resource = settings.resource_url(server)

        try:
            check_query(req.path)
            token = bearer_token(headers)
            claims = await self._verifier.verify(token, resource)
        except AuthError as err:
            challenge = bearer_challenge(settings.resource_metadata_url(server), err.challenge_error)
            return self._deny(rec, err, req, {"www-authenticate": challenge})
        except KeysUnavailable as err:
            return self._deny(rec, err, req, {"retry-after": "1"})
        rec.sub = claims["sub"]

        ctx: McpContext | None = None
        parsed: dict[str, Any] | None = None
        if req.method in _BODY_METHODS or req.body:
            try:
                if headers.get(PARTIAL_BODY_HEADER) == "true":
                    raise PayloadTooLarge("the request body exceeds the gateway's limit")
                msg = parse_message(req.body, max_bytes=settings.max_request_bytes)
                ctx = extract_context(msg, headers)
            except GatewayError as err:
                return self._deny(rec, err, req)
            parsed = msg.raw
            rec.method, rec.tool = ctx.method, ctx.tool

        try:
            await self._limiter.acquire(limits_for(
                settings.rate_limits, issuer=claims["iss"], sub=rec.sub, server=server,
                tool=ctx.tool if ctx is not None else None))
        except RateLimited as err:
            return self._deny(rec, err, req, {"retry-after": str(err.retry_after)})
        except RateLimitUnavailable as err:
            return self._deny(rec, err, req, {"retry-after": "1"})

        decision = await self._engine.decide(policy_input(
            req, parsed_body=parsed, mcp=ctx, claims=claims, server=server, resource=resource,
            now=self._clock()))
        rec.policy_allow = decision.allow
        if not decision.allow and not self._dry_run:
            status = decision.http_status if 400 <= decision.http_status <= 599 else 403
            deny_headers = dict(decision.headers)
            if decision.missing_scope:
                deny_headers["www-authenticate"] = bearer_challenge(
                    settings.resource_metadata_url(server), "insufficient_scope",
                    scope=decision.missing_scope)
            code = decision.error_code or decision.reason or "policy_denied"
            refusal = PolicyDenied(f"request denied by policy ({code})", code=code, http_status=status)
            return self._deny(rec, refusal, req, deny_headers)

        rec.allow, rec.http_status = True, 200
        rec.reason = decision.reason or "allowed"
        if not decision.allow:
            rec.reason = f"dry_run:{decision.error_code or decision.reason or 'policy_denied'}"
        # Identity headers win over policy-provided headers of the same name.
        upstream = {**decision.headers, **identity_headers(claims, rec.tool, rec.decision_id)}
        metadata = {"decision_id": rec.decision_id, "obligations": decision.obligations} \
            if decision.obligations else None
        return allowed(upstream, metadata=metadata)

    def _deny(self, rec: DecisionRecord, err: GatewayError, req: HttpRequest,
              headers: dict[str, str] | None = None) -> pb.CheckResponse:
        rec.allow, rec.reason, rec.http_status = False, err.code, err.http_status
        data = err.data if isinstance(err.data, dict) else {}
        err.data = {**data, "decision_id": rec.decision_id}
        rid = best_effort_id(req.body) if req.body else None
        return denied(err.http_status, error_body(rid, err), headers)
