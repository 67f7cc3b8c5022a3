"""Views: what one aggregate endpoint exposes.

``/mcp`` shows every configured server in full. A virtual server ``/mcp/<name>`` shows the tools
its ``tools`` patterns select (``"files/read_*"``: a server name, a slash, a glob over that
server's tool names) and the prompts and resources of the servers those patterns name. Both
ext_authz (a call outside the view is an unknown tool) and the aggregator (lists drop what is
outside it) apply the same :class:`View`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import translate
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

AGGREGATE_PATH = "/mcp"
# The name of the view served at AGGREGATE_PATH; a virtual server's name is never empty.
AGGREGATE_VIEW = ""
_ALL = "*"


@dataclass(frozen=True, slots=True)
class View:
    """``name`` is AGGREGATE_VIEW for ``/mcp``; ``servers`` in configuration order;
    ``patterns`` are ``"<server-glob>/<tool-glob>"``."""

    name: str
    servers: tuple[str, ...]
    patterns: tuple[str, ...]

    @property
    def is_aggregate(self) -> bool:
        return self.name == AGGREGATE_VIEW

    @property
    def via(self) -> str:
        """How a request reached a server through this view (``input.mcp.via`` of the policy)."""
        return "aggregate" if self.is_aggregate else f"virtual:{self.name}"

    def path(self) -> str:
        return AGGREGATE_PATH if self.is_aggregate else f"{AGGREGATE_PATH}/{self.name}"

    def allows_server(self, server: str) -> bool:
        return server in self.servers

    def allows(self, server: str, tool: str) -> bool:
        """Whether the tool ``tool`` of ``server`` is part of this view."""
        if server not in self.servers:
            return False
        return any(_matches(pattern, server, tool) for pattern in self.patterns)


def aggregate_view(servers: Iterable[str]) -> View:
    return View(AGGREGATE_VIEW, tuple(servers), (f"{_ALL}/{_ALL}",))


def virtual_view(name: str, patterns: Iterable[str], servers: Iterable[str]) -> View:
    """The view of a virtual server: ``servers`` (the configured ones, in order) narrowed to
    those a pattern names."""
    patterns = tuple(patterns)
    named = tuple(s for s in servers if any(_server_part(p, s) for p in patterns))
    return View(name, named, patterns)


def views_from_config(cfg: GatewayConfig) -> dict[str, View]:
    """Every view the configuration serves, by name (AGGREGATE_VIEW for ``/mcp``); none while
    ``aggregate.enabled`` is false."""
    aggregate: Any = getattr(cfg, "aggregate", None)
    if aggregate is not None and not getattr(aggregate, "enabled", True):
        return {}
    servers = tuple(server.name for server in cfg.servers)
    views = {AGGREGATE_VIEW: aggregate_view(servers)}
    for virtual in getattr(cfg, "virtual_servers", ()):
        views[virtual.name] = virtual_view(virtual.name, virtual.tools, servers)
    return views


def view_of_path(views: Mapping[str, View], path: str) -> View | None:
    """The view served at ``path`` (no query string): ``/mcp`` or ``/mcp/<virtual>``."""
    if path == AGGREGATE_PATH:
        return views.get(AGGREGATE_VIEW)
    prefix = AGGREGATE_PATH + "/"
    if not path.startswith(prefix):
        return None
    name = path[len(prefix):]
    if not name or name == AGGREGATE_VIEW:
        return None
    return views.get(name)


def _matches(pattern: str, server: str, tool: str) -> bool:
    server_glob, _, tool_glob = pattern.partition("/")
    return _glob(server_glob).fullmatch(server) is not None \
        and _glob(tool_glob).fullmatch(tool) is not None


def _server_part(pattern: str, server: str) -> bool:
    return _glob(pattern.partition("/")[0]).fullmatch(server) is not None


@functools.lru_cache(maxsize=1024)
def _glob(glob: str) -> re.Pattern[str]:
    # Case-sensitive on every platform (fnmatch.fnmatch folds case on Windows). Tool names may
    # hold "/": "*" matches it, because the server part was split off at the first "/".
    return re.compile(translate(glob), re.DOTALL)
