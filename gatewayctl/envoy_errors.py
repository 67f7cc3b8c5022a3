"""Envoy's refusals of a rendered config, traced back to the template line and the gateway key.

``envoy --mode validate`` names what it refuses in one of a few ways: a protobuf field path
(``Proto constraint validation failed (... ClustersValidationError ...)`` or ``invalid JSON in ...
@ static_resources.clusters[3] ... no such field: 'x'``), the offending value (``Not supported field
in StreamInfo: FOO``), or only the kind of mistake (``Invalid duration``, ``host headers may not be
modified``). Each is turned into lines of the rendered YAML (the field path through the YAML's
node positions, a value by searching the text), and each line into where it came from.

Where a line came from is recorded while rendering: ``Trace`` appends an invisible marker to
every template line as it is read, gives each fill its own copy (so one template filled per server
knows its server), and hands the placeholder line's marker to lines that code inserted into a
block. The markers are stripped afterwards, so the traced rendering is byte for byte the plain one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
_MARK = re.compile(r"\x01(\d+)\x01")
_PLACEHOLDER = re.compile(r"\$\{?(\w+)")
_KEY_PLACEHOLDER = re.compile(r"([A-Za-z_][\w]*)\s*:\s*\$\{?(\w+)")
MAX_MESSAGE_CHARS = 2000
MAX_PLACES = 3


@dataclass(frozen=True, slots=True)
class Origin:
    """Where one rendered line came from."""

    template: Path
    line: int  # 1-based, in the template
    text: str  # the template's line
    block: str | None = None  # inserted by code at ${block} on that line
    server: str | None = None  # the MCP server whose template fill wrote it
    values: tuple[tuple[str, str], ...] = ()  # the line's placeholders and what they were set to


Origins = tuple[Origin | None, ...]  # one per rendered line


# What each placeholder and code-written block of envoy/templates is set from. {server} is the MCP
# server whose cluster or route holds the line.
_UPSTREAM = {
    "connect_timeout": "connect_timeout_ms", "route_timeout": "timeout_seconds",
    "route_idle_timeout": "idle_timeout_seconds", "retries": "retries",
    "max_connections": "max_connections", "max_pending_requests": "max_pending_requests",
    "max_requests": "max_requests", "max_retries": "max_retries",
    "health_timeout": "health_timeout_ms", "server_health_interval": "health_interval_ms",
    "server_health_no_traffic_interval": "health_no_traffic_interval_ms",
    "unhealthy_threshold": "unhealthy_threshold", "healthy_threshold": "healthy_threshold",
    "outlier_consecutive_5xx": "outlier_consecutive_5xx",
    "outlier_consecutive_gateway_failure": "outlier_consecutive_gateway_failure",
    "outlier_interval": "outlier_interval_ms", "outlier_base_ejection": "outlier_base_ejection_ms",
    "outlier_max_ejection_percent": "outlier_max_ejection_percent",
}
_EDGE = {
    "max_heap_bytes": "envoy.max_heap_bytes",
    "max_downstream_connections": "envoy.max_downstream_connections",
    "request_headers_timeout": "envoy.request_headers_timeout_seconds",
    "request_timeout": "envoy.request_timeout_seconds",
    "stream_idle_timeout": "envoy.stream_idle_timeout_seconds",
    "connection_idle_timeout": "envoy.connection_idle_timeout_seconds",
    "http2_max_concurrent_streams": "envoy.http2_max_concurrent_streams",
    "http2_initial_stream_window_bytes": "envoy.http2_initial_stream_window_bytes",
    "http2_initial_connection_window_bytes": "envoy.http2_initial_connection_window_bytes",
    "buffer_limit_bytes": "envoy.per_connection_buffer_bytes",
    "listen_host": "listen.host", "listen_port": "listen.port",
    "admin_host": "admin.host", "admin_port": "admin.port",
    "cert_file": "tls.cert_file", "key_file": "tls.key_file", "tls_min_version": "tls.min_version",
    "ext_authz_timeout": "ext_authz.timeout_ms", "ext_proc_timeout": "ext_proc.timeout_ms",
    "edge_rate": "rate_limits.edge.rate_per_second", "edge_burst": "rate_limits.edge.burst",
    "trace_sample_percent": "telemetry.trace_sample_percent",
    "stats_port": "telemetry.envoy_stats_port",
    "inner_host": "aggregate.inner_listener", "inner_port": "aggregate.inner_listener",
}
_BLOCKS = {
    "response_headers": "envoy.response_headers", "access_log_path": "envoy.access_log_path",
    "client_validation": "tls.client_ca_file",
    "upstream_headers": "servers.{server}.headers", "host_rewrite": "servers.{server}.host_header",
    "endpoint_extra": "servers.{server}.host_header", "transport_socket": "servers.{server}.tls",
    "health_check": "servers.{server}.health",
}


def placeholder_key(name: str, server: str | None) -> str | None:
    """The gateway key a template placeholder is set from (None: none, or not a key)."""
    if name in _UPSTREAM:
        field = _UPSTREAM[name]
        every = f"envoy.upstream.{field}"
        return f"servers.{server}.envoy.{field} (or {every} for every server)" if server else every
    if name in ("host", "port") and server:
        return f"servers.{server} (its instances)"
    return _EDGE.get(name)


class Trace:
    """Records where each line of one rendering comes from (see the module docstring)."""

    def __init__(self) -> None:
        self._records: list[Origin] = []

    def _mark(self, origin: Origin) -> str:
        self._records.append(origin)
        return f"\x01{len(self._records) - 1}\x01"

    def _origin(self, mark: str) -> Origin:
        return self._records[int(mark.strip("\x01"))]

    def tag(self, path: Path, text: str) -> str:
        """A template's text with every non-empty line marked with its file and number."""
        return "\n".join(line + self._mark(Origin(path, number, line)) if line else line
                         for number, line in enumerate(text.split("\n"), 1))

    def fork(self, text: str, scalars: dict[str, object]) -> str:
        """One fill's own copy of a template's marks, knowing the server it is filled for."""
        server = scalars.get("name")

        def own(match: re.Match[str]) -> str:
            origin = self._origin(match.group(0))
            values = tuple((name, str(scalars[name])) for name in _PLACEHOLDER.findall(origin.text)
                           if name in scalars)
            return self._mark(replace(origin, server=server if isinstance(server, str) else None,
                                      values=values))

        return _MARK.sub(own, text)

    def adopt(self, body: str, mark: str | None, block: str, scalars: dict[str, object]) -> str:
        """A block's lines as inserted at a placeholder: lines written by code take the
        placeholder's line; lines of a fragment template learn the enclosing fill's server."""
        server = scalars.get("name")
        server = server if isinstance(server, str) else None
        out = []
        for line in body.split("\n"):
            found = _MARK.search(line)
            if found is None:
                if line and mark is not None:
                    line += self._mark(replace(self._origin(mark), block=block))
            elif server is not None and self._origin(found.group(0)).server is None:
                line = _MARK.sub(lambda m: self._mark(replace(self._origin(m.group(0)),
                                                              server=server)), line)
            out.append(line)
        return "\n".join(out)

    def finish(self, text: str) -> tuple[str, Origins]:
        """The rendering without marks, and each of its lines' origin."""
        lines, origins = [], []
        for line in text.split("\n"):
            marks = _MARK.findall(line)
            origins.append(self._records[int(marks[-1])] if marks else None)
            lines.append(_MARK.sub("", line))
        return "\n".join(lines), tuple(origins)


