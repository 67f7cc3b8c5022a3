"""Typed settings of the ext_proc service, derived once from the gateway config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from gateway.config import ConfigError, GatewayConfig, Instance, PolicyConfig
from gateway.pii import DEFAULT_REPLACEMENT

# A JSON answer is held whole to be inspected; SSE holds one event at most. Larger answers are
# refused (502), never passed through uninspected.
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_SSE_EVENT_BYTES = 4 * 1024 * 1024
# Which list kinds the policy filters, and with which rule (one query per page).
DEFAULT_LIST_ENTRYPOINTS: Mapping[str, str] = MappingProxyType({
    "tools": "mcp/authz/visible_tools",
    "prompts": "mcp/authz/visible_prompts",
    "resources": "mcp/authz/visible_resources",
    "resourceTemplates": "mcp/authz/visible_resources",
})
# Share of Envoy's per-message timeout this service allows itself: an answer (even an error)
# must reach Envoy before Envoy gives up on the stream.
TIMEOUT_SHARE = 0.8


@dataclass(frozen=True, slots=True)
class Settings:
    listen: Instance
    policy: PolicyConfig
    catalog_path: Path | None
    message_timeout_seconds: float
    max_body_bytes: int = MAX_BODY_BYTES
    max_sse_event_bytes: int = MAX_SSE_EVENT_BYTES
    list_entrypoints: Mapping[str, str] = field(default_factory=lambda: DEFAULT_LIST_ENTRYPOINTS)
    replacement: str = DEFAULT_REPLACEMENT
    phone_region: str = "US"
    # /metrics on the gRPC port + metrics_port_offset (a free port when listening on port 0).
    metrics_host: str = "127.0.0.1"
    metrics_port_offset: int = 1000
    otlp_endpoint: str | None = None  # OTLP/gRPC collector for spans; None: tracing off

    def __post_init__(self) -> None:
        if self.message_timeout_seconds <= 0:
            raise ConfigError("ext_proc.timeout_ms must be positive")
        if self.max_body_bytes <= 0 or self.max_sse_event_bytes <= 0:
            raise ConfigError("ext_proc body limits must be positive")

    @classmethod
    def from_config(cls, cfg: GatewayConfig, *, port: int | None = None,
                    host: str | None = None) -> Settings:
        first = cfg.ext_proc.instances[0]
        return cls(
            listen=Instance(host or first.host, first.port if port is None else port),
            policy=cfg.policy,
            catalog_path=Path(cfg.catalog.path),
            message_timeout_seconds=cfg.ext_proc.timeout_ms * TIMEOUT_SHARE / 1000.0,
            metrics_host=cfg.telemetry.metrics_host,
            metrics_port_offset=cfg.telemetry.metrics_port_offset,
            otlp_endpoint=cfg.telemetry.otlp_endpoint,
        )
