"""gateway.policy.facts: what the gateway tells the policy about paths, mirrored by the Rego."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import GatewayError, InputLimitExceeded
from gateway.paths import MAX_PATH_CHARS, MAX_PATH_SEGMENTS, MAX_URI_CHARS, file_uri, file_uri_path
from gateway.policy.facts import (
    MAX_PREFIX_DEPTH,
    PATH_ARGUMENT_NAMES,
    mcp_facts,
    path_facts,
    resource_facts,
    with_facts,
)

MALFORMED = {"well_formed": False}


def test_relative_path_prefixes_are_segment_wise() -> None:
    """A well-formed path lists the root and each leading run of its normalized segments."""
    assert path_facts("shared/reports/q3.txt") == {
        "well_formed": True, "prefixes": ["", "shared", "shared/reports", "shared/reports/q3.txt"]}


@pytest.mark.parametrize("path,prefixes", [
    ("", [""]), (".", [""]), ("./", [""]), ("././/", [""]),
    ("./shared//a/./b/", ["", "shared", "shared/a", "shared/a/b"]),
    ("shared-secrets/a", ["", "shared-secrets", "shared-secrets/a"]),
])
def test_normalization_drops_empty_and_dot_segments(path: str, prefixes: list[str]) -> None:
    """'', '.' and repeated slashes name the root or disappear, as normalize_path in the Rego."""
    assert path_facts(path) == {"well_formed": True, "prefixes": prefixes}


@pytest.mark.parametrize("path", [
    "/etc/passwd", "/", "..", "shared/../secret", "shared/a/../../b", "a/..", "../a",
    "shared\\a", "shared\\..\\x", "\\", "shared/\\u002e\\u002e/x",
    "shared/\ud800", "\udc00/x",
    None, 42, 1.5, True, ["shared"], {"path": "shared"},
])
def test_hostile_paths_are_malformed(path: Any) -> None:
    """Absolute paths, '..' segments, backslashes and non-strings are never well formed."""
    assert path_facts(path) == MALFORMED


@pytest.mark.parametrize("path", ["...", "a/.../b", "..a", "a..", "shared/..hidden"])
def test_dots_inside_a_segment_are_a_name(path: str) -> None:
    """Only a whole '..' segment is traversal; '...' or '..a' are ordinary names."""
    assert path_facts(path)["well_formed"] is True


@pytest.mark.parametrize("path,tenant", [
    ("tenants/acme/reports/a.csv", "acme"), ("tenants/globex", "globex"), ("tenants", ""),
    ("./tenants//acme", "acme"), ("tenants/{tenant}/x", "{tenant}"),
])
def test_tenant_segment_of_tenant_paths(path: str, tenant: str) -> None:
    """A path under tenants/ names its tenant ('' when it names the tenants folder itself)."""
    assert path_facts(path)["tenant"] == tenant


@pytest.mark.parametrize("path", ["shared/tenants/acme", "tenantsx/acme", "Tenants/acme", ""])
def test_other_paths_name_no_tenant(path: str) -> None:
    """Only a first segment spelled exactly 'tenants' marks a tenant path."""
    assert "tenant" not in path_facts(path)


@pytest.mark.parametrize("uri,path", [
    ("file:///shared/a.txt", "shared/a.txt"), ("file:///", ""), ("file:///a%20b/c.txt", "a b/c.txt"),
    ("file:///caf%C3%A9", "caf\u00e9"), ("file:///~x", "~x"),
    ("file:///tenants/acme/r", "tenants/acme/r"),
])
def test_canonical_file_uris_name_their_path(uri: str, path: str) -> None:
    """A URI spelled as file_uri() writes it names that path, and file_uri() gives it back."""
    assert file_uri_path(uri) == path
    assert file_uri(path) == uri


# Every other spelling of a path, above all of tenants/globex (finding 3 of issue 13).
NON_CANONICAL_URIS = [
    "file:///%74enants/globex/x", "file:///tenants%2Fglobex/x", "file:///tenants%2fglobex/x",
    "file:///%2e%2e/tenants/globex", "file:///shared/%2e%2e/tenants/globex", "file:///shared/%2E%2E/x",
    "file:///%252e%252e/x", "file:///%252e", "file:///%2574enants/globex", "file:///shared/%00/x",
    "file:///shared%5C..%5Ctenants", "file:///a%5cb",
    "file:///%c0%ae%c0%ae/x", "file:///%C0%AE%C0%AE/x", "file:///%ff", "file:///%ed%a0%80", "file:///%e2%82",
    "FILE:///tenants/globex/x", "File:///shared/a", "file:/tenants/globex/x", "file:tenants/globex",
    "file://localhost/tenants/globex/x", "file://tenants/globex/x", "file:////tenants/globex/x",
    "file:///shared/a?x=tenants/globex", "file:///shared/a#../../tenants/globex", "file:///shared\\..\\x",
    "file:///caf\u00e9", "file:///tenants/glob\u0435x", "file:///caf%c3%a9", "file:///%7Ex", "file:///%41",
    "file:///shared//a", "file:///shared/", "file:///./shared", "file:///shared/./a", "file:///shared/../x",
    "file:///..", "file:///%", "file:///%2", "file:///%zz", "file:///a b", "db://schema/x",
    "s3://bucket/k", "shared/a", "", "file://",
]


@pytest.mark.parametrize("uri", NON_CANONICAL_URIS)
def test_every_other_spelling_is_no_path(uri: str) -> None:
    """Encoded letters or slashes, dot segments, bad UTF-8, hosts, queries, other schemes: no path."""
    assert file_uri_path(uri) is None
    assert resource_facts(uri) == MALFORMED


@given(st.text(max_size=40))
def test_file_uri_round_trips(path: str) -> None:
    """For any path, file_uri_path(file_uri(p)) is p exactly when p is a normalized path."""
    try:
        uri = file_uri(path)
    except UnicodeEncodeError:
        return  # a lone surrogate has no URI
    normalized = (path == "" or all(s not in ("", ".", "..") for s in path.split("/"))) \
        and not {"\x00", "\\", "%"} & set(path)
    assert file_uri_path(uri) == (path if normalized else None)


@given(st.text(alphabet="%0123456789abcdefABCDEF/.tenaglobx\\?#:", max_size=30))
def test_a_uri_names_at_most_one_path(tail: str) -> None:
    """Whatever the escapes, a URI that names a path is that path's one canonical spelling."""
    path = file_uri_path("file:///" + tail)
    if path is not None:
        assert file_uri(path) == "file:///" + tail


