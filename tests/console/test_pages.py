"""The console's pages over real HTTP: the playground decides as `mcp-gateway policy eval`,
the matrix from the policy, the catalog and its approval, the audit search and export."""

from __future__ import annotations

import asyncio
import json
import os
import re

import orjson
import pytest

from gateway.telemetry.audit import AuditEntry, chain_line, line_hash
from gatewayctl import cli
from tests.console.conftest import COOKIE, ORIGIN, Console

VIEWER_CLAIMS = {"sub": "alice", "roles": ["viewer"], "tenant": "acme", "scope": "tools:call:files/*"}


def _field(html: str, ident: str) -> str:
    match = re.search(rf'id="{ident}">([^<]*)<', html)
    assert match, f"no #{ident} in the page"
    return match.group(1)


@pytest.mark.parametrize(("tool", "verdict"), [("read_file", "ALLOW"), ("search", "DENY")])
async def test_playground_decides_as_policy_eval(console: Console, capsys: pytest.CaptureFixture[str],
                                                 tool: str, verdict: str) -> None:
    """The playground's verdict and reason are those `mcp-gateway policy eval` prints for the
    same claims and request (one shared input builder)."""
    sid, csrf = await console.sign_in(["admin"])
    request = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                          "params": {"name": tool, "arguments": {"path": "shared/a.md"}}})
    async with console.http.post(console.url("/console/playground"), data={
            "csrf": csrf, "claims": json.dumps(VIEWER_CLAIMS), "request": request, "server": "files",
            "method": "POST", "headers": ""},
            headers={"Origin": ORIGIN, "Cookie": f"{COOKIE}={sid}"}) as resp:
        html = await resp.text()
        assert resp.status == 200, html
    capsys.readouterr()
    rc = cli.main(["policy", "eval", "--dir", console.settings.policy_dir, "--claims",
                   json.dumps(VIEWER_CLAIMS), "--request", request, "--server", "files"])
    printed = capsys.readouterr().out.splitlines()[0]
    assert _field(html, "verdict") == verdict == printed.split()[0]
    assert f"reason={_field(html, 'reason')}" in printed
    assert rc == (0 if verdict == "ALLOW" else 1)


async def test_playground_reports_a_request_refused_before_the_policy(console: Console) -> None:
    """A body that is not one JSON-RPC message is refused as ext_authz refuses it."""
    sid, csrf = await console.sign_in(["admin"])
    async with console.http.post(console.url("/console/playground"), data={
            "csrf": csrf, "claims": json.dumps(VIEWER_CLAIMS), "request": "[1, 2]", "server": "files",
            "method": "POST", "headers": ""},
            headers={"Origin": ORIGIN, "Cookie": f"{COOKIE}={sid}"}) as resp:
        html = await resp.text()
    assert resp.status == 200 and _field(html, "verdict") == "DENY"
    assert "before the policy" in html


async def test_matrix_shows_each_roles_decision_with_its_reason(console: Console) -> None:
    """viewer may read_file but not write_file (the reason in the cell's title); admin may both."""
    sid, _ = await console.sign_in(["admin"])
    html = ""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    # Computed in the background: the page says so until it is ready.
    while 'id="matrix"' not in html:
        assert loop.time() < deadline, "the matrix was not computed within 60 s"
        async with console.http.get(console.url("/console/matrix"),
                                    headers={"Cookie": f"{COOKIE}={sid}"}) as resp:
            html = await resp.text()
            assert resp.status == 200, html
        if 'id="matrix"' not in html:
            assert 'id="matrix-computing"' in html
            await asyncio.sleep(0.1)

    def cell(role: str, tool: str) -> tuple[str, str]:
        match = re.search(rf'<td class="(allow|deny)" title="([^"]*)" data-role="{role}" '
                          rf'data-tool="files/{tool}"', html)
        assert match, (role, tool)
        return match.group(1), match.group(2)

    assert cell("viewer", "read_file")[0] == "allow"
    verdict, reason = cell("viewer", "write_file")
    assert verdict == "deny" and reason and reason != "console_role"
    assert cell("admin", "write_file")[0] == "allow"


async def test_catalog_lists_states_and_offers_approval(console: Console) -> None:
    """The catalog page lists each tool with its state; only the quarantined one has a button."""
    sid, _ = await console.sign_in(["admin"])
    async with console.http.get(console.url("/console/catalog"),
                                headers={"Cookie": f"{COOKIE}={sid}"}) as resp:
        html = await resp.text()
    assert 'data-name="write_file" data-state="quarantined"' in html
    assert 'data-name="read_file" data-state="approved"' in html
    assert html.count('class="approve"') == 1
    async with console.http.get(console.url("/console/catalog/files/tool/write_file"),
                                headers={"Cookie": f"{COOKIE}={sid}"}) as resp:
        item = await resp.text()
    assert "Write ANY file" in item and "differs from the current definition" in item


def _write_trail(path: str, n: int, *, special: int) -> None:
    """A writer's chain of ``n`` entries, entry ``special`` by bob, the rest by alice."""
    prev = b"0" * 64
    lines = []
    for i in range(n):
        entry = AuditEntry(method="tools/call", server="files", target="read_file",
                           sub="bob" if i == special else "alice", client_id=None, tenant="acme",
                           decision="allow", reason=None, status="ok", latency_ms=1.0,
                           request_id=f"r{i}", decision_id=f"d{i}",
                           ts=f"2026-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}.000000Z")
        line = chain_line(entry.body(), i, prev)
        prev = line_hash(line[:-1])
        lines.append(line)
    with open(path, "wb") as f:
        f.write(b"".join(lines))


async def test_audit_search_finds_by_subject_and_exports(console: Console) -> None:
    """Searching by subject finds the one entry among 3,000; the export is JSON lines of the
    same rows; a search is bounded by its row limit."""
    audit = console.settings.audit_dir
    os.makedirs(audit, exist_ok=True)
    _write_trail(f"{audit}/ext_authz-1.jsonl", 3000, special=1234)
    sid, _ = await console.sign_in(["admin"])
    cookie = {"Cookie": f"{COOKIE}={sid}"}
    async with console.http.get(console.url("/console/audit?sub=bob"), headers=cookie) as resp:
        html = await resp.text()
    assert "d1234" in html and html.count("<td>bob</td>") == 1
    async with console.http.get(console.url("/console/audit/export?sub=bob"), headers=cookie) as resp:
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        rows = [orjson.loads(line) for line in (await resp.read()).splitlines()]
    assert [r["decision_id"] for r in rows] == ["d1234"]
    # server=files: the console's own entries (who searched) are newer than the trail's.
    async with console.http.get(console.url("/console/api/audit?server=files&limit=5"),
                                headers=cookie) as resp:
        data = await resp.json()
    assert [r["decision_id"] for r in data["rows"]] == ["d2999", "d2998", "d2997", "d2996", "d2995"]
    assert data["scanned"] < 3000  # newest first: one block read, not the whole trail


async def test_audit_search_stops_at_its_bound(console: Console) -> None:
    """A search that finds nothing within the scan bound says it stopped early."""
    from gateway.console.audit_search import Filters, search
    audit = console.settings.audit_dir
    os.makedirs(audit, exist_ok=True)
    _write_trail(f"{audit}/ext_authz-1.jsonl", 500, special=10)
    result = search(audit, Filters(sub="bob"), limit=10, max_scan=100)
    assert result.rows == [] and result.truncated and result.scanned == 100
    result = search(audit, Filters(sub="bob"), limit=10, max_scan=1000)
    assert [r["decision_id"] for r in result.rows] == ["d10"] and not result.truncated