# --- Reading Envoy's message ---

_PREFIX = re.compile(r"^.*?error initializing configuration '[^']*':\s*", re.DOTALL)
_PGV = re.compile(r"(\w+?)ValidationError\.(\w+?)(?:\[(\d+)\])?:")
_JSON_AT = re.compile(r"@\s+([\w.\[\]<>]+):(?:.*?no\s+such\s+field:\s*'(\w+)')?", re.DOTALL)
_VALUE_MESSAGES = (
    re.compile(r"Incorrect configuration:\s*(.+?)\.\s+Couldn't find"),
    re.compile(r"Not supported field in StreamInfo:\s*(\S+)"),
    re.compile(r"Invalid header configuration\.[^:]*:\s*(\S+)"),
    re.compile(r"malformed IP address:\s*(\S+)"),
    re.compile(r"unknown enum value:\s*'([^']+)'"),
)
# Refusals that name neither a field nor a value: what in the rendering makes them.
_SHAPE_MESSAGES = (
    (re.compile(r"Invalid duration"), re.compile(r":\s*\"?-\d[\d.]*(?:s|ms)\b")),
    (re.compile(r"(?:host|:-prefixed).*headers may not be modified"),
     re.compile(r"key:\s*\"?(?:host|:[\w-]+)\"?\s*[,}]")),
)


def envoy_message(output: str) -> str:
    """Envoy's refusal without its log prefix and, for a constraint failure, without the dump of
    the whole config it prints before the reason."""
    message = _PREFIX.sub("", output.strip(), count=1)
    start = message.find("Proto constraint validation failed")
    if start > 0:
        message = message[start:]
    dump = message.find("): {")  # "Unable to parse JSON as proto (...): {the config as JSON}"
    if message.startswith("Unable to parse JSON") and dump > 0:
        message = message[:dump + 1]
    return " ".join(message.split())[:MAX_MESSAGE_CHARS]


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def field_path(message: str) -> list[tuple[str, int | None]]:
    """The protobuf field path Envoy's message names (empty when it names none)."""
    if "Proto constraint validation failed" in message:
        return [(_snake(f), int(i) if i else None) for _, f, i in _PGV.findall(message)]
    found = _JSON_AT.search(message)
    if found is None:
        return []
    path: list[tuple[str, int | None]] = []
    for part in found.group(1).split("."):
        if part == "<any>":  # the message packed in a typed_config: its fields sit beside @type
            continue
        name, _, index = part.partition("[")
        path.append((name, int(index.rstrip("]")) if index else None))
    return [*path, (found.group(2), None)] if found.group(2) else path


