"""JSON log lines for MCP servers: the gateway's telemetry format (``gateway.telemetry.logs``).

Every line carries ``request_id``, ``decision_id``, ``sub`` and the trace ids of the request being
handled; the transport binds them per HTTP request.
"""

from __future__ import annotations

import logging

from gateway.telemetry.logs import configure_logging as _configure_telemetry_logging


def configure_logging(service: str, level: str = "INFO") -> None:
    """Route every record of this process to stderr as one JSON object per line."""
    _configure_telemetry_logging(service, level.upper())
    # aiohttp's access log duplicates what the transport logs; keep it for warnings only.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
