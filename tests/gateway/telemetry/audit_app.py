"""A tiny aiohttp service that audits each request before answering (for the SIGKILL test).

Run: python -m tests.gateway.telemetry.audit_app AUDIT_PATH [SYNC]. Prints "PORT <n>" once
listening. SYNC is the writer's sync mode (batch, the default, or interval).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.telemetry.audit import AuditEntry, AuditWriter, args_digest

WRITER = web.AppKey("writer", AuditWriter)


async def handle(request: web.Request) -> web.Response:
    request_id = request.headers["x-request-id"]
    arguments = await request.json()
    entry = AuditEntry(method="tools/call", server="files", target="read_file", sub="alice",
                       client_id="cli", tenant="acme", decision="allow", reason=None, status="ok",
                       latency_ms=0.1, request_id=request_id, decision_id=f"d-{request_id}",
                       args_digest=args_digest(arguments))
    await request.app[WRITER].write(entry)
    return web.json_response({"request_id": request_id})


async def main(path: str, sync: str) -> None:
    async def writer_ctx(app: web.Application) -> AsyncIterator[None]:
        # interval: fsync'ed a long while later, so the kill lands between fsyncs
        async with AuditWriter(path, sync=sync, sync_interval=30.0) as writer:
            app[WRITER] = writer
            yield

    app = web.Application()
    app.cleanup_ctx.append(writer_ctx)
    app.router.add_post("/call", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert runner.addresses
    print(f"PORT {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "batch"))
