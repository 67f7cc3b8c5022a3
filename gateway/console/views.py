"""The console's pages and their JSON feeds. Every handler runs after ``require_session``
(except sign-in and static files), so it has a signed-in user whom the policy admits."""

from __future__ import annotations

import asyncio
import difflib
import itertools
import logging
import os
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import orjson
from aiohttp import web

from gateway.catalog import CatalogError
from gateway.catalog.store import MAX_REASON_CHARS
from gateway.console import activity, envoy_stats, matrix, service_metrics
from gateway.console.audit_search import Filters, Progress, SearchResult, iter_rows, search
from gateway.console.auth import PolicyUnavailable, Session
from gateway.console.oidc import PENDING_SECONDS, OidcError
from gateway.console.oidc import STATE_COOKIE as OIDC_COOKIE
from gateway.console.settings import MAX_AUDIT_ROWS, MAX_AUDIT_SCAN, MAX_EXPORT_ROWS
from gateway.console.state import CONSOLE, ConsoleState
from gateway.console.web import (
    CSRF_FIELD,
    CSRF_HEADER,
    LOGIN_COOKIE,
    Handler,
    cookie_header,
    same_origin,
    tokens_equal,
)
from gateway.errors import GatewayError
from gateway.policy.decision import ContractViolation, check_decision
from gateway.policy.errors import PolicyError
from gateway.policy.rego import CompiledPolicy
from gateway.policy.simulate import METHODS, simulated_input
from gateway.telemetry.audit import AuditUnavailable

logger = logging.getLogger(__name__)

PREFIX = "/console"
SESSION_KEY = web.RequestKey("console_session", Session)
LOGIN_COOKIE_SECONDS = 600
MAX_TOKEN_CHARS = 16 * 1024
MAX_PLAYGROUND_FIELD = 64 * 1024
MAX_CATALOG_ROWS = 5000
PUBLIC_PATHS = (f"{PREFIX}/login", f"{PREFIX}/oidc/start", f"{PREFIX}/oidc/callback")
STATIC_PREFIX = f"{PREFIX}/static/"
PRETTY = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS


def state(request: web.Request) -> ConsoleState:
    return request.app[CONSOLE]


def session_of(request: web.Request) -> Session:
    return request[SESSION_KEY]


def refuse(request: web.Request, status: int, code: str, message: str) -> web.Response:
    """An error page (or JSON for the feeds) naming a stable code."""
    if request.path.startswith(f"{PREFIX}/api/"):
        return web.json_response({"error": code, "message": message}, status=status)
    response = aiohttp_jinja2.render_template(
        "error.html", request, {"code": code, "message": message, "user": request.get(SESSION_KEY),
                                "csrf": "", "prefix": PREFIX, "nav": request.path})
    response.set_status(status)
    return response


@web.middleware
async def require_session(request: web.Request, handler: Handler) -> web.StreamResponse:
    st = state(request)
    if request.method not in ("GET", "HEAD", "POST"):
        return refuse(request, 405, "method_not_allowed", "only GET and POST")
    if request.method == "POST" and not same_origin(request, st.public_origin):
        logger.warning("console POST refused: not from the console's origin",
                       extra={"path": request.path, "origin": request.headers.get("Origin")})
        return refuse(request, 403, "cross_origin", "this request does not come from the console's pages")
    # Outside /console only /ready exists (Envoy's health check; the edge never routes it).
    if request.path in PUBLIC_PATHS or request.path.startswith(STATIC_PREFIX) or \
            not (request.path == PREFIX or request.path.startswith(PREFIX + "/")):
        return await handler(request)
    sid = request.cookies.get(st.settings.cookie_name)
    session = st.sessions.get(sid)
    if session is None:
        if request.method == "GET" and not request.path.startswith(f"{PREFIX}/api/"):
            raise web.HTTPSeeOther(f"{PREFIX}/login")
        return refuse(request, 401, "not_signed_in", "sign in first")
    # The policy is asked on every request: a role removed from policies/ takes effect at once.
    decision = await st.policy.console_decision(session.claims, "view")
    if not decision.allow:
        st.sessions.drop(sid)
        return refuse(request, decision.http_status if decision.http_status >= 400 else 403,
                      decision.reason, "the policy does not admit you to the console")
    request[SESSION_KEY] = session
    if request.method == "POST":
        presented: Any = request.headers.get(CSRF_HEADER)
        if presented is None:
            form = await request.post()
            presented = form.get(CSRF_FIELD)
        if not session.csrf_ok(presented if isinstance(presented, str) else None):
            logger.warning("console POST refused: bad CSRF token", extra={"path": request.path,
                                                                          "sub": session.sub})
            return refuse(request, 403, "csrf_failed", "the form is stale or forged: reload the page")
    return await handler(request)


