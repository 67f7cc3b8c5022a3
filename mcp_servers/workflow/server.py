"""The workflow MCP server: one tool per workflow file, run by :class:`Engine` through the gateway.

It refuses to start without the gateway's caller assertion (``--assertion-jwks``): a workflow acts
for its caller at other servers, and only the verified assertion says who that is.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from gateway.errors import RATE_LIMITED
from mcp_servers.core import (
    ClientRequestFailed,
    McpError,
    MCPServer,
    ToolContext,
    ToolError,
    ToolResult,
)
from mcp_servers.workflow.client import DECLINED, GatewayClient, StepError, parse_connect
from mcp_servers.workflow.delegation import Delegator, load_or_create_key, publish_jwks
from mcp_servers.workflow.engine import DEFAULT_MAX_RUNS_PER_CALLER, MAX_RUNS, Engine, RunRefused
from mcp_servers.workflow.spec import IDEMPOTENCY_ARGUMENT, SpecError, Workflow, load_dir
from mcp_servers.workflow.store import RunStore

logger = logging.getLogger(__name__)

# Refusals for lack of room (server-wide, per caller): JSON-RPC errors (RATE_LIMITED).
CAPACITY_REFUSALS = frozenset({"too_many_runs", "too_many_runs_for_caller"})

APPROVAL_SCHEMA = {"type": "object", "properties": {
    "approve": {"type": "boolean", "title": "Approve", "description": "Continue the workflow"}},
    "required": ["approve"]}


class ContextReporter:
    """Progress and approvals on the client's request (progress only with a progressToken)."""

    def __init__(self, ctx: ToolContext) -> None:
        self.ctx = ctx

    async def progress(self, progress: float, total: float, message: str) -> None:
        await self.ctx.progress(progress, total, message)

    async def approve(self, message: str) -> bool:
        try:
            result = await self.ctx.elicit(message, APPROVAL_SCHEMA)
        except ClientRequestFailed as exc:
            raise StepError(DECLINED, f"the approval could not be asked ({exc.message})") from None
        content = result.get("content")
        return result.get("action") == "accept" and isinstance(content, dict) \
            and content.get("approve") is True


def _result(structured: dict[str, Any], text: str, is_error: bool) -> ToolResult:
    return ToolResult(content=[{"type": "text", "text": text},
                               {"type": "text", "text": orjson.dumps(structured).decode()}],
                      structured=structured, is_error=is_error)


def register_workflow(server: MCPServer, runtime: Runtime, wf: Workflow) -> None:
    @server.tool(name=wf.name, title=wf.title, description=wf.description,
                 input_schema=wf.tool_schema(),
                 annotations={"destructiveHint": True, "idempotentHint": False, "openWorldHint": True})
    async def run(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
        if ctx.caller is None:
            raise ToolError("no verified caller: a workflow runs only as the gateway's caller [no_caller]")
        inputs = {k: v for k, v in args.items() if k != IDEMPOTENCY_ARGUMENT}
        key = args.get(IDEMPOTENCY_ARGUMENT)
        engine = runtime.engine
        if engine is None:
            raise ToolError("the workflow server is starting [not_ready]")
        try:
            answer = await engine.start(wf, ctx.caller, inputs, key, ContextReporter(ctx))
        except RunRefused as exc:
            if exc.code in CAPACITY_REFUSALS:
                # Nothing was started or recorded: a JSON-RPC error the client can retry on.
                raise McpError(str(exc), code=exc.code, rpc_code=RATE_LIMITED,
                               data={"retry": True}) from None
            return _result({"status": "refused", "reason": exc.code, "error": str(exc)},
                           f"{exc} [{exc.code}]", True)
        return _result(answer.structured, answer.text, answer.is_error)


def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def build_server(args: argparse.Namespace) -> MCPServer:
    if not args.assertion_jwks:
        raise SystemExit("the workflow server needs the gateway's caller assertion (--assertion-jwks, "
                         "--assertion-issuer, --assertion-audience): it acts for its caller, and only "
                         "the assertion says who that is")
    gateway_url = args.gateway_url or args.assertion_issuer
    if not gateway_url or not gateway_url.startswith("https://"):
        raise SystemExit("--gateway-url must be the gateway's https URL (steps go through it)")
    try:
        workflows = load_dir(Path(args.workflows))
    except SpecError as exc:
        raise SystemExit(f"--workflows: {exc}") from None
    ring = load_or_create_key(Path(args.delegation_key))
    if args.delegation_jwks:
        publish_jwks(ring, Path(args.delegation_jwks))
    server = MCPServer("workflow", version="0.1.0",
                       instructions="Each tool runs a workflow: several tool calls on other servers, "
                                    "made as you, undone in reverse order when one fails.")
    try:
        client = GatewayClient(gateway_url, _ssl_context(args.gateway_ca), args.gateway_connect)
    except ValueError as exc:
        raise SystemExit(f"--gateway-connect: {exc}") from None
    delegator = Delegator(ring, args.delegation_issuer, gateway_url)
    runtime = Runtime()

    @server.lifespan
    async def lifespan() -> AsyncIterator[None]:
        # One process per run record (RunStore locks it); runs left unfinished by a stopped
        # server are settled in the background (the gateway may come up after this server).
        store = RunStore(args.runs_db)
        await client.open()
        engine = runtime.engine = Engine(workflows, store, client, delegator,
                                         max_runs_per_caller=args.max_runs_per_caller)
        background: list[asyncio.Task[Any]] = [asyncio.create_task(engine.recover())]
        if args.runs_retention_days:
            background.append(asyncio.create_task(prune_forever(store, args.runs_retention_days)))
        try:
            yield
        finally:
            await engine.drain()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await client.close()
            store.close()

    for wf in workflows.values():
        register_workflow(server, runtime, wf)
    logger.info("workflows loaded", extra={
        "workflows": sorted(workflows), "gateway": gateway_url,
        "gateway_connect": ":".join(map(str, args.gateway_connect)) if args.gateway_connect else None})
    return server


PRUNE_INTERVAL_SECONDS = 3600.0


async def prune_forever(store: RunStore, days: float) -> None:
    """Forget finished runs older than ``days``, at start and every hour."""
    while True:
        removed = store.prune(time.time() - days * 86400)
        if removed:
            logger.info("workflow runs pruned", extra={"runs": removed, "retention_days": days})
        await asyncio.sleep(PRUNE_INTERVAL_SECONDS)


class Runtime:
    """What start-up makes (the engine holds the open run record); no request comes before."""

    engine: Engine | None = None


def _runs_per_caller(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= MAX_RUNS:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_RUNS}, got {value}")
    return value


def _connect(text: str) -> tuple[str, int]:
    try:
        return parse_connect(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workflows", default="workflows", help="folder of workflow files (*.yaml)")
    parser.add_argument("--runs-db", required=True, help="SQLite file of the durable run record")
    parser.add_argument("--runs-retention-days", type=float, default=30.0,
                        help="forget finished runs (and their idempotency keys) after this many days; "
                             "0 keeps them (default %(default)s)")
    parser.add_argument("--gateway-url", default=None,
                        help="the gateway's https URL the steps go through (default: --assertion-issuer, "
                             "the gateway's public URL)")
    parser.add_argument("--gateway-connect", type=_connect, default=None,
                        help="connect to the gateway here (host:port or https://host[:port]) instead "
                             "of --gateway-url's host; the requests, the TLS server name and the "
                             "certificate check keep --gateway-url's host (docker compose: "
                             "envoy:8443, where public_url's host is the container itself)")
    parser.add_argument("--gateway-ca", default=None, help="CA bundle for the gateway's certificate")
    parser.add_argument("--delegation-key", required=True,
                        help="private JWK set signing the per-step tokens (made on first start, 0600)")
    parser.add_argument("--delegation-jwks", default=None,
                        help="write the public JWKS here (where the gateway's issuer entry fetches it)")
    parser.add_argument("--max-runs-per-caller", type=_runs_per_caller,
                        default=DEFAULT_MAX_RUNS_PER_CALLER,
                        help=f"runs in progress at once for one caller (1..{MAX_RUNS}; "
                             "default %(default)s); more are refused with JSON-RPC error "
                             "too_many_runs_for_caller")
    parser.add_argument("--delegation-issuer", required=True,
                        help="the iss of the per-step tokens: an issuer in the gateway's config")
