"""JSON Schema checks for tool arguments and structured results.

jsonschema rather than fastjsonschema: MCP 2025-11-25 makes JSON Schema 2020-12 the default
dialect (``$defs``, ``prefixItems``, ``unevaluatedProperties``, ``$dynamicRef``) and
fastjsonschema stops at draft 7. Validators are built once when a tool is registered, schemas are
checked then (a bad schema fails at start-up, not on the first call), and ``$ref`` never reaches
the network because no retriever is configured.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import jsonschema.exceptions
import jsonschema.validators


class SchemaValidator:
    """A compiled validator that explains the first problem in terms of the offending field."""

    def __init__(self, schema: dict[str, Any], *, what: str) -> None:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(schema)
        except jsonschema.exceptions.SchemaError as exc:
            raise ValueError(f"invalid JSON Schema for {what}: {exc.message}") from None
        self._validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
        self.schema = schema

    def problem(self, instance: Any, root: str = "arguments") -> str | None:
        """None when valid, else one message naming the field (``arguments.path: ...``)."""
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(instance))
        if error is None:
            return None
        field = root
        for part in error.absolute_path:
            field += f"[{part}]" if isinstance(part, int) else f".{part}"
        if error.validator == "required" and isinstance(error.instance, dict):
            missing = [k for k in error.validator_value if k not in error.instance]
            if missing:
                return f"{field}.{missing[0]}: required field is missing"
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            return f"{field}: {error.message}"
        return f"{field}: {error.message}"