def page(request: web.Request, template: str, context: Mapping[str, Any]) -> web.Response:
    session: Session | None = request.get(SESSION_KEY)
    return aiohttp_jinja2.render_template(template, request, {
        "user": session, "csrf": session.csrf if session else "", "prefix": PREFIX,
        "nav": request.path, **context})


# ------------------------------------------------------------------ sign-in


async def login_form(request: web.Request, *, error: str | None = None, status: int = 200) -> web.Response:
    nonce = os.urandom(24).hex()
    response = aiohttp_jinja2.render_template("login.html", request, {
        "csrf": nonce, "error": error, "prefix": PREFIX, "user": None, "nav": request.path,
        "oidc": state(request).settings.oidc})
    response.set_status(status)
    response.headers.add("Set-Cookie", cookie_header(LOGIN_COOKIE, nonce, max_age=LOGIN_COOKIE_SECONDS))
    return response


async def login_get(request: web.Request) -> web.StreamResponse:
    return await login_form(request)


async def login_post(request: web.Request) -> web.StreamResponse:
    st = state(request)
    form = await request.post()
    if not tokens_equal(_text(form.get(CSRF_FIELD)), request.cookies.get(LOGIN_COOKIE)):
        return refuse(request, 403, "csrf_failed", "the sign-in form is stale or forged: reload it")
    token = (_text(form.get("token")) or "").strip()
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    if not token or len(token) > MAX_TOKEN_CHARS:
        return await login_form(request, error="paste an access token", status=400)
    try:
        claims = await st.verifier.verify(token, st.settings.resource)
    except GatewayError as exc:
        logger.info("console sign-in refused", extra={"code": exc.code})
        return await login_form(request, error=f"the token was refused: {exc.code}", status=401)
    admitted = await _admit(request, claims)
    if isinstance(admitted, web.Response):
        return admitted
    sid, session = admitted
    response = web.HTTPSeeOther(f"{PREFIX}/overview")
    lifetime = max(int(session.expires - time.time()), 1)
    response.headers.add("Set-Cookie", cookie_header(st.settings.cookie_name, sid, max_age=lifetime))
    response.headers.add("Set-Cookie", cookie_header(LOGIN_COOKIE, "", max_age=0))
    return response


async def _admit(request: web.Request, claims: dict[str, Any]) -> tuple[str, Session] | web.Response:
    """A session for verified ``claims`` the console policy admits, or the refusal page."""
    st = state(request)
    decision = await st.policy.console_decision(claims, "view")
    if not decision.allow:
        logger.info("console sign-in refused by the policy",
                    extra={"sub": claims.get("sub"), "reason": decision.reason})
        return refuse(request, 403, decision.reason, "the policy does not admit your roles to the console")
    sid, session = st.sessions.create(claims, lifetime=st.settings.session_seconds)
    logger.info("console sign-in", extra={"sub": session.sub, "roles": list(session.roles)})
    return sid, session


