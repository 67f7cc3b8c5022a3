"""What ``mcp-gateway up`` prints once the stack is healthy: endpoints, a token, the CA, client
snippets, and where traces, metrics, audit files and backends are."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from gateway.config import GatewayConfig, ServerConfig
from gatewayctl.devstack.credentials import (
    DEV_TOKEN_ROLES,
    DEV_TOKEN_SUB,
    DEV_TOKEN_TTL,
    inner_client_context,
)
from gatewayctl.devstack.health import http_status
from gatewayctl.devstack.plan import Component
from gatewayctl.devstack.state import paths


def serves_metrics(url: str, tls: ssl.SSLContext | None = None) -> bool:
    """Whether a /metrics URL answers 200 (services grow their endpoints issue by issue);
    an https one (inner_tls) is asked with ``tls``."""
    parts = urlsplit(url)
    try:
        return http_status(parts.hostname or "127.0.0.1", parts.port or 80, parts.path,
                           tls=tls if parts.scheme == "https" else None) == 200
    except (OSError, http.client.HTTPException):
        return False


def observability_lines(config: GatewayConfig, components: list[Component], *,
                        live: Callable[[str], bool] = lambda url: True) -> list[str]:
    """Where traces, metrics, audit files and auxiliary backends of the stack are; ``live``
    selects the metrics URLs worth printing (the running stack passes :func:`serves_metrics`)."""
    tel = config.telemetry
    lines = ["Traces: " + (f"OTLP/gRPC to {tel.otlp_endpoint} (Envoy samples "
                           f"{tel.trace_sample_percent:g}%)" if tel.otlp_endpoint else
                           "off (set telemetry.otlp_endpoint to an OTLP/gRPC collector, e.g. "
                           "http://127.0.0.1:4317 from `docker compose up jaeger`)"),
             "Metrics (Prometheus text):"]
    scraped = [c for c in components if c.metrics_url and live(c.metrics_url)]
    width = max((len(c.label) for c in components), default=0)
    lines += [f"  {c.label:<{width}}  {c.metrics_url}" for c in scraped]
    lines.append(f"Audit trail (JSON lines, one file per process): {config.audit.dir}/")
    if config.backends:
        lines.append("Backends (not behind the gateway):")
        lines += [f"  {b.name:<{width}}  http://{b.instance.host}:{b.instance.port}"
                  for b in config.backends]
    if config.secrets:
        lines.append(f"Dev secrets ({', '.join(config.secrets)}): {paths(config).secrets_dir}/ "
                     f"(or exported in the environment of `up`)")
    return lines


def _upstream_note(server: ServerConfig) -> str:
    if server.kind == "url":
        return "  -> " + ", ".join(u.url for u in server.urls)
    if server.kind == "command":
        return "  -> stdio: " + " ".join(server.command)
    return ""


def banner(config: GatewayConfig, token: str, ca_file: Path | None, *, detach: bool = False,
           components: list[Component] | None = None) -> str:
    """What a user needs to talk to the running stack: endpoints, token, CA and snippets."""
    host = config.public_url.rstrip("/")
    aggregate = config.aggregate.enabled
    # The snippets connect to /mcp when it is served (one client entry for every server).
    url = config.aggregate_url() if aggregate else config.resource_url(config.servers[0].name)
    ca = str(ca_file) if ca_file else "<your CA bundle>"
    lines = ["", "MCP gateway dev stack is up.", "", "Endpoints (Streamable HTTP, TLS):"]
    if aggregate:
        lines.append(f"  {config.aggregate_url()}  (every server you may use, tools named "
                     f"<server>__<tool>; docs/aggregate.md)")
        lines += [f"  {config.aggregate_url(v.name)}  (virtual server: {', '.join(v.tools)})"
                  for v in config.virtual_servers]
    lines += [f"  {config.resource_url(s.name)}" + _upstream_note(s) for s in config.servers]
    lines += [
        f"  {host}/.well-known/oauth-protected-resource/mcp/<server>  (RFC 9728 metadata)",
        f"  {host}/health",
        *([f"Web console: {config.console_url()}  (sign in with the token below; docs/console.md)"]
          if config.console.enabled else []),
        f"Envoy admin (loopback only): http://{config.admin.host}:{config.admin.port}",
        f"CA certificate: {ca}",
        f"Logs: {paths(config).logs}",
        *observability_lines(config, components or [], live=lambda url: serves_metrics(
            url, inner_client_context(config) if url.startswith("https:") else None)),
        "",
        f"Token ({DEV_TOKEN_SUB}, roles {','.join(DEV_TOKEN_ROLES)}, every server, "
        f"{DEV_TOKEN_TTL // 3600} h):",
        f"  export MCP_TOKEN={token}",
        "  (another one: mcp-gateway token --sub alice --role analyst --tenant acme --ttl 3600)",
        "",
        "curl:",
        f"  curl --cacert {ca} {url} \\",
        "    -H \"Authorization: Bearer $MCP_TOKEN\" -H 'Content-Type: application/json' \\",
        "    -H 'Accept: application/json, text/event-stream' \\",
        "    -d '{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"initialize\",\"params\":{\"protocolVersion\":"
        "\"2025-11-25\",\"capabilities\":{},\"clientInfo\":{\"name\":\"curl\",\"version\":\"1\"}}}'",
        "",
        "Python (official mcp SDK: `pip install mcp==2.3.0`; `make test` installs it in .venv):",
        "  import asyncio, os, ssl, httpx2",
        "  from mcp import ClientSession",
        "  from mcp.client.streamable_http import streamable_http_client",
        "  async def main():",
        f"      tls = ssl.create_default_context(cafile={ca!r})",
        "      headers = {'Authorization': 'Bearer ' + os.environ['MCP_TOKEN']}",
        "      async with httpx2.AsyncClient(verify=tls, headers=headers) as http, \\",
        f"              streamable_http_client({url!r}, http_client=http) "
        "as (r, w), \\",
        "              ClientSession(r, w) as session:",
        "          await session.initialize()",
        "          print(await session.list_tools())",
        "  asyncio.run(main())",
        "",
        "MCP Inspector (CLI):",
        f"  NODE_EXTRA_CA_CERTS={ca} npx @modelcontextprotocol/inspector --cli \\",
        f"    {url} --transport http --method tools/list \\",
        "    --header \"Authorization: Bearer $MCP_TOKEN\"",
        "",
        "Claude Code (.mcp.json; VS Code's .vscode/mcp.json uses \"servers\" instead of "
        "\"mcpServers\"); start the client with NODE_EXTRA_CA_CERTS=" + ca + ":",
    ]
    auth = {"Authorization": "Bearer ${MCP_TOKEN}"}
    entries = ({"mcp-gateway": {"type": "http", "url": url, "headers": auth}} if aggregate else
               {s.name: {"type": "http", "url": config.resource_url(s.name), "headers": auth}
                for s in config.servers})
    mcp_json = {"mcpServers": entries}
    lines += ["  " + line for line in json.dumps(mcp_json, indent=2).splitlines()]
    lines += ["", "`mcp-gateway down` stops everything." if detach else "Ctrl-C stops everything."]
    return "\n".join(lines)
