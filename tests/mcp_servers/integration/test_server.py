"""The real integration server in front of the real ERP demo, both as subprocesses, driven by the
official MCP SDK client (mcp 2.3.0, Streamable HTTP)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import ClientSession, types
from mcp.client.streamable_http import streamable_http_client

from mcp_servers.erp_demo.openapi import openapi_document
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[3]
ERP_KEY = "erp-connector-key-123"
CLIENT_TOKEN = "client-bearer-token-must-not-leak"
CLIENT_INFO = types.Implementation(name="integration-test", version="1.0")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@dataclass
class Proc:
    argv: list[str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> bool:
        env = {**os.environ, "ERP_TEST_KEY": ERP_KEY, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([*self.argv, "--port", str(self.port)], cwd=REPO, env=env,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while self.proc.poll() is None and time.monotonic() < deadline:
            if _healthy(self.url + "/health"):
                return True
            time.sleep(0.05)  # poll interval against the deadline
        self.stop()
        return False

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


def _launch(argv: list[str], log_path: Path) -> Proc:
    for _attempt in range(3):  # a probed free port can be taken before the child binds it
        p = Proc(argv, free_port(), log_path)
        if p.start():
            return p
    pytest.fail(f"{argv[2]} did not become healthy:\n{log_path.read_text(errors='replace')[-3000:]}")


def _erp(work: Path) -> Proc:
    return _launch([sys.executable, "-m", "mcp_servers.erp_demo", "--debug", "--api-key-env", "ERP_TEST_KEY",
                    "--db", str(work / "erp.sqlite3")], work / "erp.log")


def _integration(work: Path, erp: Proc, *extra: str) -> Proc:
    return _launch([sys.executable, "-m", "mcp_servers.integration", "--host", "127.0.0.1",
                    "--openapi", erp.url + "/openapi.json", "--base-url", erp.url, "--name", "erp",
                    "--api-key-env", "ERP_TEST_KEY", *extra], work / "integration.log")


@dataclass
class Stack:
    erp: Proc
    mcp: Proc

    def backend(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.erp.url + path, data=data, method=method,
                                     headers={"X-API-Key": ERP_KEY, "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def backend_calls(self, method: str, path: str) -> list[dict[str, Any]]:
        log = self.backend("GET", "/_debug/requests")["requests"]
        return [r for r in log if r["method"] == method and r["path"] == path]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("integration")
    erp = _erp(work)
    allow = ["listCustomers", "getCustomer", "listOrders", "createOrder", "cancelOrder", "listInvoices",
             "salesReport"]
    mcp = _integration(work, erp, *[x for a in allow for x in ("--allow", a)], "--timeout", "1",
                       "--cache-ttl", "0", "--breaker-threshold", "50")
    yield Stack(erp, mcp)
    mcp.stop()
    erp.stop()


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[ClientSession]:
    """An SDK session that sends a bearer token and gateway identity headers, as through Envoy."""
    headers = {"Authorization": f"Bearer {CLIENT_TOKEN}", "x-mcp-user": "alice", "x-mcp-tenant": "acme"}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300)) as http, \
            streamable_http_client(url + "/mcp", http_client=http) as (read, write), \
            ClientSession(read, write, client_info=CLIENT_INFO) as session:
        await session.initialize()
        yield session


def _text(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


async def _call(session: ClientSession, name: str, args: dict[str, Any]) -> types.CallToolResult:
    result = await session.call_tool(name, args)
    assert isinstance(result, types.CallToolResult)
    return result


async def test_lists_only_allowed_operations_with_schemas_and_annotations(stack: Stack) -> None:
    """tools/list shows exactly the allow-listed operations with input/output schemas and method hints."""
    async with connect(stack.mcp.url) as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}
    assert set(tools) == {"listCustomers", "getCustomer", "listOrders", "createOrder", "cancelOrder",
                          "listInvoices", "salesReport"}
    get = tools["getCustomer"]
    assert get.input_schema["required"] == ["customer_id"]
    assert get.output_schema is not None and "email" in get.output_schema["properties"]
    assert get.annotations is not None and get.annotations.read_only_hint is True
    cancel = tools["cancelOrder"].annotations
    assert cancel is not None and cancel.destructive_hint is True and cancel.read_only_hint is False
    create = tools["createOrder"].annotations
    assert create is not None and create.idempotent_hint is False


async def test_calls_reach_the_backend_with_connector_credentials_only(stack: Stack) -> None:
    """A tool call returns ERP data; the backend saw the connector's API key, not the client's token."""
    async with connect(stack.mcp.url) as session:
        result = await _call(session, "getCustomer", {"customer_id": 2})
    assert not result.is_error, _text(result)
    assert (result.structured_content or {})["email"] == "ap@blueharbor.example"
    seen = stack.backend_calls("GET", "/customers/2")[-1]
    assert seen["x_api_key"] == ERP_KEY
    assert seen["authorization"] is None and seen["forwarded_identity"] == {}
    assert CLIENT_TOKEN not in json.dumps(stack.backend("GET", "/_debug/requests"))


async def test_create_order_and_validation_errors(stack: Stack) -> None:
    """createOrder creates a real order; an invalid one is an isError result naming the argument."""
    async with connect(stack.mcp.url) as session:
        ok = await _call(session, "createOrder", {"customer_id": 3, "items": [
            {"sku": "CRATE-S", "quantity": 4, "unit_price_cents": 950}]})
        assert not ok.is_error, _text(ok)
        order = ok.structured_content or {}
        assert order["status"] == "open" and order["total_cents"] == 3800
        gone = await _call(session, "createOrder", {"customer_id": 99, "items": [
            {"sku": "X", "quantity": 1, "unit_price_cents": 1}]})
        assert gone.is_error and "HTTP 404" in _text(gone) and "customer 99" in _text(gone)
        bad = await _call(session, "listCustomers", {"country": "de"})
        assert bad.is_error  # rejected by the input schema (pattern) before the backend
        cancelled = await _call(session, "cancelOrder", {"order_id": order["id"]})
        assert (cancelled.structured_content or {})["status"] == "cancelled"
        again = await _call(session, "cancelOrder", {"order_id": order["id"]})
        assert again.is_error and "HTTP 409" in _text(again)


async def test_partial_invoice_list_is_returned_as_data(stack: Stack) -> None:
    """A 206 answer is a successful result flagged as partial, with the items it has."""
    async with connect(stack.mcp.url) as session:
        result = await _call(session, "listInvoices", {"include_archived": True})
    assert not result.is_error
    assert _text(result).startswith("Partial result") and "archive" in _text(result)
    assert len((result.structured_content or {})["items"]) == 2


async def test_post_5xx_is_not_retried_but_get_503_is(stack: Stack) -> None:
    """A 503 on createOrder reaches the backend exactly once; a 503 on listOrders is retried."""
    stack.backend("DELETE", "/_debug/requests")
    stack.backend("POST", "/_debug/faults", {"method": "POST", "path": "/orders", "status": 503, "times": 5})
    stack.backend("POST", "/_debug/faults", {"method": "GET", "path": "/orders", "status": 503, "times": 2})
    try:
        async with connect(stack.mcp.url) as session:
            post = await _call(session, "createOrder", {"customer_id": 1, "items": [
                {"sku": "BOLT-M8", "quantity": 1, "unit_price_cents": 12}]})
            get = await _call(session, "listOrders", {"customer_id": 1})
    finally:
        stack.backend("DELETE", "/_debug/faults")
    assert post.is_error and "HTTP 503" in _text(post) and "not retried" in _text(post)
    assert len(stack.backend_calls("POST", "/orders")) == 1
    assert not get.is_error, _text(get)
    assert len(stack.backend_calls("GET", "/orders")) == 3


async def test_slow_backend_times_out(stack: Stack) -> None:
    """A report slower than the connector's timeout ends as an isError result after one attempt."""
    stack.backend("DELETE", "/_debug/requests")
    async with connect(stack.mcp.url) as session:
        result = await _call(session, "salesReport", {"delay_ms": 5000})
    assert result.is_error and "did not answer" in _text(result) and "within 1 s" in _text(result)
    assert len(stack.backend_calls("GET", "/reports/sales")) == 1