async def oidc_start(request: web.Request) -> web.StreamResponse:
    st = state(request)
    if st.oidc is None:
        return refuse(request, 404, "not_found", "this console has no OpenID Connect sign-in")
    key, url = st.oidc.start()
    response = web.HTTPSeeOther(url)
    # Lax: the identity provider's redirect back is a cross-site navigation.
    response.headers.add("Set-Cookie", cookie_header(OIDC_COOKIE, key, max_age=PENDING_SECONDS,
                                                     same_site="Lax"))
    return response


async def oidc_callback(request: web.Request) -> web.StreamResponse:
    st = state(request)
    if st.oidc is None:
        return refuse(request, 404, "not_found", "this console has no OpenID Connect sign-in")
    try:
        pending = st.oidc.take(request.query.get("state"), request.cookies.get(OIDC_COOKIE))
        error = request.query.get("error")
        if error:
            raise OidcError("authorization_refused",
                            f"the identity provider refused: {error[:100]}")
        token = await st.oidc.exchange(request.query.get("code", ""), pending)
        claims = await st.verifier.verify(token, st.settings.resource)
    except OidcError as exc:
        logger.info("console OpenID Connect sign-in failed", extra={"code": exc.code})
        return await login_form(request, error=f"sign-in failed: {exc.code}: {exc.message}", status=400)
    except GatewayError as exc:
        logger.info("console OpenID Connect token refused", extra={"code": exc.code})
        return await login_form(request, error=f"the token was refused: {exc.code}", status=401)
    admitted = await _admit(request, claims)
    if isinstance(admitted, web.Response):
        return admitted
    sid, session = admitted
    # A page of ours moves on to the overview: the redirect chain from the identity provider is
    # cross-site, and the SameSite=Strict session cookie is sent only on a same-site navigation.
    response = aiohttp_jinja2.render_template("signed_in.html", request, {
        "prefix": PREFIX, "user": None, "csrf": "", "nav": request.path})
    lifetime = max(int(session.expires - time.time()), 1)
    response.headers.add("Set-Cookie", cookie_header(st.settings.cookie_name, sid, max_age=lifetime))
    response.headers.add("Set-Cookie", cookie_header(OIDC_COOKIE, "", max_age=0, same_site="Lax"))
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    st = state(request)
    st.sessions.drop(request.cookies.get(st.settings.cookie_name))
    logger.info("console sign-out", extra={"sub": session_of(request).sub})
    response = web.HTTPSeeOther(f"{PREFIX}/login")
    response.headers.add("Set-Cookie", cookie_header(st.settings.cookie_name, "", max_age=0))
    return response


async def root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther(f"{PREFIX}/overview")


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# ------------------------------------------------------------------ overview


async def overview_page(request: web.Request) -> web.StreamResponse:
    st = state(request)
    ov = await envoy_stats.overview(st.admin, st.sampler)
    components: dict[str, list[envoy_stats.Instance]] = {}
    for inst in ov.instances:
        components.setdefault(inst.component, []).append(inst)
    services = st.services.views() if st.services is not None else []
    return page(request, "overview.html", {"ov": ov, "components": components,
                                           "policy_error": st.policy.error, "services": services,
                                           "services_dropped": st.services.dropped if st.services else 0})


async def overview_api(request: web.Request) -> web.StreamResponse:
    st = state(request)
    ov = await envoy_stats.overview(st.admin, st.sampler)
    return web.json_response({
        "envoy_ready": ov.envoy_ready, "error": ov.error, "source": ov.source,
        "clusters": [{"component": c.component, "cluster": c.cluster, "healthy": c.healthy,
                      "total": c.total} for c in ov.clusters],
        "instances": [{"component": i.component, "address": i.address, "health": i.health}
                      for i in ov.instances],
        "times": ov.times, "series": ov.series, "current": ov.current,
        "services": service_metrics.as_json(st.services.views()) if st.services is not None else []})


# ------------------------------------------------------------------ catalog


