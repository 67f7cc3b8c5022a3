"""Exposed names, URIs and request ids on the aggregate endpoint split back exactly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.aggregate.naming import (
    decode_request_id,
    encode_request_id,
    join,
    prefix_uri,
    split,
    split_uri,
)

SERVERS = ("files", "db", "files-2")
servers = st.sampled_from(SERVERS)
names = st.text(min_size=1, max_size=40)


@given(servers, names)
def test_join_split_round_trip(server: str, name: str) -> None:
    """Whatever the name holds (``__`` included), split undoes join."""
    assert split(join(server, name), SERVERS) == (server, name)


def test_name_with_separator_after_prefix() -> None:
    """Only the first ``__`` ends the server name."""
    assert split("files__read__file", SERVERS) == ("files", "read__file")
    assert split("files____x", SERVERS) == ("files", "__x")


@pytest.mark.parametrize("exposed", [
    "nosuch__tool", "files", "files__", "__files", "read_file", "Files__read", "files_read",
    "files-__x",
])
def test_split_refuses_unknown_or_empty(exposed: str) -> None:
    """A prefix that is not a server, or no name after it, does not split."""
    assert split(exposed, SERVERS) is None


@given(servers, st.text(min_size=1, max_size=60))
def test_uri_round_trip(server: str, uri: str) -> None:
    """URIs with ``+`` in them (``git+ssh://``) round-trip: the first ``+`` ends the server."""
    assert split_uri(prefix_uri(server, uri), SERVERS) == (server, uri)


def test_uri_examples() -> None:
    """The exposed URI keeps a valid scheme and a ``+`` inside the URI stays in the URI."""
    assert prefix_uri("files", "file:///a+b") == "files+file:///a+b"
    assert split_uri("files+git+ssh://h/r", SERVERS) == ("files", "git+ssh://h/r")
    assert split_uri("nosuch+file:///a", SERVERS) is None
    assert split_uri("file:///a", SERVERS) is None
    assert split_uri("files+", SERVERS) is None


@given(servers, st.one_of(st.integers(), st.text(max_size=40)))
def test_request_id_round_trip(server: str, rid: str | int) -> None:
    """Integer and string ids keep their JSON type."""
    decoded = decode_request_id(encode_request_id(server, rid), SERVERS)
    assert decoded == (server, rid)
    assert decoded is not None and type(decoded[1]) is type(rid)


def test_request_id_examples() -> None:
    """The documented spellings."""
    assert encode_request_id("files", 3) == "files__n:3"
    assert encode_request_id("files", "abc") == "files__s:abc"
    assert encode_request_id("files", "3") == "files__s:3"
    assert decode_request_id("files__s:abc", SERVERS) == ("files", "abc")
    assert decode_request_id("files__n:-7", SERVERS) == ("files", -7)
    assert decode_request_id("files__s:", SERVERS) == ("files", "")


@pytest.mark.parametrize("value", [
    "files__n:03", "files__n:+3", "files__n:", "files__n:3.0", "files__n:1e3", "files__n:-0x1",
    "files__n:" + "9" * 65, "files__x:3", "files__3", "nosuch__n:3", "files__n:\u0663", "abc",
])
def test_decode_refuses_non_canonical(value: str) -> None:
    """Only what encode produces decodes, so one upstream id has one spelling."""
    assert decode_request_id(value, SERVERS) is None


@pytest.mark.parametrize("rid", [True, 1.5, None, [1]])
def test_encode_refuses_other_types(rid: object) -> None:
    """A request id is a string or an integer (a bool is neither, in JSON)."""
    with pytest.raises(TypeError):
        encode_request_id("files", rid)  # type: ignore[arg-type]  # deliberately wrong type
