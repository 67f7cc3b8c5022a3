"""Merged lists: what each server's page becomes on an aggregate endpoint.

Names are prefixed (``<server>__<name>``), URIs and URI templates too (``<server>+<uri>``); every
other field of an entry is kept as the server sent it (title, outputSchema, annotations, icons,
_meta). A virtual server's view keeps the tools its patterns select and the prompts and resources
of its servers.

Pagination: one upstream page per server per client page, walked in the view's server order. A
client page asks the server the cursor names for its next page and every later server for its
first page, all at once; it ends with the first server that has more, and the sealed cursor names
that server and its upstream cursor. When every server fits in one page (the common case), the
first client page is the whole list from a single fan-out.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.aggregate.cursor import ListCursor
from gateway.aggregate.naming import join, prefix_uri
from gateway.aggregate.views import View

logger = logging.getLogger(__name__)

UNAVAILABLE_META = "io.mcp-gateway/unavailable"


@dataclass(frozen=True, slots=True)
class ListKind:
    method: str
    key: str  # the result's array
    field: str  # the entry's field that is prefixed
    is_uri: bool


LIST_KINDS: dict[str, ListKind] = {
    "tools/list": ListKind("tools/list", "tools", "name", False),
    "prompts/list": ListKind("prompts/list", "prompts", "name", False),
    "resources/list": ListKind("resources/list", "resources", "uri", True),
    "resources/templates/list": ListKind("resources/templates/list", "resourceTemplates", "uriTemplate",
                                         True),
}


def in_view(kind: ListKind, view: View, server: str, entry: Mapping[str, Any]) -> bool:
    if kind.method == "tools/list":
        name = entry.get("name")
        return isinstance(name, str) and view.allows(server, name)
    return view.allows_server(server)


def expose(kind: ListKind, server: str, entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """The entry as the aggregate endpoint lists it; None for an entry without its name/URI."""
    value = entry.get(kind.field)
    if not isinstance(value, str) or not value:
        logger.warning("dropped a %s entry of %s without a %s", kind.key, server, kind.field)
        return None
    out = dict(entry)
    out[kind.field] = prefix_uri(server, value) if kind.is_uri else join(server, value)
    return out


@dataclass(frozen=True, slots=True)
class Leg:
    """One upstream page to fetch: the server, its index in the view and its cursor."""

    index: int
    server: str
    cursor: str | None


def plan(view: View, start: ListCursor | None) -> list[Leg]:
    """The legs of one client page: the cursor's server at its cursor, then every later server's
    first page."""
    first = 0 if start is None else start.server
    legs = []
    for index in range(first, len(view.servers)):
        cursor = start.upstream if start is not None and index == start.server else None
        legs.append(Leg(index, view.servers[index], cursor))
    return legs


def assemble(kind: ListKind, view: View, legs: list[Leg], pages: Mapping[str, Mapping[str, Any]],
             *, owner: str) -> tuple[list[dict[str, Any]], ListCursor | None]:
    """The client page from the upstream pages (servers absent from ``pages`` were left out),
    and the cursor of the next page (None: this was the last)."""
    entries: list[dict[str, Any]] = []
    for leg in legs:
        page = pages.get(leg.server)
        if page is None:
            continue
        items = page.get(kind.key)
        for entry in items if isinstance(items, list) else []:
            if isinstance(entry, dict) and in_view(kind, view, leg.server, entry):
                exposed = expose(kind, leg.server, entry)
                if exposed is not None:
                    entries.append(exposed)
        following = page.get("nextCursor")
        if isinstance(following, str) and following:
            return entries, ListCursor(method=kind.method, view=view.name, owner=owner,
                                       server=leg.index, upstream=following)
    return entries, None


def union_capabilities(answers: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The capabilities of several servers as one: a capability any server has, with each flag
    true when any server sets it."""
    out: dict[str, Any] = {}
    for caps in answers:
        for name, value in caps.items():
            if not isinstance(value, dict):
                continue
            merged = out.setdefault(name, {})
            for flag, setting in value.items():
                if isinstance(setting, bool):
                    merged[flag] = merged.get(flag, False) or setting
                elif flag not in merged:
                    merged[flag] = setting
    return out