async def catalog_page(request: web.Request) -> web.StreamResponse:
    st = state(request)
    wanted = request.query.get("state") or None
    entries = await asyncio.to_thread(st.catalog.entries)
    shadowed = st.catalog.shadowed_names()
    rows = [e for e in entries if wanted is None or e.state == wanted]
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.state] = counts.get(e.state, 0) + 1
    return page(request, "catalog.html", {
        "rows": rows[:MAX_CATALOG_ROWS], "total": len(rows), "cut": len(rows) > MAX_CATALOG_ROWS,
        "counts": counts, "wanted": wanted, "shadowed": shadowed, "when": _when,
        "approved": request.query.get("approved"), "quarantined": request.query.get("quarantined")})


async def catalog_item(request: web.Request) -> web.StreamResponse:
    server, kind, name = (request.match_info[k] for k in ("server", "kind", "name"))
    return await _item_page(request, server, kind, name)


async def _item_page(request: web.Request, server: str, kind: str, name: str, *, status: int = 200,
                     changed: str | None = None) -> web.Response:
    """The item's page; ``changed``: the hash a refused approval reviewed (409, shown above the
    definition now current)."""
    st = state(request)
    entry = st.catalog.get(server, name, kind=kind)
    if entry is None:
        return refuse(request, 404, "not_found", f"no {kind} {server}/{name} in the catalog")
    events = await asyncio.to_thread(st.catalog.audit_events, server, name)
    diff = None
    if entry.approved_hash is not None and entry.approved_hash != entry.hash:
        approved = await asyncio.to_thread(st.catalog.approved_definition, server, name, kind=kind)
        diff = _diff(approved, entry.definition) if approved is not None else None
    response = page(request, "catalog_item.html", {
        "e": entry, "events": [ev for ev in events if ev.get("kind") == kind][-50:], "when": _when,
        "definition": orjson.dumps(entry.definition, option=PRETTY).decode(), "changed": changed,
        "diff": diff})
    response.set_status(status)
    return response


MAX_DIFF_LINES = 2000


