"""Where a message on an aggregate endpoint goes, and the one byte-exact rewrite it needs."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from ext_authz.aggregate import (
    MAX_REWRITE_CANDIDATES,
    FastPath,
    NotPlainName,
    ToAggregator,
    UnknownTarget,
    find_rewrite,
    resolve,
)
from gateway.aggregate.views import aggregate_view, virtual_view
from gateway.errors import INVALID_PARAMS, InvalidRequest
from gateway.jsonrpc import parse_message

SERVERS = ("files", "database")
ALL = aggregate_view(SERVERS)
RO = virtual_view("ro", ["files/read_*"], SERVERS)


def _fast(body: bytes, view: Any = ALL) -> tuple[FastPath, dict[str, Any]]:
    """Resolve and apply the rewrite as Envoy's Lua filter does; the result as the server reads it."""
    route = resolve(parse_message(body), body, view)
    assert isinstance(route, FastPath)
    forwarded = orjson.loads(route.rewrite.apply(body))
    assert forwarded == route.message
    return route, forwarded


def test_tools_call_resolves_to_the_real_server_and_tool() -> None:
    """files__read_file goes to files as read_file; arguments and id untouched."""
    body = b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"files__read_file",' \
           b'"arguments":{"path":"a.txt"}}}'
    route, forwarded = _fast(body)
    assert (route.server, route.target, route.exposed_name) == ("files", "read_file", "files__read_file")
    assert forwarded["params"] == {"name": "read_file", "arguments": {"path": "a.txt"}}
    assert route.id_json == "7" and route.upstream_sid is None
    assert route.headers()["x-mcp-route"] == "files"


def test_decoy_argument_before_the_name_is_left_intact() -> None:
    """An argument holding the exposed name, placed before it, is not the one rewritten."""
    body = b'{"jsonrpc":"2.0","id":"r1","method":"tools/call","params":{"arguments":' \
           b'{"path":"files__read_file","files__read_file":"files__read_file"},"name":"files__read_file"}}'
    route, forwarded = _fast(body)
    assert forwarded["params"]["arguments"] == {"path": "files__read_file",
                                               "files__read_file": "files__read_file"}
    assert forwarded["params"]["name"] == "read_file"
    assert route.rewrite.at == body.rindex(b'"files__read_file"')
    assert route.id_json == '"r1"'


def test_escaped_name_is_refused_with_invalid_params() -> None:
    """A name the client escaped cannot be rewritten exactly: refused, never guessed."""
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"files__read\\u005ffile"}}'
    with pytest.raises(NotPlainName) as err:
        resolve(parse_message(body), body, ALL)
    assert err.value.rpc_code == INVALID_PARAMS and err.value.http_status == 400


def test_python_style_escaped_non_ascii_name_is_found() -> None:
    """A non-ASCII name written with \\u escapes (Python's json default) is still rewritable."""
    name = "files__l\u00e9ire"
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": name}}).encode()
    route, forwarded = _fast(body)
    assert forwarded["params"]["name"] == "l\u00e9ire" and route.target == "l\u00e9ire"
    assert route.rewrite.to.isascii()


@pytest.mark.parametrize("name", ["nosuch__read_file", "read_file", "files", "files__"])
def test_unknown_server_prefix_is_invalid_params_naming_it(name: str) -> None:
    """A name that names no server of the view is MCP's unknown tool, naming the name."""
    body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name}})
    with pytest.raises(UnknownTarget) as err:
        resolve(parse_message(body), body, ALL)
    assert err.value.rpc_code == INVALID_PARAMS and name in err.value.message
    assert err.value.data == {"name": name}


def test_virtual_view_refuses_tools_outside_it() -> None:
    """A virtual server exposes only its selection: a real tool outside it is unknown."""
    ok = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": "files__read_file"}})
    assert isinstance(resolve(parse_message(ok), ok, RO), FastPath)
    for name in ("files__write_file", "database__read_x"):
        body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name}})
        with pytest.raises(UnknownTarget):
            resolve(parse_message(body), body, RO)


def test_tool_name_with_separator_keeps_it() -> None:
    """Only the first ``__`` ends the server name."""
    body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                         "params": {"name": "files__a__b"}})
    route, forwarded = _fast(body)
    assert forwarded["params"]["name"] == "a__b"


