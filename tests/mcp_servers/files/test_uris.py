"""The files server reads a resource URI with the gateway's own function (issue 13, finding 3).

Whatever the policy judged is what the server opens: a URI the gateway's facts call malformed
names no file here, and a URI they accept opens exactly the path they judged.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from gateway.paths import MAX_PATH_SEGMENTS, file_uri, file_uri_path
from gateway.policy.facts import resource_facts
from mcp_servers.core import MCPServer, ResourceNotFound, ToolContext
from mcp_servers.files.sandbox import Sandbox, SandboxError
from mcp_servers.files.server import create_server

# No handler of the files server reads its context.
CTX = cast(ToolContext, object())

FILES = {
    "tenants/globex/reports/a.txt": "globex secret",
    "tenants/acme/reports/a.txt": "acme report",
    "shared/a b.txt": "spaced",
    "shared/caf\u00e9.txt": "nfc",
    "shared/cafe\u0301.txt": "nfd",
    "shared/%2e": "literal percent name",
    "shared/%74x": "literal percent t",
    "shared/a\\b": "backslash name",
    "shared/a.": "trailing dot",
    "shared/~x": "tilde",
}

URIS = [
    "file:///tenants/globex/reports/a.txt", "file:///%74enants/globex/reports/a.txt",
    "file:///tenants%2Fglobex/reports/a.txt", "file:///tenants/%67lobex/reports/a.txt",
    "file:///shared/%2e%2e/tenants/globex/reports/a.txt", "file:///shared/%2E%2E/tenants/globex/reports/a.txt",
    "file:///%252e%252e/tenants/globex/reports/a.txt", "file:///shared/%252e", "file:///shared/%2574x",
    "file:///shared/%c0%ae%c0%ae/tenants/globex/reports/a.txt", "FILE:///tenants/globex/reports/a.txt",
    "file:/tenants/globex/reports/a.txt", "file://localhost/tenants/globex/reports/a.txt",
    "file:////tenants/globex/reports/a.txt", "file:///tenants//globex/reports/a.txt",
    "file:///tenants/./globex/reports/a.txt", "file:///tenants/globex/reports/a.txt?x=1",
    "file:///tenants/globex/reports/a.txt#f", "file:///shared/a%5Cb", "file:///shared/a%5cb",
    "file:///shared/a\\b", "file:///shared/a%00", "file:///tenants/acme/reports/a.txt",
    "file:///shared/a%20b.txt", "file:///shared/a b.txt", "file:///shared/a%20b.txt/", "file:///shared/caf%C3%A9.txt",
    "file:///shared/caf%c3%a9.txt", "file:///shared/caf\u00e9.txt", "file:///shared/cafe%CC%81.txt",
    "file:///shared/a.", "file:///shared/~x", "file:///shared/%7Ex", "file:///shared/%ff",
]


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    root = tmp_path / "root"
    for rel, text in FILES.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    # A name that is not UTF-8: no URI can spell it.
    os.close(os.open(os.fsencode(root / "shared") + b"/\xff.txt", os.O_CREAT | os.O_WRONLY, 0o644))
    with Sandbox(root) as box:
        yield box


@pytest.fixture
def server(sandbox: Sandbox) -> MCPServer:
    return create_server(sandbox)


async def _read(server: MCPServer, uri: str) -> str | None:
    try:
        result = await server.read_resource(uri, CTX)
    except ResourceNotFound:
        return None
    text: str = result["contents"][0]["text"]
    return text


@pytest.mark.parametrize("uri", URIS)
async def test_server_opens_exactly_the_path_the_policy_judged(server: MCPServer, uri: str) -> None:
    """A URI the gateway's facts call malformed reads nothing; one they accept reads the file at
    the path they judged (the same bytes the tools read for that path)."""
    facts = resource_facts(uri)
    got = await _read(server, uri)
    if not facts["well_formed"]:
        assert got is None, uri
        return
    path = file_uri_path(uri)
    assert path is not None and facts["prefixes"][-1] == path
    assert got == FILES[path], uri


async def test_no_encoded_spelling_reaches_another_tenant(server: MCPServer) -> None:
    """Only the plain spelling of tenants/globex/... reads it, which the policy judges as globex's."""
    readers = [u for u in URIS if await _read(server, u) == "globex secret"]
    assert readers == ["file:///tenants/globex/reports/a.txt"]
    assert resource_facts(readers[0])["tenant"] == "globex"


async def test_listing_offers_only_readable_canonical_uris(server: MCPServer) -> None:
    """resources/list gives the one URI of each file; names no URI can spell ('%', backslash,
    not UTF-8) are left out, and every listed URI reads its file."""
    listed = await server._list_resources(CTX)
    uris = {item["uri"]: item["name"] for item in listed}
    assert "file:///shared/a%20b.txt" in uris and "file:///shared/caf%C3%A9.txt" in uris
    assert not any(name in ("shared/%2e", "shared/%74x", "shared/a\\b") for name in uris.values())
    assert not any("\udcff" in name for name in uris.values())
    for uri, name in uris.items():
        assert file_uri(name) == uri and file_uri_path(uri) == name
        assert await _read(server, uri) == FILES[name]


def test_unicode_is_not_normalized(sandbox: Sandbox) -> None:
    """NFC and NFD spellings are different names, in the sandbox as in the policy's facts."""
    nfc, nfd = "shared/caf\u00e9.txt", "shared/cafe\u0301.txt"
    assert unicodedata.normalize("NFC", nfd) == nfc
    assert sandbox.read_file(nfc).data == b"nfc" and sandbox.read_file(nfd).data == b"nfd"


@pytest.mark.parametrize("path", ["a/" * MAX_PATH_SEGMENTS, "shared/a\x00", "/" + "a/" * 10, "shared/\ud800"])
def test_sandbox_refuses_what_the_gateway_bounds(sandbox: Sandbox, path: str) -> None:
    """Too deep, NUL, absolute or a lone surrogate: refused by the sandbox as by the gateway."""
    with pytest.raises(SandboxError) as exc:
        sandbox.stat(path)
    assert exc.value.code == "invalid_path"


def test_files_server_offers_no_completion(server: MCPServer) -> None:
    """No completion handler (it would list paths by another door; the policy refuses it too)."""
    assert server.completion_handler is None


def test_read_tool_and_resource_agree(sandbox: Sandbox) -> None:
    """The tools read a path as given; the same path's canonical URI names the same file."""
    for name in ("shared/a b.txt", "shared/caf\u00e9.txt", "shared/a.", "shared/~x"):
        assert sandbox.read_file(name).data.decode() == FILES[name]
        assert file_uri_path(file_uri(name)) == name


