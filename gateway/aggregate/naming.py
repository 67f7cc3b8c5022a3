"""Names on the aggregate endpoint: ``<server>__<name>`` for tools and prompts, ``<server>+<uri>``
for resources, ``<server>__n:<int>`` / ``<server>__s:<str>`` for the ids of server-to-client
requests.

Server names match ``[a-z][a-z0-9-]*`` (no ``__``, no ``+``), so the first separator always ends
the server name and every split is unambiguous, whatever the tool name or URI holds after it. A
prefix that is not a configured server is not split: the caller answers "unknown" naming the whole
exposed name.
"""

from __future__ import annotations

import re
from collections.abc import Collection

SEP = "__"
URI_SEP = "+"
_INT_ID = "n:"
_STR_ID = "s:"
# The canonical spelling of a JSON integer, so decode(encode(x)) == x and encode(decode(v)) == v;
# bounded well inside int()'s digit limit (a client's id never costs a long conversion).
_CANONICAL_INT = re.compile(r"-?(?:0|[1-9][0-9]{0,63})")


def join(server: str, name: str) -> str:
    """The exposed name of ``name`` on ``server``."""
    return f"{server}{SEP}{name}"


def split(exposed: str, servers: Collection[str]) -> tuple[str, str] | None:
    """(server, name) of an exposed name; None unless the prefix is one of ``servers`` and a
    non-empty name follows. The name may itself contain ``__``."""
    server, sep, name = exposed.partition(SEP)
    if not sep or not name or server not in servers:
        return None
    return server, name


def prefix_uri(server: str, uri: str) -> str:
    """The exposed URI of ``uri`` on ``server`` (``files+file:///a``: still a valid URI whose
    scheme is ``files+file``)."""
    return f"{server}{URI_SEP}{uri}"


def split_uri(uri: str, servers: Collection[str]) -> tuple[str, str] | None:
    """(server, upstream URI) of an exposed URI; None unless the prefix is one of ``servers``
    and a non-empty URI follows."""
    server, sep, rest = uri.partition(URI_SEP)
    if not sep or not rest or server not in servers:
        return None
    return server, rest


def encode_request_id(server: str, rid: str | int) -> str:
    """The id a server-to-client request of ``server`` carries on the aggregate endpoint: the
    JSON type of the upstream id is kept (``files__n:3`` is the number 3, ``files__s:3`` the
    string "3")."""
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise TypeError(f"a JSON-RPC request id is a string or an integer, not {type(rid).__name__}")
    kind = _INT_ID if isinstance(rid, int) else _STR_ID
    return f"{server}{SEP}{kind}{rid}"


def decode_request_id(value: str, servers: Collection[str]) -> tuple[str, str | int] | None:
    """(server, upstream id) of an id made by :func:`encode_request_id`; None for anything else
    (not a server's prefix, no type tag, a number not in canonical form)."""
    parts = split(value, servers)
    if parts is None:
        return None
    server, tagged = parts
    if tagged.startswith(_STR_ID):
        return server, tagged[len(_STR_ID):]
    if tagged.startswith(_INT_ID):
        digits = tagged[len(_INT_ID):]
        if _CANONICAL_INT.fullmatch(digits) is None:
            return None
        return server, int(digits)
    return None
