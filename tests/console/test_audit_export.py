"""Audit searches and exports from the console: each recorded in the audit trail (who, filters,
rows), the export under its own console action, streamed, one at a time."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.console import views
from gateway.console.activity import CONSOLE_AUDIT_FILE, describe
from gateway.console.audit_search import Filters
from gateway.console.state import CONSOLE
from gateway.telemetry.audit import iter_audit
from gateway.telemetry.audit_keys import SubjectKeyStore
from gateway.telemetry.audit_verify import verify_chain
from tests.console.conftest import COOKIE, Console
from tests.console.test_pages import _write_trail


def _console_entries(console: Console) -> list[dict[str, Any]]:
    path = Path(console.settings.audit_dir) / CONSOLE_AUDIT_FILE
    return [e for e in iter_audit(path) if "method" in e] if path.exists() else []


async def test_searches_and_exports_are_recorded_in_the_trail(console: Console) -> None:
    """A search records who ran it, its filters and its row count; an export records its start
    and its end with the rows written; the console's chain verifies; the live tail's poll of the
    search just recorded is not recorded again."""
    os.makedirs(console.settings.audit_dir, exist_ok=True)
    _write_trail(f"{console.settings.audit_dir}/ext_authz-1.jsonl", 300, special=120)
    sid, _ = await console.sign_in(["security"], sub="sec-officer")
    cookie = {"Cookie": f"{COOKIE}={sid}"}
    async with console.http.get(console.url("/console/audit?sub=bob&server=files"), headers=cookie) as resp:
        assert resp.status == 200
    async with console.http.get(console.url("/console/api/audit?sub=bob&server=files"),
                                headers=cookie) as resp:
        assert resp.status == 200
    async with console.http.get(console.url("/console/audit/export?server=files"), headers=cookie) as resp:
        assert resp.status == 200
        assert len((await resp.read()).splitlines()) == 300
    entries = _console_entries(console)
    assert [(e["method"], e["target"], e["reason"], e["status"], e["sub"]) for e in entries] == [
        ("console/audit.search", "sub=bob server=files", "rows=1", "ok", "sec-officer"),
        ("console/audit.export", "server=files", None, "started", "sec-officer"),
        ("console/audit.export", "server=files", "rows=300", "ok", "sec-officer"),
    ]
    assert all(e["service"] == "console" for e in entries)
    assert verify_chain(Path(console.settings.audit_dir) / CONSOLE_AUDIT_FILE).ok


async def test_export_streams_batches_without_collecting_the_rows(console: Console,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The export never builds the list of rows (the collecting search is not called): it writes
    batches as it reads them, every matching entry once, newest first."""
    os.makedirs(console.settings.audit_dir, exist_ok=True)
    _write_trail(f"{console.settings.audit_dir}/ext_authz-1.jsonl", 2500, special=7)

    def collecting(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the export collected every row in memory")

    sid, _ = await console.sign_in(["admin"])
    monkeypatch.setattr(views, "search", collecting)
    async with console.http.get(console.url("/console/audit/export?server=files"),
                                headers={"Cookie": f"{COOKIE}={sid}"}) as resp:
        assert resp.status == 200
        rows = [orjson.loads(line) for line in (await resp.read()).splitlines()]
    assert [r["decision_id"] for r in rows] == [f"d{i}" for i in range(2499, -1, -1)]


async def test_one_export_at_a_time(console: Console) -> None:
    """While an export runs, another is refused with 429 export_busy (nothing recorded for it)."""
    sid, _ = await console.sign_in(["admin"])
    st = console.server.app[CONSOLE]
    async with st.export_lock:
        async with console.http.get(console.url("/console/audit/export"),
                                    headers={"Cookie": f"{COOKIE}={sid}"}) as resp:
            assert resp.status == 429
            assert "export_busy" in await resp.text()
    assert _console_entries(console) == []


async def test_export_needs_the_policys_export_action(console: Console, policy_copy: Path) -> None:
    """A role console.rego admits to the console but not to `export` may search (view) but its
    export is refused with 403."""
    rego = policy_copy / "console.rego"
    rego.write_text(rego.read_text().replace('export_roles := {"admin", "security"}',
                                             'export_roles := {"admin"}'))
    await console.server.app[CONSOLE].policy.refresh(force=True)
    sid, _ = await console.sign_in(["security"])
    cookie = {"Cookie": f"{COOKIE}={sid}"}
    async with console.http.get(console.url("/console/audit"), headers=cookie) as resp:
        assert resp.status == 200
    async with console.http.get(console.url("/console/audit/export"), headers=cookie) as resp:
        assert resp.status == 403
        assert "console_role_required" in await resp.text()


def test_a_searched_subject_is_recorded_by_its_pseudonym_when_subjects_are_sealed(tmp_path: Path) -> None:
    """With audit.master_key the recorded filters name a searched subject by its pseudonym, so
    erasing the subject's key also covers who was searched for."""
    store = SubjectKeyStore(tmp_path, os.urandom(32))
    try:
        target = describe(Filters(sub="bob", outcome="deny"), store)
        assert target == f"sub=sid:{store.subject_id('bob')} outcome=deny" and "bob" not in target
        assert describe(Filters(sub="bob"), None) == "sub=bob"
    finally:
        store.close()
