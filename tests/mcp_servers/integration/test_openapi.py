from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from mcp_servers.erp_demo.openapi import openapi_document
from mcp_servers.integration.openapi import (
    BadArguments,
    OpenAPIError,
    Operation,
    build_request,
    check_document,
    load_document,
    parse_operations,
    sanitize_tool_name,
    select_operations,
    server_url,
)


def _ops(doc: dict[str, Any]) -> dict[str, Operation]:
    return {op.operation_id: op for op in parse_operations(check_document(doc))}


def _doc30(paths: dict[str, Any], schemas: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"openapi": "3.0.3", "info": {"title": "t", "version": "1"}, "paths": paths,
            "components": {"schemas": schemas or {}}}


def test_erp_operations_become_tools_with_method_annotations() -> None:
    """Every ERP operation maps to a tool; GET is read-only, DELETE destructive, POST not idempotent."""
    ops = _ops(openapi_document())
    assert set(ops) == {"listCustomers", "getCustomer", "listOrders", "createOrder", "getOrder",
                        "updateOrderNotes", "cancelOrder", "listInvoices", "getInvoice", "salesReport"}
    assert ops["listCustomers"].annotations["readOnlyHint"] is True
    assert ops["cancelOrder"].annotations == {"readOnlyHint": False, "destructiveHint": True,
                                              "idempotentHint": True, "openWorldHint": False}
    assert ops["createOrder"].annotations["idempotentHint"] is False
    assert ops["createOrder"].annotations["destructiveHint"] is False
    assert ops["getCustomer"].title == "Get one customer"
    assert "only open orders" in ops["cancelOrder"].description


def test_input_schema_combines_parameters_and_a_flattened_body() -> None:
    """Path/query parameters and the JSON body's properties form one closed input schema, refs inlined."""
    ops = _ops(openapi_document())
    get_order = ops["getOrder"].input_schema  # path-level parameter inherited
    assert get_order["required"] == ["order_id"] and get_order["additionalProperties"] is False
    create = ops["createOrder"].input_schema
    assert set(create["properties"]) == {"customer_id", "items", "notes"}
    assert create["required"] == ["customer_id", "items"]
    line = create["properties"]["items"]["items"]
    assert line["properties"]["quantity"]["minimum"] == 1 and "$ref" not in json.dumps(create)
    for op in ops.values():
        jsonschema.Draft202012Validator.check_schema(op.input_schema)


def test_output_schema_only_for_object_2xx_answers() -> None:
    """outputSchema is the shared 2xx JSON object schema; 206 beside 200 with the same schema is kept."""
    ops = _ops(openapi_document())
    assert ops["getCustomer"].output_schema is not None
    assert ops["getCustomer"].output_schema["type"] == "object"
    assert "error" in (ops["listInvoices"].output_schema or {})["properties"]
    doc = _doc30({
        "/a": {"get": {"operationId": "arr", "responses": {"200": {"description": "x", "content": {
            "application/json": {"schema": {"type": "array", "items": {"type": "string"}}}}}}}},
        "/b": {"get": {"operationId": "mixed", "responses": {
            "200": {"description": "x", "content": {"application/json": {"schema": {"type": "object"}}}},
            "204": {"description": "empty"}}}},
    })
    ops = _ops(doc)
    assert ops["arr"].output_schema is None and ops["mixed"].output_schema is None


def test_openapi30_nullable_and_exclusive_bounds_become_json_schema() -> None:
    """3.0 nullable and boolean exclusiveMinimum are rewritten; readOnly properties leave the input."""
    thing = {"type": "object", "required": ["id", "name"], "properties": {
        "id": {"type": "integer", "readOnly": True},
        "name": {"type": "string", "nullable": True, "example": "x"},
        "size": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
    }}
    doc = _doc30({"/things": {"post": {
        "operationId": "make",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "$ref": "#/components/schemas/Thing"}}}},
        "responses": {"201": {"description": "ok", "content": {"application/json": {"schema": {
            "$ref": "#/components/schemas/Thing"}}}}},
    }}}, {"Thing": thing})
    op = _ops(doc)["make"]
    props = op.input_schema["properties"]
    assert "id" not in props and op.input_schema["required"] == ["name"]
    assert props["name"]["type"] == ["string", "null"] and props["name"]["examples"] == ["x"]
    assert props["size"]["exclusiveMinimum"] == 0 and "minimum" not in props["size"]
    assert op.output_schema is not None and "id" in op.output_schema["properties"]


