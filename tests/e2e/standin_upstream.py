"""A tiny MCP-server stand-in for dev stack tests: /health, /ready and an echoing /mcp.

Run as ``python -m tests.e2e.standin_upstream --host H --port P``. ``/mcp`` answers a JSON-RPC
result that reports the path, port and the identity headers it received, so tests can see what
Envoy forwarded (and what it stripped).
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web


async def mcp(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        msg = json.loads(body) if body else {}
    except ValueError:
        msg = {}
    seen = {k.lower(): v for k, v in request.headers.items()
            if k.lower().startswith("x-mcp-") or k.lower() in ("authorization", "x-request-id")}
    result = {"path": request.path, "port": request.app["port"], "headers": seen,
              "method": request.method}
    return web.json_response({"jsonrpc": "2.0", "id": msg.get("id"), "result": result})


async def ok(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args, _ = parser.parse_known_args()
    app = web.Application()
    app["port"] = args.port
    app.router.add_get("/health", ok)
    app.router.add_get("/ready", ok)
    app.router.add_route("*", "/mcp", mcp)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
