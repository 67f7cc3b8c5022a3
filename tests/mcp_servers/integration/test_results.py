from __future__ import annotations

from typing import Any

from mcp_servers.erp_demo.openapi import openapi_document
from mcp_servers.integration.client import BackendResponse, BackendUnavailable
from mcp_servers.integration.openapi import Operation, parse_operations
from mcp_servers.integration.results import backend_detail, failure_outcome, outcome_for, output_validator

OPS = {op.operation_id: op for op in parse_operations(openapi_document())}


def _resp(status: int, body: Any, reason: str = "", **kw: Any) -> BackendResponse:
    return BackendResponse(status, reason, body, not isinstance(body, str), **kw)


def _outcome(op: Operation, resp: BackendResponse) -> Any:
    return outcome_for(op, resp, output_validator(op))


def test_422_names_the_argument_to_fix() -> None:
    """A validation error carries status, the backend's message and the argument to fix."""
    body = {"error": {"code": "validation_error", "message": "quantity must be >= 1",
                      "field": "items[0].quantity"}}
    out = _outcome(OPS["createOrder"], _resp(422, body, "Unprocessable Entity"))
    assert out.is_error and out.structured is None
    text = out.texts[0]
    assert "HTTP 422" in text and "quantity must be >= 1" in text and "argument 'items[0].quantity'" in text


def test_post_5xx_says_it_was_not_retried() -> None:
    """A 5xx on POST tells the model to check for side effects before calling again."""
    out = _outcome(OPS["createOrder"], _resp(503, {"error": {"code": "x", "message": "db down"}}))
    assert out.is_error and "not retried" in out.texts[0] and "db down" in out.texts[0]
    out = _outcome(OPS["listOrders"], _resp(503, "bad gateway", attempts=3))
    assert "after 3 attempts" in out.texts[0]


def test_auth_and_not_found_messages_are_actionable() -> None:
    """401 blames the connector's configuration; 404 points at the identifiers."""
    out = _outcome(OPS["getCustomer"], _resp(401, {"error": {"code": "u", "message": "bad key"}}))
    assert "connector configuration" in out.texts[0]
    missing = {"error": {"code": "nf", "message": "customer 9 does not exist"}}
    out = _outcome(OPS["getCustomer"], _resp(404, missing))
    assert "customer 9 does not exist" in out.texts[0] and "identifiers" in out.texts[0]


def test_206_is_a_partial_result_not_an_error() -> None:
    """A 206 list with an error field is returned as data, flagged partial in the text."""
    body = {"items": [{"id": 5001, "order_id": 1001, "customer_id": 1, "amount_cents": 1, "currency": "EUR",
                       "status": "paid", "due_date": "2025-01-01"}], "error": "archive offline"}
    out = _outcome(OPS["listInvoices"], _resp(206, body, "Partial Content"))
    assert not out.is_error and out.structured == body
    assert out.texts[0].startswith("Partial result") and "archive offline" in out.texts[0]


def test_answers_that_break_the_document_are_errors() -> None:
    """A 200 whose body breaks the documented schema becomes an error naming where."""
    out = _outcome(OPS["getCustomer"], _resp(200, {"id": "one"}))
    assert out.is_error and "does not match its OpenAPI document" in out.texts[0]


def test_success_carries_structured_content() -> None:
    """A conforming JSON object is returned as structured content plus its JSON text."""
    body = {"rows": [{"country": "DE", "orders": 2, "revenue_cents": 10}]}
    out = _outcome(OPS["salesReport"], _resp(200, body))
    assert not out.is_error and out.structured == body and '"DE"' in out.texts[0]


def test_error_body_shapes() -> None:
    """Messages and fields are read from RFC 9457, FastAPI and list-of-errors bodies."""
    assert backend_detail({"title": "Bad", "detail": "x is wrong"}) == ("x is wrong", None)
    assert backend_detail({"detail": [{"loc": ["body", "qty"], "msg": "too small"}]}) == ("too small", "qty")
    assert backend_detail({"errors": [{"field": "a", "message": "m"}]}) == ("m", "a")
    assert backend_detail("plain  text") == ("plain text", None)


def test_circuit_open_failure_keeps_the_message() -> None:
    """A fail-fast rejection becomes an isError result with the breaker's message."""
    out = failure_outcome(OPS["listOrders"], BackendUnavailable("Backend 'erp' is unavailable", 3.0))
    assert out.is_error and "unavailable" in out.texts[0]
