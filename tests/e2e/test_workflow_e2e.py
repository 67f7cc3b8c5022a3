"""Workflows through the real Envoy with the official SDK client: the workflow server's steps are
tool calls through the gateway as the caller (ERP order, invoice file, database record), with
progress, approvals by elicitation, compensation (order cancelled, file deleted, row deleted),
refusal at the step the caller may not run, recovery after SIGKILL, and idempotency keys."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import pytest
import yaml
from mcp import ClientSession, types
from mcp.client.streamable_http import streamable_http_client

from gateway.config import load_config
from gatewayctl import devstack
from gatewayctl.devstack import supervisor
from gatewayctl.devstack.plan import base_dir
from tests.e2e.conftest import ERP_OPERATIONS, REQUIRED, installed
from tests.e2e.helpers import REPO, authz_transport, bearer, stack_config, tls_context, wait_until
from tests.ports import free_ports

T = TypeVar("T")
ISSUER = "urn:mcp-gateway:workflow"

ORDER_STEP: dict[str, Any] = {
    "id": "create_order", "server": "erp", "tool": "createOrder",
    "arguments": {"customer_id": "${inputs.customer_id}",
                  "items": [{"sku": "WID-001", "quantity": 1, "unit_price_cents": 1999}],
                  "notes": "run ${run.id}"},
    "compensate": {"server": "erp", "tool": "cancelOrder",
                   "arguments": {"order_id": "${steps.create_order.output.id}"}}}
EXPORT_STEP: dict[str, Any] = {
    "id": "export_invoice", "server": "files", "tool": "write_file",
    "arguments": {"path": "projects/invoices/order-${steps.create_order.output.id}.json",
                  "content": "${steps.create_order.output}\n", "create_parents": True},
    "compensate": {"server": "files", "tool": "delete_file",
                   "arguments": {"path": "projects/invoices/order-${steps.create_order.output.id}.json"}}}
RECORD_STEP: dict[str, Any] = {
    "id": "record", "server": "database", "tool": "insert_row", "depends_on": ["export_invoice"],
    "arguments": {"table": "invoice_records",
                  "values": {"order_id": "${steps.create_order.output.id}", "total_cents": 1999,
                             "invoice_file": "projects/invoices/order-${steps.create_order.output.id}.json",
                             "run_id": "${run.id}"}},
    "output_schema": {"type": "object", "required": ["id"], "properties": {"id": {"type": "integer"}}},
    "compensate": {"server": "database", "tool": "delete_row",
                   "arguments": {"table": "invoice_records", "id": "${steps.record.output.id}"}}}
INPUTS = {"type": "object", "properties": {"customer_id": {"type": "integer"}},
          "required": ["customer_id"], "additionalProperties": False}
TEST_WORKFLOWS = {
    # The last step fails for real: the database has no such column.
    "order_record": [ORDER_STEP, EXPORT_STEP, RECORD_STEP,
                     {"id": "confirm", "server": "database", "tool": "query", "depends_on": ["record"],
                      "arguments": {"sql": "SELECT no_such_column FROM products WHERE id = ?",
                                    "params": ["${steps.create_order.output.id}"]}}],
    "order_export": [ORDER_STEP, EXPORT_STEP],
}


def write_workflows(folder: Path) -> None:
    folder.mkdir()
    shutil.copy(REPO / "workflows" / "order_to_invoice.yaml", folder)
    for name, steps in TEST_WORKFLOWS.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(
            {"name": name, "description": name, "input_schema": INPUTS, "steps": steps}))


def write_policy(target: Path) -> Path:
    """The example policy; engineers and analysts may start every workflow (the analyst is then
    refused at the ERP step the example policy does not give them)."""
    shutil.copytree(REPO / "policies", target)
    data_file = target / "data.json"
    data: dict[str, Any] = json.loads(data_file.read_text())
    for role in ("engineer", "analyst"):
        data["gateway"]["roles"][role]["tools"]["workflow"] = ["*"]
    data_file.write_text(json.dumps(data, indent=2))
    return target


@pytest.fixture(scope="module")
def wstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devstack.Stack]:
    missing = [m for m in (*REQUIRED, "mcp_servers.workflow.__main__") if not installed(m)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    tmp = tmp_path_factory.mktemp("wf")
    (tmp / "files-root").mkdir()
    write_workflows(tmp / "workflows")
    state = tmp / "state"
    (erp_port,) = free_ports(1)
    erp_url = f"http://127.0.0.1:{erp_port}"
    allow = [arg for op in ERP_OPERATIONS for arg in ("--allow", op)]
    servers: dict[str, dict[str, Any]] = {
        "files": {"module": "mcp_servers.files", "count": 1,
                  "args": ["--root", str(tmp / "files-root"), "--seed-demo", "--allow-write"]},
        "database": {"module": "mcp_servers.database", "count": 1,
                     "args": ["--sqlite-path", str(tmp / "demo.sqlite3"), "--seed-demo",
                              "--writable-table", "invoice_records"]},
        "erp": {"module": "mcp_servers.integration", "count": 1, "env": ["ERP_API_KEY"],
                "args": ["--name", "erp", "--openapi", f"{erp_url}/openapi.json",
                         "--base-url", erp_url, "--api-key-env", "ERP_API_KEY", *allow]},
        "workflow": {"module": "mcp_servers.workflow", "count": 1, "args": [
            "--workflows", str(tmp / "workflows"), "--runs-db", str(state / "workflow" / "runs.sqlite3"),
            "--gateway-ca", str(state / "tls" / "ca.pem"), "--delegation-issuer", ISSUER,
            "--delegation-key", str(state / "keys" / "workflow-delegation.json"),
            "--delegation-jwks", str(state / "jwks" / "workflow-jwks.json")]},
    }
    extra = {
        "secrets": ["ERP_API_KEY"],
        "backends": {"erp_demo": {"module": "mcp_servers.erp_demo", "instance": {"port": erp_port},
                                  "env": ["ERP_API_KEY"],
                                  "args": ["--db", str(tmp / "erp.sqlite3"), "--debug"]}},
        "policy": {"engine": "embedded", "dir": str(write_policy(tmp / "policies"))},
        "identity": {"assertion": True},
    }
    path = stack_config(tmp, servers=servers, ext_authz=1, extra=extra, authz_transport=authz_transport())
    raw = yaml.safe_load(path.read_text())
    dev = raw["issuers"][0]
    base = raw["public_url"]
    raw["issuers"].append({
        "issuer": ISSUER, "jwks_url": dev["jwks_url"].rsplit("/", 1)[0] + "/workflow-jwks.json",
        "algorithms": ["ES256"], "advertise": False, "delegation": True,
        "audiences": [f"{base}/mcp/{s}" for s in ("erp", "files", "database")]})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(REPO))
        with devstack.running(load_config(path), ext_proc=installed("ext_proc.__main__")) as running:
            yield running


def tmp_of(stack: devstack.Stack) -> Path:
    return Path(stack.config.state_dir).parent


def erp_order(stack: devstack.Stack, order_id: int) -> tuple[str, str | None]:
    with contextlib.closing(sqlite3.connect(tmp_of(stack) / "erp.sqlite3")) as db:
        row = db.execute("SELECT status, notes FROM orders WHERE id = ?", (order_id,)).fetchone()
    assert row is not None, f"ERP order {order_id} does not exist"
    return row[0], row[1]


def erp_order_count(stack: devstack.Stack) -> int:
    with contextlib.closing(sqlite3.connect(tmp_of(stack) / "erp.sqlite3")) as db:
        return int(db.execute("SELECT count(*) FROM orders").fetchone()[0])


def invoice_records(stack: devstack.Stack, order_id: int) -> list[tuple[Any, ...]]:
    """The database's invoice_records rows of one ERP order (id, total, file, run)."""
    with contextlib.closing(sqlite3.connect(tmp_of(stack) / "demo.sqlite3")) as db:
        return db.execute("SELECT id, total_cents, invoice_file, run_id FROM invoice_records "
                          "WHERE order_id = ?", (order_id,)).fetchall()


