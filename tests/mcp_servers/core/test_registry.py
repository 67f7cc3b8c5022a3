"""The list entries of resources and resource templates."""

from __future__ import annotations

from typing import Any

from mcp_servers.core.registry import Resource, ResourceTemplate, compile_uri_template


async def _read(**_: Any) -> str:
    return ""


def _template(**optional: str) -> ResourceTemplate:
    pattern, _ = compile_uri_template("test://items/{id}")
    return ResourceTemplate(uri_template="test://items/{id}", name="item", handler=_read,
                            pattern=pattern, **optional)


def test_entries_carry_only_the_fields_that_are_set() -> None:
    """A resource and a template without optional fields list their address and name alone."""
    assert Resource(uri="test://doc", name="doc", handler=_read).describe() == \
        {"uri": "test://doc", "name": "doc"}
    assert _template().describe() == {"uriTemplate": "test://items/{id}", "name": "item"}


def test_entries_list_the_optional_fields_in_the_same_order() -> None:
    """Title, description and MIME type follow the address and name, for both kinds alike."""
    optional = {"title": "Doc", "description": "a document", "mime_type": "text/plain"}
    resource = Resource(uri="test://doc", name="doc", handler=_read, **optional).describe()
    template = _template(**optional).describe()
    assert list(resource.items()) == [("uri", "test://doc"), ("name", "doc"), ("title", "Doc"),
                                      ("description", "a document"), ("mimeType", "text/plain")]
    assert list(template.items())[2:] == list(resource.items())[2:]
    assert list(template)[:2] == ["uriTemplate", "name"]
    assert _template(description="d").describe() == \
        {"uriTemplate": "test://items/{id}", "name": "item", "description": "d"}
