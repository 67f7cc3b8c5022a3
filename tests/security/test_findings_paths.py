"""Issue 13, findings 2 (path half), 3 and 5 (files), through the real stack (Envoy + ext_authz +
ext_proc + the files server, TLS on loopback).

2: a path argument or resource URI over a bound is refused before any fact is built (400,
   input_limit_exceeded, the bound named) and the gateway keeps answering everyone else.
3: the policy and the files server read a resource URI the same way, so no spelling of
   ``tenants/globex`` reaches globex's files from an acme token.
5: resources/read, subscribe, unsubscribe, list filtering, completion and the tools follow the
   same path rules.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.reliability.stack import META, Gateway, call_body, call_headers, gateway

pytestmark = pytest.mark.timeout(180)

SECRET = "GLOBEX-ONLY-QUARTERLY-FIGURES"
ACME = "acme report body"
INVALID_PARAMS, FORBIDDEN = -32602, -32003
LONG = 20_000


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("findings-paths")
    root = tmp / "files-root"
    files = {
        "shared/a.txt": "shared a",
        "shared/a b.txt": "shared spaced",
        "reports/q3.txt": "q3",
        "tenants/acme/reports/r.txt": ACME,
        "tenants/globex/reports/secret.txt": SECRET,
        # A literal name made of an escape: reading it is no way into tenants/.
        "%74enants/globex/reports/secret.txt": "decoy",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    servers = {"files": {"module": "mcp_servers.files", "args": ["--root", str(root)]}}
    with gateway(tmp, servers) as running:
        yield running


# ------------------------------------------------------------------------------ requests

def post(gw: Gateway, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode()
    conn = gw.connection()
    try:
        conn.request("POST", "/mcp/files", body=data, headers=headers)
        reply = conn.getresponse()
        raw = reply.read()
    finally:
        conn.close()
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = {"raw": raw.decode("utf-8", "replace")}
    return reply.status, doc if isinstance(doc, dict) else {"raw": doc}


def tool(gw: Gateway, token: str, name: str, arguments: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return post(gw, call_body(name, arguments, 1), call_headers(token, name))


def resource(gw: Gateway, token: str, uri: str, method: str = "resources/read") -> tuple[int, dict[str, Any]]:
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {"uri": uri, "_meta": dict(META)}}
    return post(gw, body, call_headers(token, uri, method))


def error(doc: dict[str, Any]) -> dict[str, Any]:
    err = doc.get("error")
    assert isinstance(err, dict), doc
    return err


def text(doc: dict[str, Any]) -> str:
    result = doc.get("result") or {}
    parts = [c.get("text", "") for c in result.get("content", [])]
    parts += [c.get("text", "") for c in result.get("contents", [])]
    return "".join(str(p) for p in parts)


def assert_serving(gw: Gateway) -> None:
    status, doc = tool(gw, gw.token("analyst"), "read_file", {"path": "tenants/acme/reports/r.txt"})
    assert status == 200 and text(doc) == ACME, doc


# ---------------------------------------------------------------- finding 2: bounds

OVER_BOUNDS = {
    "long_name": ("read_file", {"path": "shared/" + "a" * LONG}, "path_length"),
    "long_segments": ("read_file", {"path": "shared/" + "a/" * (LONG // 2)}, "path_length"),
    "long_slashes": ("read_file", {"path": "shared" + "/" * LONG}, "path_length"),
    "long_dots": ("read_file", {"path": "shared/" + "./" * (LONG // 2)}, "path_length"),
    "long_traversal": ("read_file", {"path": "../" * (LONG // 3)}, "path_length"),
    "long_unicode": ("read_file", {"path": "shared/" + "\u00e9/" * (LONG // 2)}, "path_length"),
    "long_second_argument": ("list_directory", {"path": "shared", "target": "x" * LONG}, "path_length"),
    "deep_short": ("read_file", {"path": "shared/" + "a/" * 200}, "path_depth"),
    "deep_empty_segments": ("list_directory", {"path": "shared" + "/" * 300}, "path_depth"),
}


@pytest.mark.parametrize("case", sorted(OVER_BOUNDS))
@pytest.mark.parametrize("role", ["viewer", "analyst"])
def test_paths_over_a_bound_get_400_naming_it(gw: Gateway, case: str, role: str) -> None:
    """Long or deep path arguments, however spelled, are refused with 400 input_limit_exceeded
    naming the bound, for any role, and the gateway goes on answering other callers."""
    name, arguments, limit = OVER_BOUNDS[case]
    status, doc = tool(gw, gw.token(role, sub=f"attacker-{role}"), name, arguments)
    err = error(doc)
    assert status == 400, doc
    assert err["code"] == INVALID_PARAMS and err["data"]["reason"] == "input_limit_exceeded"
    assert err["data"]["limit"] == limit and isinstance(err["data"]["max"], int)
    assert_serving(gw)


@pytest.mark.parametrize("uri,limit", [
    ("file:///shared/" + "a%20" * 2100, "path_length"),
    ("file:///shared/" + "a/" * 200 + "x", "path_depth"),
])
def test_resource_uris_over_a_bound_get_400(gw: Gateway, uri: str, limit: str) -> None:
    """A resource URI naming a path over a bound is refused like a path argument."""
    status, doc = resource(gw, gw.token("viewer"), uri)
    err = error(doc)
    assert status == 400 and err["data"]["reason"] == "input_limit_exceeded" and err["data"]["limit"] == limit


def test_hostile_paths_do_not_stop_other_callers(gw: Gateway) -> None:
    """Hostile 20 KB paths sent alongside ordinary reads: every hostile one is a 400, every
    ordinary one is answered in full."""
    hostile = gw.token("viewer", sub="mallory")
    honest = gw.token("analyst", sub="bob")

    def attack(i: int) -> int:
        return tool(gw, hostile, "read_file", {"path": "shared/" + f"{i}/" * (LONG // 2)})[0]

    def read(_: int) -> tuple[int, str]:
        status, doc = tool(gw, honest, "read_file", {"path": "tenants/acme/reports/r.txt"})
        return status, text(doc)

    with ThreadPoolExecutor(max_workers=8) as pool:
        attacks = [pool.submit(attack, i) for i in range(24)]
        reads = [pool.submit(read, i) for i in range(24)]
        assert [f.result(timeout=60) for f in attacks] == [400] * 24
        assert [f.result(timeout=60) for f in reads] == [(200, ACME)] * 24


# ---------------------------------------------------------------- finding 3: one decoding

GLOBEX_URIS = [
    "file:///tenants/globex/reports/secret.txt",
    "file:///%74enants/globex/reports/secret.txt",
    "file:///%74%65%6E%61%6E%74%73/globex/reports/secret.txt",
    "file:///tenants/%67lobex/reports/secret.txt",
    "file:///tenants%2Fglobex%2Freports%2Fsecret.txt",
    "file:///tenants%2fglobex/reports/secret.txt",
    "file:///shared/%2e%2e/tenants/globex/reports/secret.txt",
    "file:///shared/%2E%2E/tenants/globex/reports/secret.txt",
    "file:///shared/..%2Ftenants/globex/reports/secret.txt",
    "file:///%252e%252e/tenants/globex/reports/secret.txt",
    "file:///%2574enants/globex/reports/secret.txt",
    "file:///shared/%c0%ae%c0%ae/tenants/globex/reports/secret.txt",
    "file:///shared%5C..%5Ctenants%5Cglobex%5Creports%5Csecret.txt",
    "file:///tenants/globex/reports/secret.txt%00.txt",
    "FILE:///tenants/globex/reports/secret.txt",
    "file:/tenants/globex/reports/secret.txt",
    "file://localhost/tenants/globex/reports/secret.txt",
    "file:////tenants/globex/reports/secret.txt",
    "file:///tenants//globex/reports/secret.txt",
    "file:///./tenants/globex/reports/secret.txt",
    "file:///tenants/./globex/reports/secret.txt",
    "file:///tenants/globex/reports/secret.txt?x=1",
    "file:///shared/a.txt#/../../tenants/globex/reports/secret.txt",
]


@pytest.mark.parametrize("uri", GLOBEX_URIS)
@pytest.mark.parametrize("role", ["admin", "analyst"])
def test_no_spelling_of_another_tenant_reads_it(gw: Gateway, uri: str, role: str) -> None:
    """From an acme token, every spelling of tenants/globex/... is refused by the policy (403),
    for read, subscribe and unsubscribe alike, and nothing of globex comes back."""
    token = gw.token(role, sub=f"acme-{role}")
    for method in ("resources/read", "resources/subscribe", "resources/unsubscribe"):
        status, doc = resource(gw, token, uri, method)
        assert status == 403, (method, doc)
        assert error(doc)["code"] == FORBIDDEN
        assert SECRET not in json.dumps(doc)


GLOBEX_PATHS = [
    "tenants/globex/reports/secret.txt", "./tenants/globex/reports/secret.txt",
    "tenants//globex/reports/secret.txt", "tenants/./globex/reports/secret.txt",
    "shared/../tenants/globex/reports/secret.txt", "/tenants/globex/reports/secret.txt",
    "tenants\\globex\\reports\\secret.txt", "shared\\..\\tenants/globex/reports/secret.txt",
    "%74enants/globex/reports/secret.txt", "tenants/globex/reports/secret.txt\u0000",
    "tenants/globex/reports/", "tenants/globex", "tenants",
]


@pytest.mark.parametrize("path", GLOBEX_PATHS)
@pytest.mark.parametrize("name", ["read_file", "stat", "list_directory"])
def test_no_tool_path_spelling_reaches_another_tenant(gw: Gateway, path: str, name: str) -> None:
    """Tool path arguments are not decoded by anyone: every spelling of tenants/globex is refused
    before the server, and a literal '%74enants' folder is just that folder."""
    status, doc = tool(gw, gw.token("admin", sub="acme-admin"), name, {"path": path})
    assert SECRET not in json.dumps(doc)
    if path.startswith("%74enants"):
        assert status == 200 and "globex" in path  # the decoy folder, not tenants/
        assert SECRET not in text(doc)
        return
    assert status in (400, 403), doc


def test_allowed_reads_still_work(gw: Gateway) -> None:
    """Own-tenant and shared files read as before, through tools and resources, a canonical
    escape (a space) included."""
    analyst, viewer = gw.token("analyst"), gw.token("viewer")
    status, doc = resource(gw, analyst, "file:///tenants/acme/reports/r.txt")
    assert status == 200 and text(doc) == ACME, doc
    status, doc = resource(gw, viewer, "file:///shared/a%20b.txt")
    assert status == 200 and text(doc) == "shared spaced", doc
    status, doc = tool(gw, viewer, "read_file", {"path": "shared/a b.txt"})
    assert status == 200 and text(doc) == "shared spaced", doc
    status, doc = tool(gw, analyst, "read_file", {"path": "./reports//q3.txt"})
    assert status == 200 and text(doc) == "q3", doc


# ---------------------------------------------------------------- finding 5: side doors

def test_listing_shows_only_what_may_be_read(gw: Gateway) -> None:
    """resources/list (filtered by ext_proc) shows an acme analyst no globex file, and every
    listed URI reads."""
    analyst = gw.token("analyst")
    body = {"jsonrpc": "2.0", "id": 1, "method": "resources/list", "params": {"_meta": dict(META)}}
    status, doc = post(gw, body, call_headers(analyst, None, "resources/list"))
    assert status == 200, doc
    uris = [r["uri"] for r in doc["result"]["resources"]]
    assert "file:///tenants/acme/reports/r.txt" in uris
    assert not [u for u in uris if "globex" in u or "%74" in u]
    for uri in uris:
        assert resource(gw, analyst, uri)[0] == 200, uri


def test_completion_is_refused_on_the_files_server(gw: Gateway) -> None:
    """completion/complete on the files server (a path lister by another door) is refused."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "completion/complete",
            "params": {"ref": {"type": "ref/resource", "uri": "file:///{+path}"},
                       "argument": {"name": "path", "value": "tenants/glo"}, "_meta": dict(META)}}
    status, doc = post(gw, body, call_headers(gw.token("admin"), None, "completion/complete"))
    assert status == 403 and error(doc)["code"] == FORBIDDEN, doc