def test_resource_facts_decode_before_judging() -> None:
    """Canonical escapes are decoded first: the facts are those of the path the server opens."""
    assert resource_facts("file:///tenants/glo%20bex/x")["tenant"] == "glo bex"
    assert resource_facts("file:///tenants/acme/r%C3%A9") == path_facts("tenants/acme/r\u00e9")


def test_mcp_facts_cover_path_arguments_in_order() -> None:
    """Every path-named argument gets facts, non-strings included; other arguments get none."""
    mcp = {"arguments": {"content": "x", "target": 3, "path": "shared/a", "sql": "select 1"},
           "resource_uri": None}
    assert mcp_facts(mcp)["arguments"] == [MALFORMED, path_facts("shared/a")]
    assert set(PATH_ARGUMENT_NAMES) == {"path", "root", "directory", "source", "destination", "target"}


def test_mcp_facts_for_resources_and_empty_messages() -> None:
    """resource_uri gets facts of its path; a message without paths gets no facts at all."""
    assert mcp_facts({"resource_uri": "file:///tenants/acme/x", "arguments": {}}) == {
        "resource": {"well_formed": True, "prefixes": ["", "tenants", "tenants/acme", "tenants/acme/x"],
                     "tenant": "acme"}}
    assert mcp_facts({"resource_uri": 7}) == {"resource": MALFORMED}
    assert mcp_facts({"arguments": "not an object", "resource_uri": None}) == {}
    mcp: dict[str, Any] = {"arguments": {"content": "x"}, "resource_uri": None}
    assert "facts" not in with_facts(mcp)


def test_with_facts_adds_facts_in_place() -> None:
    """with_facts stores the facts under mcp.facts of the dict it was given."""
    mcp: dict[str, Any] = {"arguments": {"path": "a"}}
    assert with_facts(mcp) is mcp and mcp["facts"] == {"arguments": [path_facts("a")]}


@given(st.lists(st.sampled_from(["a", "b", ".", "..", "", "tenants", "x\\y", "{tenant}"]),
                max_size=12), st.booleans())
def test_facts_agree_with_segment_prefix_definition(segments: list[str], absolute: bool) -> None:
    """Well formed iff no '..'/backslash/leading '/'; then prefix q (of at most MAX_PREFIX_DEPTH
    segments) of n holds iff n == q or n starts with q + '/', for every candidate q."""
    path = ("/" if absolute else "") + "/".join(segments)
    facts = path_facts(path)
    expect_ok = not path.startswith("/") and "\\" not in path and ".." not in path.split("/")
    assert facts["well_formed"] is expect_ok
    if not expect_ok:
        return
    n = "/".join(s for s in path.split("/") if s not in ("", "."))
    candidates = {"", "a", "b", "a/b", "tenants", "tenants/a", n, n + "/a", "a/", ".", "a/a/a/a/a/a/a/a",
                  "a/a/a/a/a/a/a/a/a"}
    for q in candidates:
        under = q == "" or n == q or n.startswith(q + "/")
        shallow = q == "" or q.count("/") < MAX_PREFIX_DEPTH
        assert (q in facts["prefixes"]) is (under and shallow), q


# ---------------------------------------------------------------- bounds (finding 2 of issue 13)

def _limit(exc: pytest.ExceptionInfo[InputLimitExceeded]) -> str:
    err = exc.value.to_rpc_error()
    assert err["code"] == -32602 and err["data"]["reason"] == "input_limit_exceeded"
    limit: str = err["data"]["limit"]
    return limit