async def test_circuit_opens_fails_fast_and_recovers(tmp_path: Path) -> None:
    """Backend stopped: calls fail, the circuit opens and fails fast; after a restart calls succeed again."""
    erp = _erp(tmp_path)
    mcp = _integration(tmp_path, erp, "--allow", "listCustomers", "--breaker-threshold", "2",
                       "--breaker-cooldown", "1", "--max-attempts", "2", "--cache-ttl", "0")
    try:
        async with connect(mcp.url) as session:
            assert not (await _call(session, "listCustomers", {})).is_error
            erp.stop()
            for _ in range(2):
                down = await _call(session, "listCustomers", {})
                assert down.is_error and "could not be reached" in _text(down)
            fast = await _call(session, "listCustomers", {})
            assert fast.is_error and "unavailable" in _text(fast) and "circuit is open" in _text(fast)
            assert "next attempt" in _text(fast) or "probe" in _text(fast)
            assert erp.start(), "the ERP demo did not come back on its port"
            deadline = time.monotonic() + 30
            while True:
                back = await _call(session, "listCustomers", {})
                if not back.is_error or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)  # poll interval while the cool-down runs out
            assert not back.is_error, _text(back)
            assert (back.structured_content or {})["total"] == 5
    finally:
        mcp.stop()
        erp.stop()


def test_refuses_to_start_without_an_allowlist(tmp_path: Path) -> None:
    """With no --allow and no --allow-all the server exits with a message saying what to pass."""
    doc = tmp_path / "api.json"
    doc.write_text(json.dumps(openapi_document("http://127.0.0.1:9")))
    env = {**os.environ, "ERP_TEST_KEY": ERP_KEY}
    proc = subprocess.run([sys.executable, "-m", "mcp_servers.integration", "--openapi", str(doc),
                           "--api-key-env", "ERP_TEST_KEY", "--port", str(free_port())],
                          cwd=REPO, env=env, capture_output=True, timeout=60)
    assert proc.returncode != 0 and b"--allow" in proc.stderr