def _diff(approved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A unified line diff of the canonical JSON (sorted keys, indented) of the approved and the
    current definition, as (css class, line) pairs; the template escapes the lines."""
    old = orjson.dumps(approved, option=PRETTY).decode().splitlines()
    new = orjson.dumps(current, option=PRETTY).decode().splitlines()
    out: list[tuple[str, str]] = []
    for line in difflib.unified_diff(old, new, "approved", "current", n=3, lineterm=""):
        css = "hunk" if line.startswith(("@@", "---", "+++")) else \
            "add" if line.startswith("+") else "del" if line.startswith("-") else "same"
        out.append((css, line))
        if len(out) >= MAX_DIFF_LINES:
            out.append(("hunk", f"... cut at {MAX_DIFF_LINES} lines"))
            break
    return out


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


async def catalog_approve(request: web.Request) -> web.StreamResponse:
    st = state(request)
    session = session_of(request)
    form = await request.post()
    server, name, kind, reviewed = (_text(form.get(k)) or "" for k in ("server", "name", "kind", "hash"))
    if not server or not name or kind not in ("tool", "resource", "prompt"):
        return refuse(request, 400, "bad_request", "server, name and kind are required")
    # The hash of the definition the page showed: approval applies to it and to nothing else.
    if not _is_sha256(reviewed):
        return refuse(request, 400, "bad_request", "the hash of the reviewed definition is required")
    decision = await st.policy.console_decision(session.claims, "approve")
    if not decision.allow:
        return refuse(request, 403, decision.reason, "the policy does not let you approve definitions")
    try:
        # The same catalog call as `mcp-gateway catalog approve --hash`, audited with the console user.
        entry = await asyncio.to_thread(st.catalog.approve, server, name, kind=kind,
                                        actor=f"console:{session.sub}", expected_hash=reviewed)
    except CatalogError as exc:
        if exc.code == "definition_changed":
            logger.warning("console approval refused: the definition changed since it was shown",
                           extra={"sub": session.sub, "server": server, "item": name, "kind": kind,
                                  "reviewed": reviewed})
            return await _item_page(request, server, kind, name, status=409, changed=reviewed)
        return refuse(request, exc.http_status, exc.code, exc.message)
    logger.info("console approved a definition", extra={"sub": session.sub, "server": server,
                                                        "item": name, "kind": kind, "hash": entry.hash})
    raise web.HTTPSeeOther(f"{PREFIX}/catalog?approved={server}/{name}")


async def catalog_quarantine(request: web.Request) -> web.StreamResponse:
    """Withdraw one item (console action ``quarantine``): hidden and its calls refused until
    approved again; Catalog.quarantine, audited with actor ``console:<sub>``."""
    st = state(request)
    session = session_of(request)
    form = await request.post()
    server, name, kind, reason = (_text(form.get(k)) or "" for k in ("server", "name", "kind", "reason"))
    if not server or not name or kind not in ("tool", "resource", "prompt"):
        return refuse(request, 400, "bad_request", "server, name and kind are required")
    if len(reason) > MAX_REASON_CHARS:
        return refuse(request, 400, "bad_request", f"the reason exceeds {MAX_REASON_CHARS} characters")
    decision = await st.policy.console_decision(session.claims, "quarantine")
    if not decision.allow:
        return refuse(request, 403, decision.reason, "the policy does not let you quarantine definitions")
    try:
        entry = await asyncio.to_thread(st.catalog.quarantine, server, name, kind=kind,
                                        actor=f"console:{session.sub}", reason=reason or None)
    except CatalogError as exc:
        return refuse(request, exc.http_status, exc.code, exc.message)
    logger.info("console quarantined a definition", extra={"sub": session.sub, "server": server,
                                                           "item": name, "kind": kind, "hash": entry.hash})
    raise web.HTTPSeeOther(f"{PREFIX}/catalog?quarantined={server}/{name}")


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


# ------------------------------------------------------------------ who may call what


def _compute_matrix(compiled: CompiledPolicy, entrypoint: str, roles: list[str],
                    tools: list[tuple[str, str]], public_url: str,
                    tenants: tuple[str, ...]) -> matrix.TenantMatrices:
    # Its own interpreter: the loop thread's is never used from a worker thread. With the list
    # filter when the policy has one.
    try:
        own = CompiledPolicy(compiled.sources, [entrypoint, matrix.LIST_ENTRYPOINT])
    except PolicyError:
        own = CompiledPolicy(compiled.sources, [entrypoint])
    return matrix.compute_all(own, entrypoint, roles, tools, public_url, tenants)


async def refresh_matrix(st: ConsoleState) -> None:
    """Start computing the matrix in the background when the policy bundle or the catalog's
    tools changed since the last one (deciding every role x tool takes seconds for a large
    catalog, so pages never wait for it). Called by the matrix page and every few seconds by
    the app."""
    try:
        compiled = await st.policy.refresh()
    except PolicyUnavailable as exc:
        st.matrix_error = str(exc)
        return
    tools = tuple(sorted((e.server, e.name) for e in st.catalog.entries(kind="tool") if e.present))
    key = (st.policy.version, tools)
    if key == st.matrix_key or (st.matrix_task is not None and not st.matrix_task.done()):
        return

    async def compute() -> None:
        try:
            roles = matrix.policy_roles(compiled.sources)
            st.matrix = await asyncio.to_thread(_compute_matrix, compiled, st.policy.authz_entrypoint,
                                                roles, list(tools), st.settings.public_url,
                                                st.settings.matrix_tenants)
            st.matrix_key = key
            st.matrix_error = None
        except PolicyError as exc:
            st.matrix_error = str(exc)
            st.matrix_key = key  # not again until something changes
            logger.warning("who-may-call-what matrix failed: %s", exc)

    st.matrix_task = asyncio.create_task(compute())


async def matrix_page(request: web.Request) -> web.StreamResponse:
    st = state(request)
    await refresh_matrix(st)
    computing = st.matrix_task is not None and not st.matrix_task.done()
    all_m = st.matrix
    m = None
    if all_m is not None and all_m.by_tenant:
        wanted = request.query.get("tenant", "")
        m = all_m.by_tenant.get(wanted) or next(iter(all_m.by_tenant.values()))
    return page(request, "matrix.html", {"m": m, "all": all_m, "computing": computing,
                                         "max_evaluations": matrix.MAX_EVALUATIONS,
                                         "error": st.matrix_error,
                                         "policy_version": st.matrix_key[0] if st.matrix_key else 0})


# ------------------------------------------------------------------ policy playground

DEFAULT_CLAIMS = '{"sub": "alice", "roles": ["viewer"], "tenant": "acme", "scope": "tools:call:files/*"}'
DEFAULT_REQUEST = ('{"jsonrpc": "2.0", "id": 1, "method": "tools/call",\n'
                   ' "params": {"name": "read_file", "arguments": {"path": "README.md"}}}')


async def playground_page(request: web.Request) -> web.StreamResponse:
    st = state(request)
    return page(request, "playground.html", {
        "servers": st.settings.servers, "methods": METHODS, "form": {
            "claims": DEFAULT_CLAIMS, "request": DEFAULT_REQUEST, "server": st.settings.servers[0]
            if st.settings.servers else "", "method": "POST", "headers": "", "explain": False},
        "result": None})


def _headers_from(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        lead = ":" if line.startswith(":") else ""
        name, sep, value = line[len(lead):].partition(":")
        if not sep or not name.strip():
            raise ValueError(f"header line {line[:60]!r}: expected NAME: VALUE")
        out[lead + name.strip().lower()] = value.strip()
    return out


def _explain(sources: Any, entrypoint: str, policy_input: dict[str, Any]) -> list[str]:
    from gateway.policy.reference import ReferenceEngine
    from gateway.policy.testing import explain_decision
    with ReferenceEngine(sources) as ref:
        _, _, events = ref.evaluate(entrypoint, policy_input, trace=True)
    return explain_decision(events, sources, entrypoint)


async def playground_eval(request: web.Request) -> web.StreamResponse:
    st = state(request)
    form = await request.post()
    fields = {k: _text(form.get(k)) or "" for k in ("claims", "request", "server", "method", "headers")}
    explain = form.get("explain") == "on"
    context: dict[str, Any] = {"servers": st.settings.servers, "methods": METHODS,
                               "form": {**fields, "explain": explain}}
    result: dict[str, Any] = {}
    try:
        if any(len(v) > MAX_PLAYGROUND_FIELD for v in fields.values()):
            raise ValueError(f"a field exceeds {MAX_PLAYGROUND_FIELD} characters")
        if fields["server"] not in st.settings.servers:
            raise ValueError(f"unknown server {fields['server']!r}")
        claims = orjson.loads(fields["claims"] or "null")
        if not isinstance(claims, dict):
            raise ValueError("the claims must be a JSON object")
        method = fields["method"] or "POST"
        body = fields["request"].encode() if method == "POST" else None
        # The same function as `mcp-gateway policy eval`: the input ext_authz builds.
        policy_input = simulated_input(claims=claims, request=body, public_url=st.settings.public_url,
                                       server=fields["server"], method=method,
                                       headers=_headers_from(fields["headers"]))
        defined, value = await st.policy.evaluate(policy_input)
        result["input"] = orjson.dumps(policy_input, option=PRETTY).decode()
        result["value"] = orjson.dumps(value if defined else "<undefined>", option=PRETTY).decode()
        try:
            decision = check_decision(value, defined=defined)
            result.update(verdict="ALLOW" if decision.allow else "DENY", reason=decision.reason,
                          http_status=decision.http_status)
        except ContractViolation as exc:
            result.update(verdict="DENY", reason="policy_contract_error", http_status=500,
                          detail=str(exc))
        if explain and st.policy.sources is not None:
            result["explanation"] = await asyncio.to_thread(
                _explain, st.policy.sources, st.policy.authz_entrypoint, policy_input)
    except orjson.JSONDecodeError as exc:
        result = {"error": f"the claims are not JSON: {exc}"}
    except ValueError as exc:
        result = {"error": str(exc)}
    except GatewayError as exc:
        result = {"verdict": "DENY", "reason": exc.code, "http_status": exc.http_status,
                  "detail": f"refused by ext_authz before the policy: {exc.message}"}
    except (PolicyError, PolicyUnavailable) as exc:
        result = {"error": f"the policy failed: {exc}"}
    context["result"] = result
    return page(request, "playground.html", context)


# ------------------------------------------------------------------ decision log and audit


def _limit(query: Mapping[str, str], default: int) -> int:
    try:
        return max(1, min(int(query.get("limit", default)), MAX_AUDIT_ROWS))
    except ValueError:
        return default


async def _searched(request: web.Request, filters: Filters, limit: int, *,
                    tail: bool = False) -> SearchResult | web.Response:
    """The search, recorded in the audit trail (who, filters, rows) before anything is shown:
    a search that cannot be recorded is refused (503 audit_unavailable). The live tail's polls
    of a search recorded within activity.REPEAT_SECONDS are not recorded again."""
    st = state(request)
    session = session_of(request)
    if st.activity is None:
        return refuse(request, 503, "audit_unavailable",
                      "the console cannot record searches in the audit trail, so it makes none")
    result = await asyncio.to_thread(search, st.settings.audit_dir, filters, limit=limit,
                                     max_scan=MAX_AUDIT_SCAN, store=st.key_store)
    if not (tail and st.activity.recently_recorded(session.sub, filters)):
        try:
            await st.activity.record(session.claims, activity.SEARCH, filters,
                                     rows=len(result.rows), status="ok")
        except AuditUnavailable as exc:
            logger.error("console audit search refused: not recorded: %s", exc.message)
            return refuse(request, 503, "audit_unavailable", "the search could not be recorded in "
                          "the audit trail, so it is not shown")
    return result


async def audit_page(request: web.Request) -> web.StreamResponse:
    try:
        filters = Filters.from_query(request.query)
    except ValueError as exc:
        return refuse(request, 400, "bad_filter", str(exc))
    limit = _limit(request.query, 100)
    result = await _searched(request, filters, limit)
    if isinstance(result, web.Response):
        return result
    return page(request, "audit.html", {"f": filters, "r": result, "limit": limit,
                                        "query": request.query_string, "max_scan": MAX_AUDIT_SCAN})


async def audit_api(request: web.Request) -> web.StreamResponse:
    try:
        filters = Filters.from_query(request.query)
    except ValueError as exc:
        return refuse(request, 400, "bad_filter", str(exc))
    result = await _searched(request, filters, _limit(request.query, 50), tail=True)
    if isinstance(result, web.Response):
        return result
    return web.json_response({"rows": result.rows, "scanned": result.scanned,
                              "truncated": result.truncated})


EXPORT_BATCH = 1000


def _next_batch(rows: Iterator[dict[str, Any]], room: int) -> bytes:
    """Up to ``room`` (at most EXPORT_BATCH) rows as JSON lines (on a worker thread)."""
    out = []
    for row in itertools.islice(rows, min(room, EXPORT_BATCH)):
        out.append(orjson.dumps(row))
    return b"".join(line + b"\n" for line in out)


async def audit_export(request: web.Request) -> web.StreamResponse:
    """The matching entries as JSON lines, streamed in batches (never all in memory), at most
    MAX_EXPORT_ROWS; console action ``export``; one export at a time; recorded in the trail
    before the first row (refused when it cannot be) and again with the row count at the end."""
    st = state(request)
    session = session_of(request)
    try:
        filters = Filters.from_query(request.query)
    except ValueError as exc:
        return refuse(request, 400, "bad_filter", str(exc))
    decision = await st.policy.console_decision(session.claims, "export")
    if not decision.allow:
        return refuse(request, 403, decision.reason, "the policy does not let you export the audit trail")
    if st.activity is None:
        return refuse(request, 503, "audit_unavailable",
                      "the console cannot record exports in the audit trail, so it makes none")
    if st.export_lock.locked():
        return refuse(request, 429, "export_busy",
                      "another audit export is running: try again when it has finished")
    async with st.export_lock:
        try:
            await st.activity.record(session.claims, activity.EXPORT, filters, rows=None, status="started")
        except AuditUnavailable as exc:
            logger.error("console audit export refused: not recorded: %s", exc.message)
            return refuse(request, 503, "audit_unavailable",
                          "the export could not be recorded in the audit trail, so it is not made")
        progress = Progress()
        rows = iter_rows(st.settings.audit_dir, filters, max_scan=MAX_AUDIT_SCAN * 5,
                         store=st.key_store, progress=progress)
        status = "aborted"  # the client went away, or the trail could not be read
        written = 0
        response = web.StreamResponse(headers={
            "Content-Type": "application/x-ndjson",
            "Content-Disposition": 'attachment; filename="audit.jsonl"'})
        try:
            await response.prepare(request)
            while written < MAX_EXPORT_ROWS:
                before = progress.rows
                chunk = await asyncio.to_thread(_next_batch, rows, MAX_EXPORT_ROWS - written)
                written += progress.rows - before
                if not chunk:
                    break
                await response.write(chunk)
            status = "ok"
        finally:
            await asyncio.to_thread(rows.close)
            logger.info("console audit export", extra={"sub": session.sub, "rows": written,
                                                       "status": status,
                                                       "filters": request.query_string})
            try:
                await st.activity.record(session.claims, activity.EXPORT, filters, rows=written,
                                         status=status)
            except AuditUnavailable as exc:
                logger.error("console audit export: its end was not recorded: %s", exc.message)
        # The end is on disk before the client sees the export complete.
        await response.write_eof()
        return response


STATIC_DIR = Path(__file__).parent / "static"


def routes() -> list[web.AbstractRouteDef]:
    return [
        web.get(PREFIX, root), web.get(f"{PREFIX}/", root),
        web.get(f"{PREFIX}/login", login_get), web.post(f"{PREFIX}/login", login_post),
        web.post(f"{PREFIX}/logout", logout),
        web.get(f"{PREFIX}/oidc/start", oidc_start), web.get(f"{PREFIX}/oidc/callback", oidc_callback),
        web.get(f"{PREFIX}/overview", overview_page), web.get(f"{PREFIX}/api/overview", overview_api),
        web.get(f"{PREFIX}/catalog", catalog_page),
        web.get(f"{PREFIX}/catalog/{{server}}/{{kind}}/{{name}}", catalog_item),
        web.post(f"{PREFIX}/catalog/approve", catalog_approve),
        web.post(f"{PREFIX}/catalog/quarantine", catalog_quarantine),
        web.get(f"{PREFIX}/matrix", matrix_page),
        web.get(f"{PREFIX}/playground", playground_page), web.post(f"{PREFIX}/playground", playground_eval),
        web.get(f"{PREFIX}/audit", audit_page), web.get(f"{PREFIX}/api/audit", audit_api),
        web.get(f"{PREFIX}/audit/export", audit_export),
        web.static(f"{PREFIX}/static", STATIC_DIR, follow_symlinks=False),
    ]