def test_recursive_refs_are_cut_and_external_refs_rejected() -> None:
    """A self-referencing schema terminates; an external $ref is a clear start-up error."""
    node = {"type": "object", "properties": {"children": {"type": "array",
                                                          "items": {"$ref": "#/components/schemas/Node"}}}}
    ref = {"$ref": "#/components/schemas/Node"}
    doc = _doc30({"/tree": {"get": {"operationId": "tree", "responses": {"200": {
        "description": "x", "content": {"application/json": {"schema": ref}}}}}}}, {"Node": node})
    out = _ops(doc)["tree"].output_schema
    assert out is not None
    assert "recursive" in out["properties"]["children"]["items"]["description"]
    doc["paths"]["/tree"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] = {
        "$ref": "other.yaml#/Node"}
    with pytest.raises(OpenAPIError, match="external"):
        parse_operations(doc)


def test_body_nested_when_it_collides_and_credential_headers_dropped() -> None:
    """A body colliding with parameters nests under `body`; tools may not set Authorization."""
    doc = _doc30({"/items/{id}": {"put": {
        "operationId": "replace item!",
        "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
                       {"name": "Authorization", "in": "header", "schema": {"type": "string"}},
                       {"name": "X-Trace", "in": "header", "schema": {"type": "string"}}],
        "requestBody": {"content": {"application/json": {"schema": {
            "type": "object", "properties": {"id": {"type": "string"}, "v": {"type": "integer"}}}}}},
        "responses": {"204": {"description": "done"}},
    }}})
    op = parse_operations(doc)[0]
    assert op.tool_name == "replace_item" and op.annotations["idempotentHint"] is True
    assert set(op.input_schema["properties"]) == {"id", "X-Trace", "body"}
    req = build_request(op, {"id": "a/b", "X-Trace": "t1", "body": {"id": "x", "v": 1}})
    assert req.path == "/items/a%2Fb" and req.headers == {"X-Trace": "t1"}
    assert req.json_body == {"id": "x", "v": 1} and req.method == "PUT"


def test_build_request_encodes_query_and_refuses_dot_segments() -> None:
    """Booleans and lists are encoded for the query; '..' as a path value is refused."""
    ops = _ops(openapi_document())
    req = build_request(ops["listInvoices"], {"include_archived": True, "customer_id": 2})
    assert dict(req.query) == {"include_archived": "true", "customer_id": "2"} and not req.has_body
    req = build_request(ops["createOrder"], {"customer_id": 1, "items": []})
    assert req.json_body == {"customer_id": 1, "items": []} and req.has_body
    with pytest.raises(BadArguments):
        build_request(ops["getCustomer"], {"customer_id": ".."})


def test_allowlist_is_required_and_checked() -> None:
    """No allowlist refuses to start; unknown ids are named; --allow-all exposes everything."""
    ops = parse_operations(openapi_document())
    with pytest.raises(OpenAPIError, match="--allow"):
        select_operations(ops, [], False)
    with pytest.raises(OpenAPIError, match="deleteEverything"):
        select_operations(ops, ["getCustomer", "deleteEverything"], False)
    chosen = select_operations(ops, ["getCustomer", "listOrders"], False)
    assert [o.operation_id for o in chosen] == ["getCustomer", "listOrders"]
    assert len(select_operations(ops, [], True)) == len(ops)


def test_tool_names_follow_mcp_rules_and_stay_unique() -> None:
    """Names keep only [A-Za-z0-9_.-], at most 128 chars; clashes get a suffix; missing ids are derived."""
    assert sanitize_tool_name("orders/list by id") == "orders_list_by_id"
    assert len(sanitize_tool_name("x" * 300)) == 128
    doc = _doc30({"/a b": {"get": {"operationId": "a b", "responses": {}}},
                  "/a_b": {"get": {"operationId": "a_b", "responses": {}}},
                  "/c/{id}": {"delete": {"responses": {}}}})
    names = [op.tool_name for op in parse_operations(doc)]
    assert names == ["a_b", "a_b_2", "delete_c_id"]


def test_load_document_reads_yaml_and_rejects_swagger(tmp_path: Path) -> None:
    """YAML files load; Swagger 2 and non-3.x documents are refused with a clear message."""
    f = tmp_path / "api.yaml"
    f.write_text(yaml.safe_dump(openapi_document("http://erp.example")))
    doc = load_document(str(f))
    assert server_url(doc, str(f)) == "http://erp.example"
    f.write_text(json.dumps({"swagger": "2.0"}))
    with pytest.raises(OpenAPIError, match="Swagger"):
        load_document(str(f))
    with pytest.raises(OpenAPIError, match="version"):
        check_document({"openapi": "4.0.0"})
