"""A third-party upstream that trusts the gateway the way any server could: it verifies the
caller assertion with plain PyJWT (``PyJWKClient``) against the gateway's published JWKS, and
uses no code of this project.

Run as ``python -m tests.e2e.jwt_upstream --port P --jwks-url URL --ca FILE --issuer ISS
--audience AUD``. ``/mcp`` answers a JSON-RPC result with the verified claims (or the PyJWT
error) and the ``x-mcp-*`` headers it received.
"""

from __future__ import annotations

import argparse
import json
import ssl
from typing import Any

import jwt
from aiohttp import web

JWKS_CLIENT = web.AppKey("jwks_client", jwt.PyJWKClient)
SETTINGS = web.AppKey("settings", dict)


async def mcp(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        msg = json.loads(body) if body else {}
    except ValueError:
        msg = {}
    seen = {k.lower(): v for k, v in request.headers.items() if k.lower().startswith("x-mcp-")}
    settings: dict[str, Any] = request.app[SETTINGS]
    token = request.headers.get("x-mcp-assertion", "")
    result: dict[str, Any] = {"headers": seen}
    try:
        key = request.app[JWKS_CLIENT].get_signing_key_from_jwt(token)
        result["claims"] = jwt.decode(token, key, algorithms=["ES256"],
                                      audience=settings["audience"], issuer=settings["issuer"],
                                      options={"require": ["exp", "iat", "jti", "sub"]})
    except jwt.PyJWTError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        return web.json_response({"jsonrpc": "2.0", "id": msg.get("id"),
                                  "error": {"code": -32001, "message": result["error"],
                                            "data": result}}, status=401)
    method = msg.get("method")
    if "id" not in msg:
        return web.Response(status=202)  # a notification
    if method == "initialize":  # enough of MCP for the gateway's catalog fetch
        result.update({"protocolVersion": msg.get("params", {}).get("protocolVersion"),
                       "capabilities": {"tools": {}},
                       "serverInfo": {"name": "jwt-upstream", "version": "1.0.0"}})
    elif method == "tools/list":
        result["tools"] = [{"name": "whoami", "inputSchema": {"type": "object"}}]
    elif method == "tools/call":
        result["content"] = [{"type": "text", "text": json.dumps(result["claims"])}]
    return web.json_response({"jsonrpc": "2.0", "id": msg.get("id"), "result": result})


async def ok(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--jwks-url", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--issuer", required=True)
    parser.add_argument("--audience", required=True)
    parser.add_argument("--jwks-cache-seconds", type=float, default=60.0,
                        help="how long the JWKS is cached, and the least time between refetches "
                             "for an unknown kid")
    args, _ = parser.parse_known_args()
    app = web.Application()
    app[JWKS_CLIENT] = jwt.PyJWKClient(args.jwks_url, lifespan=args.jwks_cache_seconds,
                                       cooldown_duration=args.jwks_cache_seconds, timeout=5,
                                       ssl_context=ssl.create_default_context(cafile=args.ca))
    app[SETTINGS] = {"issuer": args.issuer, "audience": args.audience}
    app.router.add_get("/health", ok)
    app.router.add_get("/ready", ok)
    app.router.add_route("*", "/mcp", mcp)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
