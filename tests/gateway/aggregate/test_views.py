"""Views decide which tools an aggregate endpoint exposes; the config builds them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.aggregate.views import (
    AGGREGATE_VIEW,
    View,
    aggregate_view,
    view_of_path,
    views_from_config,
    virtual_view,
)

SERVERS = ("files", "db", "time")


def test_aggregate_view_allows_every_tool_of_every_server() -> None:
    """``/mcp`` exposes everything, including tool names with ``/`` or ``__``."""
    view = aggregate_view(SERVERS)
    assert view.path() == "/mcp" and view.via == "aggregate" and view.is_aggregate
    assert view.allows("files", "read_file") and view.allows("db", "a/b__c")
    assert not view.allows("nosuch", "read_file")


def test_virtual_view_selects_by_server_and_glob() -> None:
    """``files/read_*`` selects files' read tools only; servers are those patterns name."""
    view = virtual_view("ops", ["files/read_*", "db/list_tables"], SERVERS)
    assert view.path() == "/mcp/ops" and view.via == "virtual:ops" and not view.is_aggregate
    assert view.servers == ("files", "db")
    assert view.allows("files", "read_file") and view.allows("files", "read_multiple")
    assert not view.allows("files", "write_file")
    assert view.allows("db", "list_tables") and not view.allows("db", "list_tables2")
    assert not view.allows("time", "get_current_time")
    assert not view.allows("db", "read_x")  # a pattern applies to its own server only


def test_glob_is_case_sensitive_and_whole_name() -> None:
    """A glob matches the whole tool name, case-sensitively."""
    view = virtual_view("v", ["files/read"], SERVERS)
    assert view.allows("files", "read")
    assert not view.allows("files", "Read") and not view.allows("files", "read_file")
    assert not view.allows("files", "xread")


def test_server_glob() -> None:
    """The server part may be a glob too."""
    view = virtual_view("v", ["*/list_*"], SERVERS)
    assert view.servers == SERVERS
    assert view.allows("time", "list_zones") and not view.allows("time", "get")


@dataclass(frozen=True)
class _Server:
    name: str


@dataclass(frozen=True)
class _Virtual:
    name: str
    tools: tuple[str, ...]
    description: str = ""


@dataclass(frozen=True)
class _Aggregate:
    enabled: bool = True


@dataclass(frozen=True)
class _Config:
    servers: tuple[_Server, ...]
    virtual_servers: tuple[_Virtual, ...] = ()
    aggregate: _Aggregate = field(default_factory=_Aggregate)


def test_views_from_config() -> None:
    """One view for ``/mcp`` plus one per virtual server, found by path."""
    cfg: Any = _Config(tuple(_Server(s) for s in SERVERS), (_Virtual("ops", ("files/read_*",)),))
    views = views_from_config(cfg)
    assert set(views) == {AGGREGATE_VIEW, "ops"}
    assert views[AGGREGATE_VIEW].servers == SERVERS
    assert view_of_path(views, "/mcp") is views[AGGREGATE_VIEW]
    assert view_of_path(views, "/mcp/ops") is views["ops"]
    for path in ("/mcp/", "/mcp/files", "/mcp/ops/x", "/mcpx", "/other"):
        assert view_of_path(views, path) is None


def test_views_off_when_aggregate_disabled() -> None:
    """``aggregate.enabled: false`` serves no view at all."""
    cfg: Any = _Config((_Server("files"),), aggregate=_Aggregate(enabled=False))
    assert views_from_config(cfg) == {}


def test_views_from_the_default_config() -> None:
    """The shipped config serves ``/mcp`` over every server."""
    from pathlib import Path

    from gateway.config import load_config
    cfg = load_config(Path(__file__).resolve().parents[3] / "gateway" / "default_config.yaml")
    views = views_from_config(cfg)
    assert views[AGGREGATE_VIEW].servers == tuple(s.name for s in cfg.servers)


@pytest.mark.parametrize("name", ["", "ops"])
def test_view_is_hashable_value(name: str) -> None:
    """Views compare by value."""
    assert View(name, ("a",), ("a/*",)) == View(name, ("a",), ("a/*",))