@pytest.mark.parametrize("path,limit", [
    ("a" * (MAX_PATH_CHARS + 1), "path_length"),
    ("shared/" + "a/" * 10_000, "path_length"),
    ("/" * (MAX_PATH_CHARS + 1), "path_length"),
    ("a/" * MAX_PATH_SEGMENTS, "path_depth"),
    ("/" * MAX_PATH_SEGMENTS, "path_depth"),
    ("./" * MAX_PATH_SEGMENTS, "path_depth"),
    ("../" * MAX_PATH_SEGMENTS, "path_depth"),
])
def test_paths_over_a_bound_are_refused_naming_it(path: str, limit: str) -> None:
    """Too long or too deep (however spelled, malformed too) raises InputLimitExceeded naming the bound."""
    with pytest.raises(InputLimitExceeded) as exc:
        mcp_facts({"arguments": {"path": "shared", "target": path}})
    assert _limit(exc) == limit


@pytest.mark.parametrize("path", ["shared/\x00", "shared/a\x00/../b", "\x00", "/\x00"])
def test_nul_in_a_path_argument_is_a_clear_400(path: str) -> None:
    """The policy engine cannot take a NUL: the gateway refuses it as invalid_path (400, -32602)."""
    with pytest.raises(GatewayError) as exc:
        mcp_facts({"arguments": {"path": path}})
    assert exc.value.http_status == 400 and exc.value.to_rpc_error()["data"]["reason"] == "invalid_path"
    assert exc.value.rpc_code == -32602


def test_paths_at_the_bounds_are_judged() -> None:
    """A path of exactly MAX_PATH_CHARS characters or MAX_PATH_SEGMENTS segments still gets facts."""
    assert path_facts("a" * MAX_PATH_CHARS)["well_formed"] is True
    deep = "/".join(["a"] * MAX_PATH_SEGMENTS)
    assert path_facts(deep)["prefixes"][-1] == "/".join(["a"] * MAX_PREFIX_DEPTH)


@pytest.mark.parametrize("uri,limit", [
    ("file:///" + "a" * MAX_URI_CHARS, "resource_uri_length"),
    ("x" * (MAX_URI_CHARS + 1), "resource_uri_length"),
    ("file:///" + "a%20" * (MAX_PATH_CHARS // 2 + 1), "path_length"),
    ("file:///" + "a/" * MAX_PATH_SEGMENTS + "a", "path_depth"),
])
def test_resource_uris_over_a_bound_are_refused_naming_it(uri: str, limit: str) -> None:
    """A resource URI too long, or naming a path too long or deep, raises InputLimitExceeded."""
    with pytest.raises(InputLimitExceeded) as exc:
        mcp_facts({"resource_uri": uri})
    assert _limit(exc) == limit


@pytest.mark.parametrize("segment", ["a", "abcdefghijklmnop", "x" * 500])
def test_facts_stay_linear_in_the_path(segment: str) -> None:
    """The facts of a path within the bounds hold at most MAX_PREFIX_DEPTH + 1 prefixes, so their
    size is at most that many times the path's (it was quadratic: 100 MB for 20 KB)."""
    count = min(MAX_PATH_SEGMENTS, MAX_PATH_CHARS // (len(segment) + 1))
    path = "/".join([segment] * count)
    facts = path_facts(path)
    assert len(facts["prefixes"]) == min(count, MAX_PREFIX_DEPTH) + 1
    assert len(json.dumps(facts)) <= (MAX_PREFIX_DEPTH + 1) * (len(path) + 8)


def test_data_json_prefixes_are_within_the_prefix_depth() -> None:
    """Every files prefix in policies/data.json is at most MAX_PREFIX_DEPTH segments deep (deeper
    ones could never match the facts), and the Rego's max_prefix_depth is the same number."""
    root = Path(__file__).resolve().parents[3] / "policies"
    data = json.loads((root / "data.json").read_text())
    for role, spec in data["gateway"]["roles"].items():
        for access, prefixes in spec.get("files", {}).items():
            for prefix in prefixes:
                depth = len([s for s in prefix.split("/") if s])
                assert depth <= MAX_PREFIX_DEPTH, (role, access, prefix)
    rego = (root / "authz.rego").read_text()
    assert f"max_prefix_depth := {MAX_PREFIX_DEPTH}\n" in rego
    assert f"max_path_chars := {MAX_PATH_CHARS}\n" in rego
    assert f"max_path_segments := {MAX_PATH_SEGMENTS}\n" in rego


def test_too_many_path_arguments_cannot_occur() -> None:
    """Each path name counts once (JSON objects have unique keys): six at most, all judged."""
    facts = mcp_facts({"arguments": {n: "shared" for n in PATH_ARGUMENT_NAMES}})
    assert len(facts["arguments"]) == len(PATH_ARGUMENT_NAMES)