def invoice_file(stack: devstack.Stack, order_id: int) -> Path:
    return tmp_of(stack) / "files-root" / "projects" / "invoices" / f"order-{order_id}.json"


def run_record(stack: devstack.Stack, run_id: str) -> tuple[str, dict[str, Any] | None]:
    path = Path(stack.config.state_dir) / "workflow" / "runs.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:
        row = db.execute("SELECT status, answer FROM runs WHERE id = ?", (run_id,)).fetchone()
    return row[0], (json.loads(row[1]) if row[1] else None)


def start_again(stack: devstack.Stack, label: str) -> None:
    """Start a stopped component of the stack as it was started (the stack keeps its process, so
    it is stopped with the others), and wait until it is healthy."""
    comp = next(c for c in stack.components if c.label == label)
    env = supervisor._component_env(supervisor._stack_env(stack.config), comp, stack.secrets)
    stack._spawn(comp, None, base_dir(stack.config), env)
    stack.wait_healthy([comp])


async def approve(_ctx: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
    return types.ElicitResult(action="accept", content={"approve": True})


async def session(stack: devstack.Stack, role: str, work: Callable[[ClientSession], Awaitable[T]],
                  *, elicitation: Any = approve, sub: str = "alice",
                  scopes: tuple[str, ...] | None = None) -> T:
    token = bearer(stack.config, role, sub=sub) if scopes is None else \
        devstack.mint(stack.config, sub=sub, roles=(role,), tenant="acme", ttl=600, scopes=scopes)
    async with httpx2.AsyncClient(verify=tls_context(stack), timeout=60,
                                  headers={"authorization": f"Bearer {token}"}) as http, \
            streamable_http_client(stack.config.resource_url("workflow"), http_client=http) as (r, w), \
            ClientSession(r, w, elicitation_callback=elicitation) as client:
        await client.initialize()
        return await work(client)


def structured(result: types.CallToolResult) -> dict[str, Any]:
    assert result.structured_content is not None, result.content
    return dict(result.structured_content)


async def test_example_workflow_succeeds_with_progress(wstack: devstack.Stack) -> None:
    """The shipped example runs end to end for an engineer: price from the database, an ERP order
    at that price, approval by elicitation, the invoice file, its record in the database; progress
    arrives per step."""
    seen: list[tuple[float, str | None]] = []
    asked: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, message))

    async def elicit(ctx: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return await approve(ctx, params)

    async def work(client: ClientSession) -> types.CallToolResult:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert {"order_to_invoice", "order_record", "order_export"} <= tools
        args: dict[str, Any] = {"customer_id": 1, "sku": "WID-002", "quantity": 2}
        return await client.call_tool("order_to_invoice", args, progress_callback=on_progress)

    result = await session(wstack, "engineer", work, elicitation=elicit)
    out = structured(result)
    assert not result.is_error and out["status"] == "succeeded", out
    order = out["output"]["order"]
    assert order["total_cents"] == 2 * 4999 and order["items"][0]["sku"] == "WID-002"
    assert erp_order(wstack, order["id"]) == ("open", f"workflow order_to_invoice, run {out['run_id']}")
    assert json.loads(invoice_file(wstack, order["id"]).read_text())["id"] == order["id"]
    assert invoice_records(wstack, order["id"]) == [
        (out["output"]["invoice_record"], 9998, f"projects/invoices/order-{order['id']}.json", out["run_id"])]
    assert asked == [f"Export the invoice of ERP order {order['id']} (9998 cents) to projects/invoices?"]
    messages = [m for _, m in seen]
    assert messages[:2] == ["step price: started", "step price: done"]
    assert messages[-1] == "step record: done" and len(seen) == 10


async def test_failure_in_last_step_undoes_the_others(wstack: devstack.Stack) -> None:
    """The last step fails at the database; every earlier step is undone, last first: the invoice
    record deleted, the invoice file deleted, the ERP order cancelled; the client's error names the
    failed step and what was undone."""
    async def work(client: ClientSession) -> types.CallToolResult:
        return await client.call_tool("order_record", {"customer_id": 2})

    result = await session(wstack, "engineer", work)
    out = structured(result)
    assert result.is_error
    assert (out["failed_step"], out["reason"], out["undone"], out["not_undone"]) == \
        ("confirm", "tool_error", ["record", "export_invoice", "create_order"], [])
    text = "".join(getattr(c, "text", "") for c in result.content)
    assert "failed at step confirm" in text and "undone: record, export_invoice, create_order" in text
    order_id = int(invoice_file_id(wstack, out["run_id"]))
    assert erp_order(wstack, order_id)[0] == "cancelled"
    assert not invoice_file(wstack, order_id).exists()
    assert invoice_file(wstack, order_id).parent.is_dir()  # the file was written, then deleted
    assert invoice_records(wstack, order_id) == []
    assert step_output(wstack, out["run_id"], "record")["id"] >= 1  # the row was recorded, then deleted


def step_output(stack: devstack.Stack, run_id: str, step_id: str) -> dict[str, Any]:
    path = Path(stack.config.state_dir) / "workflow" / "runs.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:
        row = db.execute("SELECT output FROM steps WHERE run_id = ? AND step_id = ?",
                         (run_id, step_id)).fetchone()
    output: dict[str, Any] = json.loads(row[0])
    return output


def invoice_file_id(stack: devstack.Stack, run_id: str) -> int:
    return int(step_output(stack, run_id, "create_order")["id"])


async def test_caller_without_the_right_is_refused_at_that_step(wstack: devstack.Stack) -> None:
    """An analyst may start the workflow and read the price, but the gateway refuses the ERP
    order to them as it would a direct call: the run stops there and no order exists."""
    before = erp_order_count(wstack)

    async def work(client: ClientSession) -> types.CallToolResult:
        return await client.call_tool("order_to_invoice", {"customer_id": 1, "sku": "WID-001",
                                                           "quantity": 1})

    result = await session(wstack, "analyst", work)
    out = structured(result)
    assert result.is_error
    assert (out["failed_step"], out["reason"]) == ("create_order", "refused")
    assert out["detail"] == {"http_status": 403, "reason": "tool_not_allowed"}
    assert erp_order_count(wstack) == before


async def test_step_the_callers_token_does_not_grant_is_refused(wstack: devstack.Stack) -> None:
    """A caller whose own token may start the workflow and read the database but lacks the ERP
    scope is refused at create_order by the workflow server (it grants no scope the caller lacks):
    the error names the scope and no order exists."""
    before = erp_order_count(wstack)

    async def work(client: ClientSession) -> types.CallToolResult:
        return await client.call_tool("order_to_invoice", {"customer_id": 1, "sku": "WID-001",
                                                           "quantity": 1})

    result = await session(wstack, "engineer", work,
                           scopes=("tools:call:workflow/*", "tools:call:database/*"))
    out = structured(result)
    assert (out["failed_step"], out["reason"]) == ("create_order", "refused")
    assert out["detail"] == {"reason": "insufficient_scope",
                             "missing_scope": "tools:call:erp/createOrder"}
    assert erp_order_count(wstack) == before


async def test_decision_log_names_who_acted(wstack: devstack.Stack) -> None:
    """The gateway's decision for a step names the caller as sub and the workflow server (its
    issuer, the workflow and run) as act."""
    async def work(client: ClientSession) -> types.CallToolResult:
        return await client.call_tool("order_export", {"customer_id": 3})

    out = structured(await session(wstack, "engineer", work))
    assert out["status"] == "succeeded", out
    log = Path(wstack.config.state_dir) / "logs" / "ext_authz-0.log"

    def steps() -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in log.read_text().splitlines()
                 if line.startswith("{") and out["run_id"] in line]
        return [d for d in lines if isinstance(d.get("act"), dict)
                and d["act"].get("run") == out["run_id"]]
    # The decision lines may reach the file a moment after the answer.
    await asyncio.to_thread(wait_until, lambda: len(steps()) >= 2, "the steps' decision lines", 10)
    assert {d["tool"] for d in steps()} == {"createOrder", "write_file"}
    assert all(d["sub"] == "alice" and d["act"]["iss"] == ISSUER
               and d["act"]["sub"] == "mcp-gateway-workflow" for d in steps())


