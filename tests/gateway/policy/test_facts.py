"""gateway.policy.facts: what the gateway tells the policy about paths, mirrored by the Rego."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.policy.facts import PATH_ARGUMENT_NAMES, mcp_facts, path_facts, uri_path, with_facts

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
    ("file:///shared/a.txt", "shared/a.txt"), ("file://shared/a", "shared/a"),
    ("s3+x.y-z://bucket/k", "bucket/k"), ("file:///", ""),
    ("FILE:///shared/a", "/"), ("ftp:/bad", "/"), ("shared/a", "/"), ("", "/"),
    ("1file:///a", "/"), (None, "/"), (5, "/"),
])
def test_uri_path(uri: Any, path: str) -> None:
    """A lower-case scheme and '://' are cut off with leading slashes; anything else is '/'."""
    assert uri_path(uri) == path


def test_mcp_facts_cover_path_arguments_in_order() -> None:
    """Every path-named argument gets facts, non-strings included; other arguments get none."""
    mcp = {"arguments": {"content": "x", "target": 3, "path": "shared/a", "sql": "select 1"},
           "resource_uri": None}
    assert mcp_facts(mcp) == {"arguments": [MALFORMED, path_facts("shared/a")]}
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
                max_size=6), st.booleans())
def test_facts_agree_with_segment_prefix_definition(segments: list[str], absolute: bool) -> None:
    """Well formed iff no '..'/backslash/leading '/'; then prefix q of n holds iff n == q or n
    starts with q + '/' (the check the Rego made before facts), for every candidate q."""
    path = ("/" if absolute else "") + "/".join(segments)
    facts = path_facts(path)
    expect_ok = not path.startswith("/") and "\\" not in path and ".." not in path.split("/")
    assert facts["well_formed"] is expect_ok
    if not expect_ok:
        return
    n = "/".join(s for s in path.split("/") if s not in ("", "."))
    candidates = {"", "a", "b", "a/b", "tenants", "tenants/a", n, n + "/a", "a/", "."}
    for q in candidates:
        under = q == "" or n == q or n.startswith(q + "/")
        assert (q in facts["prefixes"]) is under, q
