"""The demo ERP's HTTP API (aiohttp): REST endpoints over :mod:`mcp_servers.erp_demo.db`.

Besides the business endpoints it has two test aids, enabled only with ``debug=True``:
``/_debug/requests`` lists which credentials each request carried (so tests can prove the MCP
client's token never reaches the backend) and ``/_debug/faults`` injects error answers or delays.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from mcp_servers.erp_demo.db import INVOICE_STATUSES, ORDER_STATUSES, Conflict, ErpStore, NotFound, OrderLine
from mcp_servers.erp_demo.openapi import openapi_document

logger = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/openapi.json", "/health"})
MAX_RECORDED = 1000
MAX_BODY_BYTES = 256 * 1024


@dataclass(frozen=True)
class ErpSettings:
    api_key: str
    db_path: str = ":memory:"
    debug: bool = False
    archive_online: bool = False


@dataclass
class Fault:
    method: str
    path: str
    status: int
    times: int
    delay_ms: int = 0


class _State:
    def __init__(self, settings: ErpSettings) -> None:
        self.settings = settings
        self.store: ErpStore | None = None
        self.requests: deque[dict[str, Any]] = deque(maxlen=MAX_RECORDED)
        self.faults: list[Fault] = []

    @property
    def db(self) -> ErpStore:
        if self.store is None:
            raise RuntimeError("ERP store used before start-up")
        return self.store


STATE = web.AppKey("erp_state", _State)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field

    def response(self) -> web.Response:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field:
            err["field"] = self.field
        return web.json_response({"error": err}, status=self.status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except NotFound as e:
        return ApiError(404, "not_found", str(e)).response()
    except Conflict as e:
        return ApiError(409, "conflict", str(e)).response()


@web.middleware
async def _auth_and_record(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    debug_path = request.path.startswith("/_debug/")
    if not debug_path and request.path not in PUBLIC_PATHS:
        state.requests.append({
            "method": request.method,
            "path": request.path,
            "query": dict(request.query),
            "x_api_key": request.headers.get("X-API-Key"),
            "authorization": request.headers.get("Authorization"),
            "forwarded_identity": {k.lower(): v for k, v in request.headers.items()
                                   if k.lower().startswith("x-mcp-")},
        })
    if request.path not in PUBLIC_PATHS:
        key = request.headers.get("X-API-Key", "")
        if not hmac.compare_digest(key.encode(), state.settings.api_key.encode()):
            raise ApiError(401, "unauthorized", "missing or invalid X-API-Key header")
    if not debug_path:
        for fault in state.faults:
            if fault.times > 0 and fault.method == request.method and fault.path == request.path:
                fault.times -= 1
                if fault.delay_ms:
                    await asyncio.sleep(fault.delay_ms / 1000)
                if fault.status:
                    raise ApiError(fault.status, "injected_fault",
                                   f"injected {fault.status} by /_debug/faults")
    return await handler(request)


def _int_query(request: web.Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "invalid_parameter", f"{name} must be an integer, got {raw!r}", name) from None
    if not lo <= value <= hi:
        raise ApiError(400, "invalid_parameter", f"{name} must be between {lo} and {hi}, got {value}", name)
    return value


def _enum_query(request: web.Request, name: str, allowed: tuple[str, ...]) -> str | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    if raw not in allowed:
        raise ApiError(400, "invalid_parameter", f"{name} must be one of {', '.join(allowed)}, got {raw!r}",
                       name)
    return raw


def _path_id(request: web.Request, name: str) -> int:
    raw = request.match_info[name]
    if not raw.isdigit() or int(raw) < 1:
        raise ApiError(400, "invalid_parameter", f"{name} must be a positive integer, got {raw!r}", name)
    return int(raw)


def _page(items: list[dict[str, Any]], total: int, offset: int) -> dict[str, Any]:
    nxt = offset + len(items)
    return {"items": items, "total": total, "next_offset": nxt if nxt < total else None}


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, "too_large", f"request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "invalid_json", "request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(422, "validation_error", "request body must be a JSON object")
    return body


def _int_field(obj: dict[str, Any], name: str, where: str, lo: int, hi: int) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(422, "validation_error", f"{where} is required and must be an integer", where)
    if not lo <= value <= hi:
        raise ApiError(422, "validation_error", f"{where} must be between {lo} and {hi}, got {value}", where)
    return value


def _notes(body: dict[str, Any], required: bool) -> str | None:
    if required and "notes" not in body:
        raise ApiError(422, "validation_error", "notes is required (null clears it)", "notes")
    notes = body.get("notes")
    if notes is not None and (not isinstance(notes, str) or len(notes) > 500):
        raise ApiError(422, "validation_error", "notes must be a string of at most 500 characters", "notes")
    return notes


# handlers
async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(f"{request.scheme}://{request.host}"))


async def list_customers(request: web.Request) -> web.Response:
    country = request.query.get("country") or None
    if country is not None and not (len(country) == 2 and country.isascii() and country.isupper()):
        raise ApiError(400, "invalid_parameter", f"country must be a 2-letter code like DE, got {country!r}",
                       "country")
    limit = _int_query(request, "limit", 20, 1, 100) or 20
    offset = _int_query(request, "offset", 0, 0, 1_000_000) or 0
    items, total = request.app[STATE].db.list_customers(country=country, limit=limit, offset=offset)
    return web.json_response(_page(items, total, offset))


async def get_customer(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].db.get_customer(_path_id(request, "customer_id")))


async def list_orders(request: web.Request) -> web.Response:
    customer_id = _int_query(request, "customer_id", None, 1, 2**31)
    status = _enum_query(request, "status", ORDER_STATUSES)
    limit = _int_query(request, "limit", 20, 1, 100) or 20
    offset = _int_query(request, "offset", 0, 0, 1_000_000) or 0
    items, total = request.app[STATE].db.list_orders(customer_id=customer_id, status=status, limit=limit,
                                                     offset=offset)
    return web.json_response(_page(items, total, offset))


async def create_order(request: web.Request) -> web.Response:
    body = await _json_body(request)
    customer_id = _int_field(body, "customer_id", "customer_id", 1, 2**31)
    raw_items = body.get("items")
    if not isinstance(raw_items, list) or not 1 <= len(raw_items) <= 50:
        raise ApiError(422, "validation_error", "items must be a list of 1 to 50 order lines", "items")
    lines = []
    for i, item in enumerate(raw_items):
        where = f"items[{i}]"
        if not isinstance(item, dict):
            raise ApiError(422, "validation_error", f"{where} must be an object", where)
        sku = item.get("sku")
        if not isinstance(sku, str) or not 1 <= len(sku) <= 32:
            raise ApiError(422, "validation_error", f"{where}.sku must be a string of 1 to 32 characters",
                           f"{where}.sku")
        lines.append(OrderLine(sku, _int_field(item, "quantity", f"{where}.quantity", 1, 100000),
                               _int_field(item, "unit_price_cents", f"{where}.unit_price_cents", 0, 10**9)))
    notes = _notes(body, required=False)
    created_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    order = request.app[STATE].db.create_order(customer_id, lines, notes, created_at)
    return web.json_response(order, status=201)


async def get_order(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].db.get_order(_path_id(request, "order_id")))


async def update_order(request: web.Request) -> web.Response:
    order_id = _path_id(request, "order_id")
    notes = _notes(await _json_body(request), required=True)
    return web.json_response(request.app[STATE].db.update_order_notes(order_id, notes))


async def cancel_order(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].db.cancel_order(_path_id(request, "order_id")))


async def list_invoices(request: web.Request) -> web.Response:
    state = request.app[STATE]
    customer_id = _int_query(request, "customer_id", None, 1, 2**31)
    status = _enum_query(request, "status", INVOICE_STATUSES)
    archived_raw = request.query.get("include_archived", "false").lower()
    if archived_raw not in ("true", "false", "1", "0"):
        raise ApiError(400, "invalid_parameter",
                       f"include_archived must be true or false, got {archived_raw!r}", "include_archived")
    items = state.db.list_invoices(customer_id=customer_id, status=status, archived=False)
    if archived_raw in ("true", "1"):
        if not state.settings.archive_online:
            return web.json_response(
                {"items": items, "error": "the invoice archive is offline; archived invoices are missing"},
                status=206)
        items += state.db.list_invoices(customer_id=customer_id, status=status, archived=True)
    return web.json_response({"items": items})


async def get_invoice(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].db.get_invoice(_path_id(request, "invoice_id")))


async def sales_report(request: web.Request) -> web.Response:
    delay_ms = _int_query(request, "delay_ms", 0, 0, 60000) or 0
    if delay_ms:
        await asyncio.sleep(delay_ms / 1000)
    return web.json_response({"rows": request.app[STATE].db.sales_by_country()})


# debug aids
async def debug_requests(request: web.Request) -> web.Response:
    return web.json_response({"requests": list(request.app[STATE].requests)})


async def debug_clear_requests(request: web.Request) -> web.Response:
    request.app[STATE].requests.clear()
    return web.json_response({"cleared": True})


async def debug_add_fault(request: web.Request) -> web.Response:
    body = await _json_body(request)
    try:
        fault = Fault(method=str(body["method"]).upper(), path=str(body["path"]),
                      status=int(body.get("status", 0)), times=int(body.get("times", 1)),
                      delay_ms=int(body.get("delay_ms", 0)))
    except (KeyError, TypeError, ValueError):
        raise ApiError(422, "validation_error",
                       "fault needs method, path and integer status/times/delay_ms") from None
    request.app[STATE].faults.append(fault)
    return web.json_response({"added": True}, status=201)


async def debug_clear_faults(request: web.Request) -> web.Response:
    request.app[STATE].faults.clear()
    return web.json_response({"cleared": True})


def make_app(settings: ErpSettings) -> web.Application:
    if not settings.api_key:
        raise ValueError("the ERP demo needs a non-empty API key")
    app = web.Application(middlewares=[_errors, _auth_and_record], client_max_size=MAX_BODY_BYTES)
    state = _State(settings)
    app[STATE] = state

    async def store_ctx(app: web.Application) -> Any:
        state.store = ErpStore(settings.db_path)
        yield
        state.store.close()
        state.store = None

    app.cleanup_ctx.append(store_ctx)
    r = app.router
    r.add_get("/health", health)
    r.add_get("/openapi.json", openapi_json)
    r.add_get("/customers", list_customers)
    r.add_get("/customers/{customer_id}", get_customer)
    r.add_get("/orders", list_orders)
    r.add_post("/orders", create_order)
    r.add_get("/orders/{order_id}", get_order)
    r.add_patch("/orders/{order_id}", update_order)
    r.add_delete("/orders/{order_id}", cancel_order)
    r.add_get("/invoices", list_invoices)
    r.add_get("/invoices/{invoice_id}", get_invoice)
    r.add_get("/reports/sales", sales_report)
    if settings.debug:
        r.add_get("/_debug/requests", debug_requests)
        r.add_delete("/_debug/requests", debug_clear_requests)
        r.add_post("/_debug/faults", debug_add_fault)
        r.add_delete("/_debug/faults", debug_clear_faults)
    return app