async def test_declined_approval_stops_the_run(wstack: devstack.Stack) -> None:
    """The user declines the approval: nothing is exported and the order is cancelled."""
    async def decline(_ctx: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        return types.ElicitResult(action="decline")

    async def work(client: ClientSession) -> types.CallToolResult:
        return await client.call_tool("order_to_invoice", {"customer_id": 3, "sku": "GAD-001",
                                                           "quantity": 1})

    result = await session(wstack, "engineer", work, elicitation=decline)
    out = structured(result)
    assert (out["failed_step"], out["reason"], out["undone"]) == ("approve", "declined", ["create_order"])
    order_id = invoice_file_id(wstack, out["run_id"])
    assert erp_order(wstack, order_id)[0] == "cancelled"
    assert not invoice_file(wstack, order_id).exists()


async def test_sigkill_mid_run_then_restart_compensates(wstack: devstack.Stack) -> None:
    """The workflow server is killed while it waits for the approval; restarted, it finds the run
    unfinished and cancels the order it had created."""
    waiting = asyncio.Event()
    asked: list[str] = []

    async def hold(_ctx: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        waiting.set()
        await asyncio.sleep(60)
        return types.ElicitResult(action="decline")

    async def work(client: ClientSession) -> types.CallToolResult:
        return await client.call_tool("order_to_invoice", {"customer_id": 4, "sku": "CAB-001",
                                                           "quantity": 5})

    before = erp_order_count(wstack)
    task = asyncio.create_task(session(wstack, "engineer", work, elicitation=hold))
    await asyncio.wait_for(waiting.wait(), 60)
    order_id = int(asked[0].split("ERP order ")[1].split(" ")[0])
    assert erp_order_count(wstack) == before + 1 and erp_order(wstack, order_id)[0] == "open"
    proc = wstack.procs["workflow[0]"]
    os.kill(proc.pid, signal.SIGKILL)
    await asyncio.to_thread(proc.wait, 10)
    task.cancel()
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(task, 15)
    await asyncio.to_thread(start_again, wstack, "workflow[0]")
    await asyncio.to_thread(wait_until, lambda: erp_order(wstack, order_id)[0] == "cancelled",
                            "the restarted workflow server to cancel the interrupted run's order")
    run_id = (erp_order(wstack, order_id)[1] or "").rsplit(" ", 1)[-1]
    await asyncio.to_thread(wait_until, lambda: run_record(wstack, run_id)[0] == "failed",
                            "the interrupted run to be recorded as failed")
    answer = run_record(wstack, run_id)[1]
    assert answer is not None
    assert (answer["structured"]["failed_step"], answer["structured"]["reason"],
            answer["structured"]["undone"]) == ("approve", "interrupted", ["create_order"])


async def test_same_idempotency_key_runs_once(wstack: devstack.Stack) -> None:
    """A retried call with the same idempotency key gets the first run's answer; one order."""
    before = erp_order_count(wstack)

    async def work(client: ClientSession) -> tuple[types.CallToolResult, types.CallToolResult]:
        args = {"customer_id": 5, "idempotency_key": "invoice-2026-0001"}
        return await client.call_tool("order_export", args), await client.call_tool("order_export", args)

    first, second = await session(wstack, "engineer", work)
    assert not first.is_error and structured(first) == structured(second)
    assert erp_order_count(wstack) == before + 1
    assert run_record(wstack, structured(first)["run_id"])[0] == "succeeded"
