"""Render time of each console page with 1,000 tools in the catalog and 100,000 audit entries.

    .venv/bin/python -m bench.console_pages [--tools 1000] [--entries 100000] [--repeat 20]

Builds a catalog of ``--tools`` tools over ten servers (one in ten quarantined) and an audit trail
of ``--entries`` entries in four writers' chains, starts the console on a loopback port with a
local JWKS server, signs in, then times each page over HTTP (median / p95 / max of ``--repeat``
requests; the matrix's computation, which decides every role x tool, apart from its renders:
it is computed in the background once per policy or catalog change, and timed
until served). Envoy's admin interface is absent here, so the overview measures its error path plus
the page. Prints a table; not a test: nothing asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.catalog import Catalog  # noqa: E402
from gateway.config import parse_config  # noqa: E402
from gateway.console.app import make_app  # noqa: E402
from gateway.console.settings import SESSION_COOKIE, ConsoleSettings  # noqa: E402
from gateway.telemetry.audit import AuditEntry, chain_line, line_hash  # noqa: E402
from gatewayctl.tokens import generate_key, mint_token  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ISSUER = "https://idp.bench.test"
PUBLIC_URL = "https://gw.bench.test"
SERVERS = [f"srv{i}" for i in range(10)]
CHAINS = 4


def build_catalog(path: Path, tools: int) -> None:
    per_server = tools // len(SERVERS)
    with Catalog(path) as catalog:
        for server in SERVERS:
            items: list[dict[str, Any]] = [{"name": f"tool_{j:04d}", "description": f"Tool {j} of {server}",
                      "inputSchema": {"type": "object", "properties": {"x": {"type": "string"}}}}
                     for j in range(per_server)]
            catalog.refresh(server, items)
            # One in ten changes its description: quarantined until approved.
            changed = [{**item, "description": f"{item['description']} (changed)"}
                       if j % 10 == 0 else item for j, item in enumerate(items)]
            catalog.refresh(server, changed)


def build_trail(directory: Path, entries: int) -> str:
    """``entries`` entries over CHAINS chains, time-ordered; returns a rare subject's name."""
    directory.mkdir(parents=True, exist_ok=True)
    files = [(directory / f"writer-{c}.jsonl").open("wb") for c in range(CHAINS)]
    prev = [b"0" * 64] * CHAINS
    seq = [0] * CHAINS
    rare = "rare-subject"
    try:
        for i in range(entries):
            c = i % CHAINS
            entry = AuditEntry(method="tools/call", server=SERVERS[i % len(SERVERS)],
                               target=f"tool_{i % 100:04d}",
                               sub=rare if i == entries // 3 else f"user{i % 500}",
                               client_id=None, tenant="acme", decision="deny" if i % 7 == 0 else "allow",
                               reason="tool_not_granted" if i % 7 == 0 else None, status="ok",
                               latency_ms=2.5, request_id=f"r{i}", decision_id=f"d{i}",
                               ts=f"2026-01-{1 + i // 86400 % 28:02d}T{i // 3600 % 24:02d}:"
                                  f"{i // 60 % 60:02d}:{i % 60:02d}.{i % 1000:06d}Z")
            line = chain_line(entry.body(), seq[c], prev[c])
            prev[c] = line_hash(line[:-1])
            seq[c] += 1
            files[c].write(line)
    finally:
        for f in files:
            f.close()
    return rare


def settings(tmp: Path, jwks_url: str) -> ConsoleSettings:
    raw: dict[str, Any] = {
        "public_url": PUBLIC_URL, "admin": {"port": 1},
        "tls": {"cert_file": str(tmp / "tls.pem"), "key_file": str(tmp / "tls.key")},
        "issuers": [{"issuer": ISSUER, "jwks_url": jwks_url}],
        "policy": {"dir": str(ROOT / "policies")},
        "ext_authz": {"instances": [{"port": 1101}]}, "ext_proc": {"instances": [{"port": 1111}]},
        "servers": {s: {"module": "mcp_servers.files", "instances": [{"port": 1200 + i}]}
                    for i, s in enumerate(SERVERS)},
        "catalog": {"path": str(tmp / "catalog.sqlite")}, "audit": {"dir": str(tmp / "audit")},
        "state_dir": str(tmp), "console": {"instances": [{"port": 1401}]},
    }
    return ConsoleSettings.from_config(parse_config(raw, base_dir=tmp))


