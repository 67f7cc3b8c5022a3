"""What a server offers: tools, resources, templates, prompts, completions, as plain records."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mcp_servers.core.schema import SchemaValidator


@dataclass(slots=True)
class ToolResult:
    """Full control over a tool's answer: content blocks, structured content, error flag."""

    content: list[dict[str, Any]] = field(default_factory=list)
    structured: dict[str, Any] | None = None
    is_error: bool = False


ToolHandler = Callable[..., Awaitable[Any]]


@dataclass(slots=True)
class Tool:
    name: str
    description: str
    input_schema: dict[str, Any]
    handler: ToolHandler
    validator: SchemaValidator
    output_schema: dict[str, Any] | None = None
    output_validator: SchemaValidator | None = None
    annotations: dict[str, Any] | None = None
    title: str | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.title is not None:
            out["title"] = self.title
        out["description"] = self.description
        out["inputSchema"] = self.input_schema
        if self.output_schema is not None:
            out["outputSchema"] = self.output_schema
        if self.annotations:
            out["annotations"] = self.annotations
        return out


@dataclass(slots=True)
class Resource:
    uri: str
    name: str
    handler: Callable[..., Awaitable[Any]]
    description: str | None = None
    mime_type: str | None = None
    title: str | None = None

    def describe(self) -> dict[str, Any]:
        return _resource_entry({"uri": self.uri, "name": self.name}, self.title, self.description,
                               self.mime_type)


def _resource_entry(head: dict[str, Any], title: str | None, description: str | None,
                    mime_type: str | None) -> dict[str, Any]:
    """A resource's or a template's entry in a list: ``head`` (its address and name), then the
    optional fields it has."""
    out = dict(head)
    if title is not None:
        out["title"] = title
    if description is not None:
        out["description"] = description
    if mime_type is not None:
        out["mimeType"] = mime_type
    return out


_VAR = re.compile(r"\{([+#]?)([A-Za-z0-9_.,]+)\}")


def compile_uri_template(template: str) -> tuple[re.Pattern[str], list[str]]:
    """RFC 6570 level 1-2 matching: ``{x}`` is one path segment, ``{+x}`` may contain '/'."""
    pattern = ""
    names: list[str] = []
    pos = 0
    for m in _VAR.finditer(template):
        pattern += re.escape(template[pos:m.start()])
        op, name = m.group(1), m.group(2)
        if "," in name:
            raise ValueError(f"URI template {template!r}: lists of variables are not supported")
        names.append(name)
        pattern += f"(?P<{name}>.+)" if op in ("+", "#") else f"(?P<{name}>[^/?#]+)"
        pos = m.end()
    pattern += re.escape(template[pos:])
    return re.compile(pattern + r"\Z", re.DOTALL), names


@dataclass(slots=True)
class ResourceTemplate:
    uri_template: str
    name: str
    handler: Callable[..., Awaitable[Any]]
    pattern: re.Pattern[str]
    description: str | None = None
    mime_type: str | None = None
    title: str | None = None

    def match(self, uri: str) -> dict[str, str] | None:
        m = self.pattern.match(uri)
        return None if m is None else m.groupdict()

    def describe(self) -> dict[str, Any]:
        return _resource_entry({"uriTemplate": self.uri_template, "name": self.name}, self.title,
                               self.description, self.mime_type)


@dataclass(slots=True)
class Prompt:
    name: str
    handler: Callable[..., Awaitable[Any]]
    description: str | None = None
    arguments: list[dict[str, Any]] = field(default_factory=list)
    title: str | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.title is not None:
            out["title"] = self.title
        if self.description is not None:
            out["description"] = self.description
        if self.arguments:
            out["arguments"] = self.arguments
        return out
