"""A stand-in for the gateway's per-server routes: verifies the workflow server's delegated token
like ext_authz would (signature, issuer, audience) and answers each tools/call from a script."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import jwt
import orjson
from aiohttp import web

from gateway.assertion import KeyRing

# A script entry answers (server, tool) with a function of the arguments giving one of:
# ("ok", structured) | ("tool_error", text) | ("http", status, reason) | ("hang",)
# | ("chunked", structured, chunk_bytes): the JSON answer written in chunks of that size
# | ("plain", status): a text/plain body, no JSON-RPC answer (as Envoy's 502/504)
Answer = tuple[Any, ...]
Script = dict[tuple[str, str], Callable[[dict[str, Any]], Answer]]


@dataclass
class Standin:
    url: str
    calls: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = field(default_factory=list)

    def tools(self) -> list[str]:
        return [f"{s}/{t}" for s, t, _, _ in self.calls]


@asynccontextmanager
async def standin_gateway(ring: KeyRing, issuer: str, script: Script) -> AsyncIterator[Standin]:
    key = ring.signing.private_key.public_key()
    holder: list[Standin] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        server = request.match_info["server"]
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        try:
            claims = jwt.decode(token, key, algorithms=["ES256"], issuer=issuer,
                                audience=f"{holder[0].url}/mcp/{server}",
                                options={"require": ["exp", "iat", "sub", "aud", "iss"]})
        except jwt.InvalidTokenError as exc:
            return web.json_response({"jsonrpc": "2.0", "id": None, "error": {
                "code": -32001, "message": str(exc), "data": {"reason": "invalid_token"}}}, status=401)
        body = await request.json()
        tool = body["params"]["name"]
        args = body["params"].get("arguments", {})
        holder[0].calls.append((server, tool, args, claims))
        rid = body["id"]
        answer = script[(server, tool)](args) if (server, tool) in script else ("ok", {"echo": args})
        if answer[0] == "hang":
            await asyncio.Event().wait()
        if answer[0] == "http":
            return web.json_response({"jsonrpc": "2.0", "id": rid, "error": {
                "code": -32003, "message": "denied", "data": {"reason": answer[2]}}}, status=answer[1])
        if answer[0] == "plain":
            return web.Response(status=answer[1], text="upstream connect error", content_type="text/plain")
        if answer[0] == "chunked":
            body = orjson.dumps({"jsonrpc": "2.0", "id": rid, "result": {
                "content": [{"type": "text", "text": "ok"}], "structuredContent": answer[1]}})
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(0, len(body), answer[2]):
                await resp.write(body[i:i + answer[2]])
                await asyncio.sleep(0)  # each chunk reaches the client on its own
            await resp.write_eof()
            return resp
        if answer[0] == "tool_error":
            result: dict[str, Any] = {"content": [{"type": "text", "text": answer[1]}], "isError": True}
        else:
            result = {"content": [{"type": "text", "text": "ok"}], "structuredContent": answer[1]}
        return web.json_response({"jsonrpc": "2.0", "id": rid, "result": result})

    app = web.Application()
    app.router.add_post("/mcp/{server}", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    holder.append(Standin(f"http://127.0.0.1:{port}"))
    try:
        yield holder[0]
    finally:
        await runner.cleanup()
