"""OpenTelemetry tracing: OTLP/gRPC export and W3C trace-context propagation.

Off by default: with no endpoint, :func:`setup_tracing` installs nothing, yet
:func:`start_server_span` still adopts the caller's ``traceparent`` as a non-recording span, so log
lines carry the request's trace id either way. Envoy hands the ``traceparent`` it generated to
ext_authz in the CheckRequest headers and to upstreams as an HTTP header; starting a server span
from those headers is what joins Envoy, ext_authz and the MCP servers into one trace.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

logger = logging.getLogger(__name__)

_propagator = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None
_global_set = False

Headers = Mapping[str, str] | Iterable[tuple[str, str]]


class _FollowingTracer(trace.Tracer):
    """Resolves the provider at each span start, so tracers taken early follow later set-ups."""

    def __init__(self, name: str, version: str | None, schema_url: str | None,
                 attributes: Attributes) -> None:
        self._args = (name, version, schema_url, attributes)

    def _current(self) -> trace.Tracer:
        provider = _provider
        return provider.get_tracer(*self._args) if provider is not None else _NOOP_TRACER

    def start_span(self, *args: Any, **kwargs: Any) -> Span:
        return self._current().start_span(*args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._current().start_as_current_span(*args, **kwargs)


class _FollowingTracerProvider(trace.TracerProvider):
    """The process-global provider: whatever setup_tracing installed last, else no-op."""

    def get_tracer(self, instrumenting_module_name: str, instrumenting_library_version: str | None = None,
                   schema_url: str | None = None, attributes: Attributes = None) -> trace.Tracer:
        return _FollowingTracer(instrumenting_module_name, instrumenting_library_version, schema_url,
                                attributes)


_NOOP_TRACER = trace.NoOpTracer()

# The OpenTelemetry SDKs' standard variables; the traces-only one wins, as the specification says.
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_ENDPOINT = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+(?::\d{1,5})?/?$")
MAX_ENDPOINT_CHARS = 2048


def endpoint_from_environment(environ: Mapping[str, str] | None = None) -> str | None:
    """The collector the standard OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT variable names, for a
    service whose config names none (None: unset). A value that is not ``http(s)://host[:port]``
    is ignored with an error naming the variable: tracing stays off rather than guessing."""
    env = os.environ if environ is None else environ
    for name in ENDPOINT_VARIABLES:
        value = env.get(name, "").strip()
        if not value:
            continue
        if len(value) > MAX_ENDPOINT_CHARS or not _ENDPOINT.match(value):
            logger.error("%s must be http(s)://host[:port] (OTLP/gRPC), got %.100r: tracing off",
                         name, value)
            return None
        return value
    return None


def setup_tracing(service: str, otlp_endpoint: str | None = None, *, insecure: bool = True) -> bool:
    """Export spans of this process to an OTLP/gRPC collector at ``otlp_endpoint``, or, when the
    config names none, at the one the standard OTEL_EXPORTER_OTLP_ENDPOINT variable names (TLS
    for an https:// one).

    Returns False (and does nothing) when there is no endpoint either way. The process-global provider (which
    OpenTelemetry lets a process set only once) is set to one that follows this module, so code
    using ``opentelemetry.trace.get_tracer`` directly also exports here, and stops exporting after
    :func:`shutdown_tracing`.
    """
    global _provider, _global_set
    if not otlp_endpoint:
        otlp_endpoint = endpoint_from_environment()
        if otlp_endpoint is None:
            return False
        insecure = not otlp_endpoint.startswith("https://")
    if _provider is not None:
        shutdown_tracing()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    exporter = OTLPSpanExporter(endpoint=otlp_endpoint, insecure=insecure)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _provider = provider
    if not _global_set:
        trace.set_tracer_provider(_FollowingTracerProvider())
        _global_set = True
    logger.info("tracing to %s as %s", otlp_endpoint, service)
    return True


def shutdown_tracing() -> None:
    """Flush pending spans and stop exporting (no-op when tracing is off)."""
    global _provider
    provider, _provider = _provider, None
    if provider is not None:
        provider.force_flush()
        provider.shutdown()


def get_tracer(name: str) -> trace.Tracer:
    """A tracer from the provider :func:`setup_tracing` installed, else the global one."""
    if _provider is not None:
        return _provider.get_tracer(name)
    return trace.get_tracer(name)


def _lowercase(headers: Headers) -> dict[str, str]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return {k.lower(): v for k, v in items}


def extract_context(headers: Headers) -> Context:
    """The W3C trace context (``traceparent``/``tracestate``) carried by ``headers``.

    Header names are matched case-insensitively; a missing or malformed ``traceparent`` yields an
    empty context, so the span started from it becomes a new root.
    """
    return _propagator.extract(_lowercase(headers))


def inject_headers(headers: MutableMapping[str, str], context: Context | None = None) -> None:
    """Add ``traceparent`` (and ``tracestate``) for the current span to outgoing ``headers``."""
    _propagator.inject(headers, context=context)


@contextmanager
def start_server_span(name: str, headers: Headers, *, attributes: Attributes = None,
                      tracer_name: str = "gateway") -> Iterator[Span]:
    """Run a ``with`` block inside a SERVER span whose parent comes from ``headers``.

    Exceptions leaving the block are recorded on the span and set its status to error.
    """
    tracer = get_tracer(tracer_name)
    with tracer.start_as_current_span(name, context=extract_context(headers), kind=SpanKind.SERVER,
                                      attributes=attributes) as span:
        yield span