def test_prompts_resources_and_completion() -> None:
    """Prompt names, resource URIs (``+`` inside kept) and completion refs resolve alike."""
    prompt = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "prompts/get",
                           "params": {"name": "database__summary", "arguments": {"t": "x"}}})
    route, fwd = _fast(prompt)
    assert route.server == "database" and fwd["params"]["name"] == "summary"
    for method in ("resources/read", "resources/subscribe", "resources/unsubscribe"):
        body = orjson.dumps({"jsonrpc": "2.0", "id": 2, "method": method,
                             "params": {"uri": "files+git+ssh://h/a+b"}})
        route, fwd = _fast(body)
        assert route.server == "files" and fwd["params"]["uri"] == "git+ssh://h/a+b"
    comp = orjson.dumps({"jsonrpc": "2.0", "id": 3, "method": "completion/complete",
                         "params": {"ref": {"type": "ref/resource", "uri": "files+file:///{x}"},
                                    "argument": {"name": "x", "value": "a"}}})
    route, fwd = _fast(comp)
    assert fwd["params"]["ref"]["uri"] == "file:///{x}"
    comp2 = orjson.dumps({"jsonrpc": "2.0", "id": 3, "method": "completion/complete",
                          "params": {"ref": {"type": "ref/prompt", "name": "files__p"}}})
    assert _fast(comp2)[1]["params"]["ref"]["name"] == "p"
    bad = orjson.dumps({"jsonrpc": "2.0", "id": 3, "method": "completion/complete",
                        "params": {"ref": {"type": "ref/other"}}})
    with pytest.raises(InvalidRequest):
        resolve(parse_message(bad), bad, ALL)
    with pytest.raises(UnknownTarget):
        uri = orjson.dumps({"jsonrpc": "2.0", "id": 2, "method": "resources/read",
                            "params": {"uri": "file:///etc/passwd"}})
        resolve(parse_message(uri), uri, ALL)


@pytest.mark.parametrize(("rid", "upstream"), [("files__s:abc", "abc"), ("files__n:3", 3),
                                               ("database__s:", "")])
def test_answer_to_a_server_request_goes_back_with_its_id(rid: str, upstream: str | int) -> None:
    """The client's answer to ``files__s:abc`` goes to files with the id "abc" (type kept)."""
    body = orjson.dumps({"jsonrpc": "2.0", "id": rid, "result": {"action": "accept"}})
    route, fwd = _fast(body)
    assert route.server == rid.split("__")[0] and fwd["id"] == upstream
    assert type(fwd["id"]) is type(upstream) and route.target is None and route.id_json is None


@pytest.mark.parametrize("body", [
    {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}},
    {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
    {"jsonrpc": "2.0", "id": 1, "method": "ping"},
    {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}},
    {"jsonrpc": "2.0", "id": "x", "result": {}},  # not an id the fast path gave out
    {"jsonrpc": "2.0", "id": 5, "result": {}},
])
def test_everything_else_goes_to_the_aggregator(body: dict[str, Any]) -> None:
    """initialize, lists, ping, notifications and foreign answers take the aggregator."""
    raw = orjson.dumps(body)
    assert isinstance(resolve(parse_message(raw), raw, ALL), ToAggregator)
    assert isinstance(resolve(None, b"", ALL), ToAggregator)


def test_too_many_decoys_are_refused() -> None:
    """Past MAX_REWRITE_CANDIDATES occurrences before the name, the body is refused."""
    args = {f"k{i}": "files__read_file" for i in range(MAX_REWRITE_CANDIDATES)}
    body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                         "params": {"arguments": args, "name": "files__read_file"}})
    with pytest.raises(NotPlainName):
        resolve(parse_message(body), body, ALL)


def test_find_rewrite_checks_the_whole_result() -> None:
    """A rewrite whose result differs anywhere else from the expected message is not taken."""
    body = b'{"a":"x","b":"x"}'
    rewrite = find_rewrite(body, "x", "y", {"a": "x", "b": "y"})
    assert rewrite.apply(body) == b'{"a":"x","b":"y"}'
    with pytest.raises(NotPlainName):
        find_rewrite(body, "x", "y", {"a": "y", "b": "y"})


@pytest.mark.parametrize("char", [chr(c) for c in range(128)])
def test_any_ascii_name_written_by_either_encoder_is_found(char: str) -> None:
    """Whichever of the usual encoders wrote an ASCII name (controls and DEL escaped or not),
    the rewrite finds it."""
    name = f"files__a{char}b"
    doc = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name}}
    for body in (orjson.dumps(doc), json.dumps(doc).encode()):
        route, forwarded = _fast(body)
        assert forwarded["params"]["name"] == f"a{char}b"
