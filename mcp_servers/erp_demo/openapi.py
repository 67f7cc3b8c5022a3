"""The OpenAPI 3.1 document of the demo ERP, served at ``/openapi.json``.

Written by hand (not generated) so it reads like a real vendor document: shared schemas under
``components`` referenced with ``$ref``, a structured error object, and a 206 partial answer.
"""

from __future__ import annotations

import copy
from typing import Any

_ERROR = {"$ref": "#/components/responses/Error"}
_ID = {"type": "integer", "minimum": 1}


def _param(name: str, where: str, schema: dict[str, Any], description: str,
           required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required or where == "path",
            "description": description, "schema": schema}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_PAGING = [
    _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
           "Page size."),
    _param("offset", "query", {"type": "integer", "minimum": 0, "default": 0}, "Rows to skip."),
]

_COMPONENTS: dict[str, Any] = {
    "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
    "responses": {
        "Error": _json({"$ref": "#/components/schemas/ErrorBody"}, "The request failed."),
    },
    "schemas": {
        "ErrorBody": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "field": {"type": "string", "description": "The offending parameter, if any."},
                },
            }},
        },
        "Customer": {
            "type": "object",
            "required": ["id", "name", "email", "phone", "country", "credit_limit_cents"],
            "properties": {
                "id": _ID,
                "name": {"type": "string"},
                "email": {"type": "string", "format": "email"},
                "phone": {"type": "string"},
                "country": {"type": "string", "description": "ISO 3166-1 alpha-2 code."},
                "credit_limit_cents": {"type": "integer"},
            },
        },
        "CustomerList": {
            "type": "object",
            "required": ["items", "total"],
            "properties": {
                "items": {"type": "array", "items": {"$ref": "#/components/schemas/Customer"}},
                "total": {"type": "integer"},
                "next_offset": {"type": ["integer", "null"]},
            },
        },
        "OrderLine": {
            "type": "object",
            "required": ["sku", "quantity", "unit_price_cents"],
            "properties": {
                "sku": {"type": "string", "minLength": 1, "maxLength": 32},
                "quantity": {"type": "integer", "minimum": 1, "maximum": 100000},
                "unit_price_cents": {"type": "integer", "minimum": 0},
            },
        },
        "Order": {
            "type": "object",
            "required": ["id", "customer_id", "status", "created_at", "items", "total_cents"],
            "properties": {
                "id": _ID,
                "customer_id": _ID,
                "status": {"type": "string", "enum": ["open", "shipped", "invoiced", "cancelled"]},
                "created_at": {"type": "string", "format": "date-time"},
                "notes": {"type": ["string", "null"]},
                "items": {"type": "array", "items": {"$ref": "#/components/schemas/OrderLine"}},
                "total_cents": {"type": "integer"},
            },
        },
        "OrderList": {
            "type": "object",
            "required": ["items", "total"],
            "properties": {
                "items": {"type": "array", "items": {"$ref": "#/components/schemas/Order"}},
                "total": {"type": "integer"},
                "next_offset": {"type": ["integer", "null"]},
            },
        },
        "NewOrder": {
            "type": "object",
            "required": ["customer_id", "items"],
            "properties": {
                "customer_id": _ID,
                "items": {"type": "array", "minItems": 1, "maxItems": 50,
                          "items": {"$ref": "#/components/schemas/OrderLine"}},
                "notes": {"type": "string", "maxLength": 500},
            },
        },
        "Invoice": {
            "type": "object",
            "required": ["id", "order_id", "customer_id", "amount_cents", "currency", "status", "due_date"],
            "properties": {
                "id": _ID,
                "order_id": _ID,
                "customer_id": _ID,
                "amount_cents": {"type": "integer"},
                "currency": {"type": "string"},
                "status": {"type": "string", "enum": ["open", "paid", "overdue"]},
                "due_date": {"type": "string", "format": "date"},
            },
        },
        "InvoiceList": {
            "type": "object",
            "required": ["items"],
            "properties": {
                "items": {"type": "array", "items": {"$ref": "#/components/schemas/Invoice"}},
                "error": {"type": "string",
                          "description": "Set on a 206 answer: why some invoices are missing."},
            },
        },
        "SalesReport": {
            "type": "object",
            "required": ["rows"],
            "properties": {"rows": {"type": "array", "items": {
                "type": "object",
                "required": ["country", "orders", "revenue_cents"],
                "properties": {"country": {"type": "string"}, "orders": {"type": "integer"},
                               "revenue_cents": {"type": "integer"}},
            }}},
        },
    },
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def openapi_document(server_url: str | None = None) -> dict[str, Any]:
    """The document; ``server_url`` fills ``servers`` so clients can find the base URL."""
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "Demo ERP", "version": "1.0.0",
                 "description": "Customers, orders and invoices of a small wholesale business."},
        "security": [{"apiKey": []}],
        "paths": {
            "/customers": {"get": {
                "operationId": "listCustomers",
                "summary": "List customers",
                "description": "Customers ordered by id, optionally filtered by country.",
                "parameters": [
                    _param("country", "query", {"type": "string", "pattern": "^[A-Z]{2}$"},
                           "ISO 3166-1 alpha-2 country code."),
                    *_PAGING,
                ],
                "responses": {"200": _json(_ref("CustomerList"), "A page of customers."),
                              "400": _ERROR},
            }},
            "/customers/{customer_id}": {"get": {
                "operationId": "getCustomer",
                "summary": "Get one customer",
                "parameters": [_param("customer_id", "path", _ID, "Customer id.")],
                "responses": {"200": _json(_ref("Customer"), "The customer."), "404": _ERROR},
            }},
            "/orders": {
                "get": {
                    "operationId": "listOrders",
                    "summary": "List orders",
                    "parameters": [
                        _param("customer_id", "query", _ID, "Only this customer's orders."),
                        _param("status", "query", {"type": "string", "enum": ["open", "shipped", "invoiced",
                                                                              "cancelled"]},
                               "Only orders in this status."),
                        *_PAGING,
                    ],
                    "responses": {"200": _json(_ref("OrderList"), "A page of orders."), "400": _ERROR},
                },
                "post": {
                    "operationId": "createOrder",
                    "summary": "Create an order",
                    "description": "Creates an open order for an existing customer.",
                    "requestBody": {"required": True,
                                    "content": {"application/json": {"schema": _ref("NewOrder")}}},
                    "responses": {"201": _json(_ref("Order"), "The new order."), "404": _ERROR,
                                  "422": _ERROR},
                },
            },
            "/orders/{order_id}": {
                "parameters": [_param("order_id", "path", _ID, "Order id.")],
                "get": {
                    "operationId": "getOrder",
                    "summary": "Get one order",
                    "responses": {"200": _json(_ref("Order"), "The order."), "404": _ERROR},
                },
                "patch": {
                    "operationId": "updateOrderNotes",
                    "summary": "Change an order's notes",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {
                        "type": "object", "required": ["notes"],
                        "properties": {"notes": {"type": ["string", "null"], "maxLength": 500}},
                    }}}},
                    "responses": {"200": _json(_ref("Order"), "The updated order."), "404": _ERROR,
                                  "409": _ERROR, "422": _ERROR},
                },
                "delete": {
                    "operationId": "cancelOrder",
                    "summary": "Cancel an open order",
                    "description": "Cancelling keeps the order for audit; only open orders can be cancelled.",
                    "responses": {"200": _json(_ref("Order"), "The cancelled order."), "404": _ERROR,
                                  "409": _ERROR},
                },
            },
            "/invoices": {"get": {
                "operationId": "listInvoices",
                "summary": "List invoices",
                "description": "Current invoices; with include_archived the archive store is asked too. "
                               "When the archive is offline the answer is 206 with the current invoices "
                               "and an error saying what is missing.",
                "parameters": [
                    _param("customer_id", "query", _ID, "Only this customer's invoices."),
                    _param("status", "query", {"type": "string", "enum": ["open", "paid", "overdue"]},
                           "Only invoices in this status."),
                    _param("include_archived", "query", {"type": "boolean", "default": False},
                           "Also return archived invoices."),
                ],
                "responses": {"200": _json(_ref("InvoiceList"), "The invoices."),
                              "206": _json(_ref("InvoiceList"), "Some invoices could not be read."),
                              "400": _ERROR},
            }},
            "/invoices/{invoice_id}": {"get": {
                "operationId": "getInvoice",
                "summary": "Get one invoice",
                "parameters": [_param("invoice_id", "path", _ID, "Invoice id.")],
                "responses": {"200": _json(_ref("Invoice"), "The invoice."), "404": _ERROR},
            }},
            "/reports/sales": {"get": {
                "operationId": "salesReport",
                "summary": "Revenue per country",
                "description": "Aggregates all non-cancelled orders. The report is slow on big books; "
                               "delay_ms simulates that.",
                "parameters": [_param("delay_ms", "query", {"type": "integer", "minimum": 0,
                                                            "maximum": 60000},
                                      "Extra server-side delay in milliseconds.")],
                "responses": {"200": _json(_ref("SalesReport"), "The report.")},
            }},
        },
        "components": copy.deepcopy(_COMPONENTS),
    }
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc
