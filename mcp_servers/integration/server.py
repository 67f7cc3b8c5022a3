"""Wires one OpenAPI backend into an MCP server: one tool per allowed operation.

Settings come from the command line (read once here, at the edge); the inner modules take
explicit arguments. The backend's pooled session lives exactly as long as the aiohttp app.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mcp_servers.core import MCPServer, ToolContext, ToolError, ToolResult, serve_main
from mcp_servers.integration.client import BackendClient, BackendError, ClientSettings
from mcp_servers.integration.credentials import ApiKey, Credentials, NoCredentials, OAuthClientCredentials
from mcp_servers.integration.openapi import (
    BadArguments,
    OpenAPIError,
    Operation,
    build_request,
    load_document,
    parse_operations,
    select_operations,
    server_url,
)
from mcp_servers.integration.results import failure_outcome, outcome_for, output_validator

logger = logging.getLogger(__name__)


class IntegrationServer(MCPServer):
    """An MCPServer whose lifetime also bounds the backend client's pooled session.

    The session opens when the app starts (before the first request) and closes after the drain,
    through the core's lifecycle hooks.
    """

    def __init__(self, *args: Any, client: BackendClient, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client = client
        self.on_startup(self._open_backend)
        self.on_cleanup(client.close)

    async def _open_backend(self) -> None:
        await self.client.start()
        logger.info("backend %s: %s (%d tools)", self.client.settings.name, self.client.settings.base_url,
                    len(self.tools))


@dataclass(frozen=True)
class ConnectorConfig:
    name: str
    openapi: str
    base_url: str | None
    allow: tuple[str, ...]
    allow_all: bool
    tool_prefix: str
    credentials: Credentials
    client: dict[str, Any]


def _tool_handler(op: Operation, client: BackendClient) -> Callable[[ToolContext, dict[str, Any]],
                                                                      Awaitable[ToolResult]]:
    validator = output_validator(op)

    async def call(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
        try:
            req = build_request(op, args)
        except BadArguments as e:
            raise ToolError(f"{op.tool_name}: {e}") from None
        try:
            resp = await client.request(req)
        except BackendError as e:
            logger.warning("tool=%s user=%s %s %s failed: %s", op.tool_name, ctx.user, req.method, req.path,
                           e.code)
            outcome = failure_outcome(op, e)
        else:
            logger.info("tool=%s user=%s %s %s -> %d attempts=%d cached=%s", op.tool_name, ctx.user,
                        req.method, req.path, resp.status, resp.attempts, resp.cached)
            outcome = outcome_for(op, resp, validator)
        return ToolResult(content=[{"type": "text", "text": t} for t in outcome.texts],
                          structured=outcome.structured, is_error=outcome.is_error)

    return call


def build_connector(config: ConnectorConfig, doc: dict[str, Any] | None = None) -> IntegrationServer:
    """Load the document, select the operations and register one tool for each."""
    if doc is None:
        doc = load_document(config.openapi)
    base_url = config.base_url or server_url(doc, config.openapi)
    if not base_url:
        raise OpenAPIError("no backend URL: pass --base-url (the document has no absolute servers[0].url)")
    ops = select_operations(parse_operations(doc, tool_prefix=config.tool_prefix), list(config.allow),
                            config.allow_all)
    client = BackendClient(ClientSettings(name=config.name, base_url=base_url, **config.client),
                           config.credentials)
    info = doc.get("info")
    title = info.get("title") if isinstance(info, dict) and isinstance(info.get("title"), str) \
        else config.name
    server = IntegrationServer(
        config.name, version="0.1.0", client=client,
        instructions=f"Tools for the {title} REST API. Every call goes to the backend with the connector's "
                     "own credentials; read-only tools are marked readOnlyHint.",
    )
    for op in ops:
        server.tool(name=op.tool_name, description=op.description, input_schema=op.input_schema,
                    output_schema=op.output_schema, annotations=op.annotations,
                    title=op.title)(_tool_handler(op, client))
    logger.info("exposing %d of the document's operations: %s", len(ops),
                ", ".join(op.tool_name for op in ops))
    return server


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backend")
    g.add_argument("--openapi", required=True, help="OpenAPI 3.0/3.1 document: file path or http(s) URL")
    g.add_argument("--base-url", help="backend URL (default: the document's servers[0].url)")
    g.add_argument("--name", default="integration", help="MCP server name, also used in messages")
    g.add_argument("--allow", action="append", default=[], metavar="OPERATION_ID",
                   help="expose this operation (repeatable); nothing is exposed by default")
    g.add_argument("--allow-all", action="store_true", help="expose every operation of the document")
    g.add_argument("--tool-prefix", default="", help="prefix for every tool name, e.g. erp_")
    a = p.add_argument_group("backend credentials (exactly one)")
    a.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the backend API key")
    a.add_argument("--api-key-header", default="X-API-Key")
    a.add_argument("--oauth-token-url", help="OAuth 2 token endpoint (client credentials grant)")
    a.add_argument("--client-id")
    a.add_argument("--client-secret-env", metavar="VAR",
                   help="environment variable holding the client secret")
    a.add_argument("--oauth-scope")
    a.add_argument("--no-backend-auth", action="store_true", help="the backend needs no credentials")
    r = p.add_argument_group("resilience")
    r.add_argument("--connect-timeout", type=float, default=3.0)
    r.add_argument("--timeout", type=float, default=10.0, help="total time per backend attempt (s)")
    r.add_argument("--max-attempts", type=int, default=3, help="attempts for idempotent methods")
    r.add_argument("--breaker-threshold", type=int, default=5,
                   help="consecutive failures that open the circuit")
    r.add_argument("--breaker-cooldown", type=float, default=10.0,
                   help="seconds before a probe is let through")
    r.add_argument("--cache-ttl", type=float, default=10.0, help="GET cache lifetime (s); 0 disables")
    r.add_argument("--cache-size", type=int, default=1024)
    r.add_argument("--max-connections", type=int, default=100)


def _secret(var: str, what: str) -> str:
    value = os.environ.get(var, "")
    if not value:
        raise OpenAPIError(f"environment variable {var} (the {what}) is unset or empty")
    return value


def credentials_from_args(ns: argparse.Namespace) -> Credentials:
    chosen = [x for x in (ns.api_key_env, ns.oauth_token_url, ns.no_backend_auth) if x]
    if len(chosen) != 1:
        raise OpenAPIError("choose exactly one of --api-key-env, --oauth-token-url or --no-backend-auth")
    if ns.api_key_env:
        return ApiKey(_secret(ns.api_key_env, "backend API key"), ns.api_key_header)
    if ns.oauth_token_url:
        if not (ns.client_id and ns.client_secret_env):
            raise OpenAPIError("--oauth-token-url needs --client-id and --client-secret-env")
        secret = _secret(ns.client_secret_env, "OAuth client secret")
        return OAuthClientCredentials(ns.oauth_token_url, ns.client_id, secret, scope=ns.oauth_scope)
    return NoCredentials()


def config_from_args(ns: argparse.Namespace) -> ConnectorConfig:
    return ConnectorConfig(
        name=ns.name, openapi=ns.openapi, base_url=ns.base_url, allow=tuple(ns.allow),
        allow_all=ns.allow_all,
        tool_prefix=ns.tool_prefix, credentials=credentials_from_args(ns),
        client={"connect_timeout": ns.connect_timeout, "total_timeout": ns.timeout,
                "max_attempts": ns.max_attempts, "failure_threshold": ns.breaker_threshold,
                "cooldown": ns.breaker_cooldown, "cache_ttl": ns.cache_ttl,
                "cache_max_entries": ns.cache_size,
                "max_connections": ns.max_connections},
    )


def build_server(ns: argparse.Namespace) -> IntegrationServer:
    try:
        return build_connector(config_from_args(ns))
    except (OpenAPIError, ValueError, OSError) as e:
        # A configuration mistake: say what to fix, without a traceback.
        raise SystemExit(f"integration: {e}") from None


def main(argv: Sequence[str] | None = None) -> None:
    serve_main(build_server, add_arguments, argv)
