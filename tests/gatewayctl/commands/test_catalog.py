"""``mcp-gateway catalog list|approve|refresh`` end to end on a real database and MCP server."""

from __future__ import annotations

import argparse
from pathlib import Path

import orjson
import pytest

from gateway.catalog import Catalog, definition_hash
from gatewayctl.commands import catalog
from tests.gateway.catalog.mcp_stub import Stub, running_in_thread


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mcp-gateway")
    parser.add_argument("--config")
    catalog.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    rc: int = args.func(args)
    return rc


CONFIG = """
tls: {{cert_file: c.pem, key_file: c.key}}
issuers: [{{issuer: https://issuer.test, jwks_url: http://127.0.0.1:1/jwks.json}}]
ext_authz: {{instances: [{{port: 9101}}]}}
ext_proc: {{instances: [{{port: 9111}}]}}
state_dir: {state}
servers:
  files:
    module: mcp_servers.files
    instances: [{{port: {dead}}}, {{port: {port}}}]
"""


def test_list_approve_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """list shows pins, state and findings; approve un-quarantines; --json is machine-readable."""
    db = tmp_path / "c.sqlite"
    with Catalog(db) as cat:
        cat.refresh("a", [{"name": "search", "description": "x"}, {"name": "odd", "description": "\u200b"}])
        cat.refresh("b", [{"name": "search"}])
        cat.refresh("a", [{"name": "search", "description": "changed"},
                          {"name": "odd", "description": "\u200b"}])
    assert run(["catalog", "list", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "quarantined" in out and "U+200B" in out and "same name on b" in out
    assert "ROLES" in out

    assert run(["catalog", "approve", "a/search", "--db", str(db)]) == 0
    assert "approved a/search" in capsys.readouterr().out
    assert run(["catalog", "list", "--json", "--db", str(db)]) == 0
    data = orjson.loads(capsys.readouterr().out)
    states = {(i["server"], i["name"]): i["state"] for i in data["items"]}
    assert states[("a", "search")] == "approved"
    assert data["shadowed"] == {"search": ["a", "b"]}
    assert data["roles_wired"] is True  # the embedded default config's policies/
    assert {(i["server"], i["name"]): i["roles"] for i in data["items"]}[("a", "search")] == []


def test_list_names_the_roles_the_policy_lets_call_each_tool(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The ROLES column comes from the shipped policy: one list query per server and role."""
    db = tmp_path / "c.sqlite"
    with Catalog(db) as cat:
        cat.refresh("files", [{"name": "read_file"}, {"name": "write_file"}])
        cat.refresh("erp", [{"name": "createOrder"}, {"name": "listOrders"}])
    assert run(["catalog", "list", "--json", "--db", str(db)]) == 0
    roles = {(i["server"], i["name"]): set(i["roles"])
             for i in orjson.loads(capsys.readouterr().out)["items"]}
    assert "admin" in roles[("files", "read_file")] and "viewer" in roles[("files", "read_file")]
    assert "viewer" not in roles[("files", "write_file")]
    assert "engineer" in roles[("erp", "createOrder")] and "viewer" not in roles[("erp", "createOrder")]
    assert "viewer" in roles[("erp", "listOrders")]


def test_list_scope_is_the_scope_each_role_lists_with(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--scope replaces the server-wide default scope: a tool outside it is shown to no role."""
    db = tmp_path / "c.sqlite"
    with Catalog(db) as cat:
        cat.refresh("files", [{"name": "read_file"}, {"name": "stat"}])
    assert run(["catalog", "list", "--json", "--db", str(db),
                "--scope", "openid tools:call:{server}/read_file"]) == 0
    data = orjson.loads(capsys.readouterr().out)
    roles = {i["name"]: set(i["roles"]) for i in data["items"]}
    assert {"viewer", "admin"} <= roles["read_file"]
    assert roles["stat"] == set()
    assert data["scope"] == "openid tools:call:{server}/read_file"
    assert run(["catalog", "list", "--json", "--db", str(db)]) == 0
    default = {i["name"]: set(i["roles"]) for i in orjson.loads(capsys.readouterr().out)["items"]}
    assert "viewer" in default["stat"]


def test_approve_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """approve rejects a malformed target and an unknown tool with exit code 2."""
    db = str(tmp_path / "c.sqlite")
    assert run(["catalog", "approve", "nosep", "--db", db]) == 2
    assert run(["catalog", "approve", "a/nope", "--db", db]) == 2
    assert "no tool a/nope" in capsys.readouterr().err


def test_approve_with_hash_refuses_a_definition_changed_since(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """approve --hash approves only the reviewed definition: after a swap it exits 2 naming
    definition_changed and the tool stays quarantined; the current hash approves it."""
    db = tmp_path / "c.sqlite"
    with Catalog(db) as cat:
        cat.refresh("a", [{"name": "search", "description": "x"}])
        cat.refresh("a", [{"name": "search", "description": "reviewed"}])
        reviewed = definition_hash("tool", {"name": "search", "description": "reviewed"})
        cat.refresh("a", [{"name": "search", "description": "swapped"}])
        current = definition_hash("tool", {"name": "search", "description": "swapped"})
    assert run(["catalog", "approve", "a/search", "--hash", reviewed, "--db", str(db)]) == 2
    assert "definition_changed" in capsys.readouterr().err
    assert run(["catalog", "approve", "a/search", "--hash", reviewed[:12], "--db", str(db)]) == 2
    with Catalog(db) as cat:
        entry = cat.get("a", "search")
        assert entry is not None and entry.state == "quarantined"
    assert run(["catalog", "approve", "a/search", "--hash", current, "--db", str(db)]) == 0
    with Catalog(db) as cat:
        entry = cat.get("a", "search")
        assert entry is not None and entry.state == "approved" and entry.approved_hash == current


def test_quarantine_withdraws_a_tool_until_approved(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """quarantine makes an approved tool not callable, audited with the user and reason; an
    unknown tool exits 2; approve lifts it."""
    db = tmp_path / "c.sqlite"
    with Catalog(db) as cat:
        cat.refresh("a", [{"name": "search", "description": "x"}])
    assert run(["catalog", "quarantine", "a/search", "--reason", "leaks", "--db", str(db)]) == 0
    assert "quarantined a/search" in capsys.readouterr().out
    with Catalog(db) as cat:
        assert not cat.is_callable("a", "search")
        event = cat.audit_events("a", "search")[-1]
        assert event["event"] == "quarantined" and event["detail"]["reason"] == "leaks"
        assert event["actor"].startswith("cli:")
    assert run(["catalog", "quarantine", "a/nope", "--db", str(db)]) == 2
    assert run(["catalog", "approve", "a/search", "--db", str(db)]) == 0
    with Catalog(db) as cat:
        assert cat.is_callable("a", "search")


def test_refresh_from_configured_servers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """refresh lists every configured server (skipping a dead instance) and pins what it finds."""
    stub = Stub()
    with running_in_thread(stub) as port:
        cfg = tmp_path / "gw.yaml"
        # Port 1 on loopback refuses connections: the first instance fails, the second answers.
        cfg.write_text(CONFIG.format(state=tmp_path / "state", port=port, dead=1))
        assert run(["--config", str(cfg), "catalog", "refresh"]) == 0
        assert "files: 3 tools (+3 ~0 -0), 1 resources" in capsys.readouterr().out
        stub.tools[0] = {**stub.tools[0], "description": "Read a file and upload it"}
        assert run(["--config", str(cfg), "catalog", "refresh"]) == 0
        assert "files/read_file: definition changed -> quarantined" in capsys.readouterr().out
    with Catalog(tmp_path / "state" / "catalog.sqlite") as cat:
        assert not cat.is_callable("files", "read_file")
        assert cat.is_callable("files", "list_dir")


def test_refresh_unknown_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """refresh --server with a name the config does not have is an error."""
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(CONFIG.format(state=tmp_path, port=2, dead=1))
    assert run(["--config", str(cfg), "catalog", "refresh", "--server", "nope"]) == 2
    assert "unknown server" in capsys.readouterr().err
