"""The aggregator behind ``/mcp`` and ``/mcp/<virtual>``: one MCP endpoint over every server a
caller may use. It answers ``initialize``, ``server/discover``, the ``*/list`` methods, ``ping``,
``logging/setLevel``, notifications, GET streams and DELETE by fanning out through Envoy's own
per-server routes; calls aimed at one server take Envoy's fast path and never reach it."""
