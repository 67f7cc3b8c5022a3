from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from mcp_servers.erp_demo import ErpSettings, make_app
from tests.mcp_servers.erp_demo.conftest import API_KEY, Erp


async def _get(erp: Erp, path: str, status: int = 200, extra: dict[str, str] | None = None) -> Any:
    async with erp.session.get(erp.url + path, headers={**erp.auth, **(extra or {})}) as resp:
        assert resp.status == status, await resp.text()
        return await resp.json()


async def test_requests_without_the_api_key_are_refused(erp: Erp) -> None:
    """Business endpoints answer 401 without a valid X-API-Key; the OpenAPI document stays public."""
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": f"Bearer {API_KEY}"}):
        async with erp.session.get(erp.url + "/customers", headers=headers) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "unauthorized"
    async with erp.session.get(erp.url + "/openapi.json") as resp:
        assert resp.status == 200


async def test_seeded_customers_are_paged_and_carry_contact_data(erp: Erp) -> None:
    """The seed has customers with emails and phone numbers, served page by page."""
    page = await _get(erp, "/customers?limit=2")
    assert page["total"] == 5 and page["next_offset"] == 2 and len(page["items"]) == 2
    assert "@" in page["items"][0]["email"] and page["items"][0]["phone"].startswith("+")
    last = await _get(erp, "/customers?limit=2&offset=4")
    assert last["next_offset"] is None
    assert (await _get(erp, "/customers?country=SE"))["items"][0]["name"] == "Nordlicht Foods AB"


async def test_bad_parameters_name_the_field(erp: Erp) -> None:
    """Invalid query or path values give 400 with the offending field; unknown ids give 404."""
    body = await _get(erp, "/customers?limit=500", status=400)
    assert body["error"]["field"] == "limit"
    body = await _get(erp, "/orders?status=lost", status=400)
    assert body["error"]["field"] == "status"
    body = await _get(erp, "/customers/999", status=404)
    assert body["error"]["code"] == "not_found"


async def test_order_lifecycle_create_update_cancel(erp: Erp) -> None:
    """An order is created (201), its notes changed, then cancelled; a second cancel conflicts."""
    new = {"customer_id": 2, "items": [{"sku": "BOX-1", "quantity": 3, "unit_price_cents": 250}]}
    async with erp.session.post(erp.url + "/orders", json=new, headers=erp.auth) as resp:
        assert resp.status == 201
        order = await resp.json()
    assert order["status"] == "open" and order["total_cents"] == 750
    oid = order["id"]
    async with erp.session.patch(f"{erp.url}/orders/{oid}", json={"notes": "rush"}, headers=erp.auth) as resp:
        assert (await resp.json())["notes"] == "rush"
    async with erp.session.delete(f"{erp.url}/orders/{oid}", headers=erp.auth) as resp:
        assert (await resp.json())["status"] == "cancelled"
    async with erp.session.delete(f"{erp.url}/orders/{oid}", headers=erp.auth) as resp:
        assert resp.status == 409


async def test_invalid_order_gives_422_with_the_field(erp: Erp) -> None:
    """A bad order line is rejected with 422 naming the exact field; a missing customer with 404."""
    bad = {"customer_id": 1, "items": [{"sku": "A", "quantity": 0, "unit_price_cents": 1}]}
    async with erp.session.post(erp.url + "/orders", json=bad, headers=erp.auth) as resp:
        assert resp.status == 422
        assert (await resp.json())["error"]["field"] == "items[0].quantity"
    ghost = {"customer_id": 77, "items": [{"sku": "A", "quantity": 1, "unit_price_cents": 1}]}
    async with erp.session.post(erp.url + "/orders", json=ghost, headers=erp.auth) as resp:
        assert resp.status == 404


async def test_archived_invoices_give_a_partial_206_answer(erp: Erp) -> None:
    """With the archive offline, include_archived returns current invoices, 206 and an error note."""
    async with erp.session.get(erp.url + "/invoices?include_archived=true", headers=erp.auth) as resp:
        assert resp.status == 206
        body = await resp.json()
    assert {i["id"] for i in body["items"]} == {5001, 5002} and "archive" in body["error"]


async def test_debug_log_records_credentials_and_faults_inject_errors(erp: Erp) -> None:
    """The debug log shows each request's X-API-Key and Authorization; faults answer with their status."""
    await _get(erp, "/customers/1", extra={"x-mcp-user": "alice"})
    log = (await _get(erp, "/_debug/requests"))["requests"]
    assert log[-1]["x_api_key"] == API_KEY and log[-1]["authorization"] is None
    assert log[-1]["forwarded_identity"] == {"x-mcp-user": "alice"}
    async with erp.session.post(erp.url + "/_debug/faults", headers=erp.auth,
                                json={"method": "POST", "path": "/orders", "status": 503,
                                      "times": 1}) as resp:
        assert resp.status == 201
    new = {"customer_id": 2, "items": [{"sku": "BOX-1", "quantity": 1, "unit_price_cents": 1}]}
    async with erp.session.post(erp.url + "/orders", json=new, headers=erp.auth) as resp:
        assert resp.status == 503
    async with erp.session.post(erp.url + "/orders", json=new, headers=erp.auth) as resp:
        assert resp.status == 201


async def test_debug_endpoints_are_absent_unless_enabled() -> None:
    """Without debug=True the /_debug routes do not exist."""
    app = make_app(ErpSettings(api_key="k"))
    assert not [r for r in app.router.routes() if r.resource and "_debug" in r.resource.canonical]


def test_empty_api_key_is_refused() -> None:
    """The backend refuses to start without an API key (fail closed)."""
    with pytest.raises(ValueError, match="API key"):
        make_app(ErpSettings(api_key=""))


async def test_openapi_document_matches_real_answers(erp: Erp) -> None:
    """Every schema in /openapi.json is valid JSON Schema and the real answers validate against them."""
    async with erp.session.get(erp.url + "/openapi.json") as resp:
        doc = await resp.json()
    assert doc["openapi"].startswith("3.1") and doc["servers"][0]["url"] == erp.url
    schemas = doc["components"]["schemas"]
    for schema in schemas.values():
        jsonschema.Draft202012Validator.check_schema(schema)

    def check(name: str, value: Any) -> None:
        jsonschema.validate(value, {"$ref": f"#/components/schemas/{name}", "components": doc["components"]})

    check("CustomerList", await _get(erp, "/customers"))
    check("OrderList", await _get(erp, "/orders"))
    check("Order", await _get(erp, "/orders/1002"))
    check("InvoiceList", await _get(erp, "/invoices"))
    check("Invoice", await _get(erp, "/invoices/5001"))
    check("SalesReport", await _get(erp, "/reports/sales"))
    check("ErrorBody", await _get(erp, "/orders/4242", status=404))