def _child(node: yaml.Node, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                child: yaml.Node = v
                return child
    return None


def _key_line(node: yaml.Node, key: str) -> int | None:
    if isinstance(node, yaml.MappingNode):
        for k, _ in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return int(k.start_mark.line)
    return None


def _descendants(node: yaml.Node) -> list[yaml.Node]:
    out, stack = [], [node]
    while stack:
        current = stack.pop()
        out.append(current)
        if isinstance(current, yaml.MappingNode):
            stack.extend(v for _, v in reversed(current.value))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(reversed(current.value))
    return out


def _walk(node: yaml.Node, path: list[tuple[str, int | None]]) -> list[int]:
    """0-based lines of the rendering where ``path`` ends under ``node``; a field not found
    directly is looked for below (the fields inside a typed_config are validated on their own,
    so Envoy's path starts there)."""
    if not path:
        return [int(node.start_mark.line)]
    (field, index), rest = path[0], path[1:]
    for holder in ([node] if _child(node, field) is not None else
                   [n for n in _descendants(node) if _child(n, field) is not None]):
        child = _child(holder, field)
        assert child is not None
        if index is not None:
            if not isinstance(child, yaml.SequenceNode) or index >= len(child.value):
                continue
            child = child.value[index]
        lines = (_walk(child, rest) if rest else
                 [_key_line(holder, field) if index is None else int(child.start_mark.line)])
        found = [line for line in lines if line is not None]
        if found:
            return found
    return []


def locate(message: str, text: str) -> tuple[str | None, str | None, list[int]]:
    """The field path Envoy names (dotted, or None), the value it names (or None) and the
    0-based rendered lines it refuses."""
    path = field_path(message)
    if path:
        try:
            root = yaml.compose(text)
        except yaml.YAMLError:
            root = None
        lines = _walk(root, path) if root is not None else []
        dotted = ".".join(f"{f}[{i}]" if i is not None else f for f, i in path)
        if lines:
            return dotted, None, lines[:MAX_PLACES]
    rows = text.split("\n")
    for pattern in _VALUE_MESSAGES:
        found = pattern.search(message)
        if found:
            value = found.group(1).strip("'\"")
            hits = [n for n, row in enumerate(rows) if value in row and not row.lstrip().startswith("#")]
            if hits:
                return None, value, hits[:MAX_PLACES]
    for kind, shape in _SHAPE_MESSAGES:
        if kind.search(message):
            hits = [n for n, row in enumerate(rows) if shape.search(row)
                    and not row.lstrip().startswith("#")]
            if hits:
                return None, None, hits[:MAX_PLACES]
    return (".".join(f for f, _ in path) or None), None, []


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def gateway_keys(origin: Origin, rendered_line: str, value: str | None = None) -> tuple[str, ...]:
    """The gateway key(s) that set a rendered line (empty: the template writes it as it is):
    of the line's placeholders, the one that holds ``value`` or sets the line's own field."""
    if origin.block is not None:
        key = _BLOCKS.get(origin.block)
        if key is None or ("{server}" in key and origin.server is None):
            return ()
        return (key.format(server=origin.server),)
    names = [name for name, set_to in origin.values if value is not None and value in set_to]
    if not names:
        field = rendered_line.split(":", 1)[0].strip(" -{")
        names = [p for k, p in _KEY_PLACEHOLDER.findall(origin.text) if k == field]
    names = names or _PLACEHOLDER.findall(origin.text)
    keys: list[str] = []
    for name in names:
        key = placeholder_key(name, origin.server)
        if key is not None and key not in keys:
            keys.append(key)
    return tuple(keys)


def explain(output: str, text: str, origins: Origins | None) -> str:
    """Envoy's refusal of ``text`` in a few lines: its message, the field, and for each line it
    points at, the rendered line, the template line that wrote it and the gateway key behind it."""
    message = envoy_message(output)
    dotted, value, lines = locate(message, text)
    out = [message]
    if dotted:
        out.append(f"  Envoy's field: {dotted}")
    rows = text.split("\n")
    for number in lines:
        out.append(f"  rendered line {number + 1}: {rows[number].strip()}")
        origin = origins[number] if origins is not None and number < len(origins) else None
        if origin is None:
            continue
        block = f" (written by the renderer at ${{{origin.block}}})" if origin.block else ""
        server = f" (server {origin.server})" if origin.server else ""
        out.append(f"    from {_shown(origin.template)}:{origin.line}{server}: "
                   f"{origin.text.strip()}{block}")
        keys = gateway_keys(origin, rows[number].strip(), value)
        if keys:
            out.append(f"    gateway key: {'; '.join(keys)}")
        elif origin.block is None:
            out.append("    gateway key: none (the value is written in the template)")
    return "\n".join(out)