async def jwks_app(doc: dict[str, Any]) -> TestServer:
    app = aiohttp.web.Application()

    async def handle(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response(doc)

    app.router.add_get("/jwks.json", handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    return server


def _first(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise SystemExit(f"bench.console_pages: {pattern!r} not in the page")
    return match.group(1)


async def timed(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[float, int, int]:
    start = time.perf_counter()
    async with http.request(method, url, **kw) as resp:
        body = await resp.read()
        status = resp.status
    return (time.perf_counter() - start) * 1000, status, len(body)


async def run(tools: int, entries: int, repeat: int) -> list[tuple[str, list[float], int, int]]:
    key = generate_key("EC", kid="bench")
    jwks = await jwks_app({"keys": [key.public_jwk()]})
    rows: list[tuple[str, list[float], int, int]] = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        t0 = time.perf_counter()
        build_catalog(tmp / "catalog.sqlite", tools)
        rare = build_trail(tmp / "audit", entries)
        print(f"built {tools} tools and {entries} audit entries in {time.perf_counter() - t0:.1f} s")
        conf = settings(tmp, str(jwks.make_url("/jwks.json")))
        server = TestServer(make_app(conf), host="127.0.0.1", port=0)
        await server.start_server()
        origin = {"Origin": PUBLIC_URL}
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:

            def url(path: str) -> str:
                return str(server.make_url(path))

            async with http.get(url("/console/login")) as resp:
                login = resp.headers["Set-Cookie"].split(";")[0]
                csrf = _first(r'name="csrf" value="([^"]+)"', await resp.text())
            token = mint_token(key, issuer=ISSUER, audience=conf.resource, sub="bench", roles=["admin"])
            async with http.post(url("/console/login"), data={"csrf": csrf, "token": token},
                                 headers={**origin, "Cookie": login}, allow_redirects=False) as resp:
                sid = next(h for h in resp.headers.getall("Set-Cookie")
                           if h.startswith(SESSION_COOKIE)).split(";")[0]
            cookie = {"Cookie": sid}
            async with http.get(url("/console/overview"), headers=cookie) as resp:
                page_csrf = _first(r'name="csrf-token" content="([^"]+)"', await resp.text())
            # The matrix is computed in the background (every role x tool decided): time until it
            # is served, then leave the CPU to the pages.
            start = time.perf_counter()
            while True:
                async with http.get(url("/console/matrix"), headers=cookie) as resp:
                    if 'id="matrix"' in await resp.text():
                        break
                await asyncio.sleep(0.05)
            rows.append(("matrix computation in the background (once per change)",
                         [(time.perf_counter() - start) * 1000], 200, 0))
            pages: list[tuple[str, str, str, dict[str, Any]]] = [
                ("overview (Envoy absent)", "GET", "/console/overview", {}),
                (f"catalog ({tools} tools)", "GET", "/console/catalog", {}),
                ("catalog, quarantined only", "GET", "/console/catalog?state=quarantined", {}),
                ("catalog item", "GET", "/console/catalog/srv3/tool/tool_0010", {}),
                ("matrix, cached", "GET", "/console/matrix", {}),
                ("playground, evaluate", "POST", "/console/playground", {"data": {
                    "csrf": page_csrf, "claims": '{"sub": "a", "roles": ["viewer"], "tenant": "acme"}',
                    "request": '{"jsonrpc": "2.0", "id": 1, "method": "tools/call", '
                               '"params": {"name": "tool_0001", "arguments": {}}}',
                    "server": "srv1", "method": "POST", "headers": ""}, "headers": origin}),
                ("audit, newest 100", "GET", "/console/audit", {}),
                ("audit, newest 500 denials", "GET", "/console/audit?outcome=deny&limit=500", {}),
                (f"audit, one subject (scans all {entries})", "GET", f"/console/audit?sub={rare}", {}),
                ("audit, one decision id", "GET", f"/console/audit?decision_id=d{entries - 5}", {}),
                ("audit export, one subject", "GET", f"/console/audit/export?sub={rare}", {}),
            ]
            for name, method, path, kw in pages:
                headers = {**cookie, **kw.pop("headers", {})}
                samples: list[float] = []
                status = size = 0
                for _ in range(repeat):
                    ms, status, size = await timed(http, method, url(path), headers=headers, **kw)
                    samples.append(ms)
                rows.append((name, samples, status, size))
        await server.close()
    await jwks.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.console_pages",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--tools", type=int, default=1000)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)
    rows = asyncio.run(run(args.tools, args.entries, args.repeat))
    print(f"{'page':58} {'status':>6} {'bytes':>9} {'median ms':>10} {'p95 ms':>8} {'max ms':>8}")
    for name, samples, status, size in rows:
        ordered = sorted(samples)
        p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
        print(f"{name:58} {status:>6} {size:>9} {statistics.median(samples):>10.1f} {p95:>8.1f} "
              f"{max(samples):>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
