"""One trace per request (issue 6): a stack exporting to a real OTLP/gRPC receiver in the test, and
a tools/call whose client sends a W3C ``traceparent``. Envoy, ext_authz and the MCP server each
report spans of the client's trace, all hanging off the client's span."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from gateway.config import load_config
from gatewayctl import devstack
from tests.e2e.conftest import HAS_EXT_PROC, installed
from tests.e2e.conftest import test_policy as pii_policy
from tests.e2e.helpers import REPO, authz_transport, bearer, stack_config, stateless_call
from tests.gateway.telemetry.otlp_receiver import OtlpReceiver
from tests.ports import free_ports

ENVOY_SERVICE = "mcp-gateway-envoy"  # service_name in envoy/templates/tracing.yaml.tmpl
# Envoy's OpenTelemetry tracer flushes every 5 s (runtime tracing.opentelemetry.flush_interval_ms)
# unless 5 spans are pending; the Python exporters are told to flush every 100 ms below.
EXPORT_WAIT_SECONDS = 30.0
PYTHON_EXPORT_SECONDS = 5.0

# One stack for the module, on the loop its receiver serves on.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def traced(tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[tuple[devstack.Stack, OtlpReceiver]]:
    """A stack of its own (the shared one exports nowhere): ext_authz, ext_proc when installed and
    the "pii" test server, all exporting to ``receiver``."""
    if not installed("ext_authz.__main__"):
        pytest.skip("needs ext_authz")
    tmp_path = tmp_path_factory.mktemp("trace")
    receiver = OtlpReceiver()
    await receiver.start()
    extra: dict[str, Any] = {
        "telemetry": {"otlp_endpoint": f"http://{receiver.endpoint}",
                      "envoy_stats_port": free_ports(1)[0]},
        "policy": {"engine": "embedded", "dir": str(pii_policy(tmp_path / "policies"))},
    }
    config = load_config(stack_config(tmp_path, servers={"pii": {"module": "tests.e2e.pii_server",
                                                                 "count": 1}},
                                      ext_authz=1, extra=extra, authz_transport=authz_transport()))
    with contextlib.ExitStack() as exits:
        monkeypatch = exits.enter_context(pytest.MonkeyPatch.context())
        # The test MCP server lives in tests/, which is not an installed package.
        monkeypatch.setenv("PYTHONPATH", str(REPO))
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        # Starting blocks until every process is healthy: off the loop the receiver serves on.
        stack = await asyncio.to_thread(exits.enter_context,
                                        devstack.running(config, ext_proc=HAS_EXT_PROC))
        try:
            yield stack, receiver
        finally:
            await asyncio.to_thread(exits.close)
            await receiver.stop()


def of_trace(receiver: OtlpReceiver, trace_id: bytes) -> list[tuple[str, Span]]:
    return [(service, span) for service, span in receiver.spans if span.trace_id == trace_id]


async def test_tools_call_is_one_trace(traced: tuple[devstack.Stack, OtlpReceiver]) -> None:
    """A tools/call with a client traceparent yields spans from Envoy, ext_authz and the MCP server
    in the client's trace; Envoy's ingress span is the client span's child and every other span's
    parent is a span of the same trace."""
    stack, receiver = traced
    trace_id, client_span = secrets.token_bytes(16), secrets.token_bytes(8)
    traceparent = f"00-{trace_id.hex()}-{client_span.hex()}-01"
    reply = await stateless_call(stack, "pii", bearer(stack.config, "admin"), "echo",
                                 headers={"traceparent": traceparent})
    assert reply.status_code == 200, reply.text
    wanted = {ENVOY_SERVICE, "ext_authz", "pii"}
    await receiver.wait_for(lambda: wanted <= {svc for svc, _ in of_trace(receiver, trace_id)},
                            timeout=EXPORT_WAIT_SECONDS)
    spans = of_trace(receiver, trace_id)
    ids = {span.span_id for _, span in spans}
    ingress = [span for svc, span in spans if svc == ENVOY_SERVICE and span.name == "ingress"]
    assert [span.parent_span_id for span in ingress] == [client_span]
    orphans = [(svc, s.name) for svc, s in spans if s.parent_span_id not in ids | {client_span}]
    assert not orphans
    server_spans = [span for svc, span in spans if svc == "pii"]
    assert any(attr.key == "mcp.tool" and attr.value.string_value == "echo"
               for span in server_spans for attr in span.attributes)



@pytest.mark.skipif(not HAS_EXT_PROC, reason="ext_proc is not installed")
async def test_masked_call_trace_includes_ext_proc(traced: tuple[devstack.Stack, OtlpReceiver]) -> None:
    """A call whose answer is masked also yields an ext_proc span in the client's trace, a child of
    Envoy's span for the ext_proc stream."""
    stack, receiver = traced
    trace_id, client_span = secrets.token_bytes(16), secrets.token_bytes(8)
    reply = await stateless_call(stack, "pii", bearer(stack.config, "viewer"), "contact",
                                 headers={"traceparent": f"00-{trace_id.hex()}-{client_span.hex()}-01"})
    assert reply.status_code == 200, reply.text
    wanted = {ENVOY_SERVICE, "ext_authz", "ext_proc", "pii"}
    await receiver.wait_for(lambda: wanted <= {svc for svc, _ in of_trace(receiver, trace_id)},
                            timeout=EXPORT_WAIT_SECONDS)
    spans = of_trace(receiver, trace_id)
    by_id = {span.span_id: (svc, span) for svc, span in spans}
    assert not [(svc, s.name) for svc, s in spans if s.parent_span_id not in set(by_id) | {client_span}]
    ext_proc_spans = [span for svc, span in spans if svc == "ext_proc"]
    assert ext_proc_spans
    for span in ext_proc_spans:
        parent_service, parent = by_id[span.parent_span_id]
        assert parent_service == ENVOY_SERVICE and "ExternalProcessor" in parent.name


async def test_trace_without_client_context(traced: tuple[devstack.Stack, OtlpReceiver]) -> None:
    """Without a client traceparent, Envoy's ingress span is the root and ext_authz and the MCP
    server still report spans in that trace."""
    stack, receiver = traced

    def ingress_traces() -> set[bytes]:
        return {span.trace_id for svc, span in receiver.spans
                if svc == ENVOY_SERVICE and span.name == "ingress"}

    before = ingress_traces()
    reply = await stateless_call(stack, "pii", bearer(stack.config, "admin"), "echo")
    assert reply.status_code == 200, reply.text
    await receiver.wait_for(lambda: bool(ingress_traces() - before), timeout=EXPORT_WAIT_SECONDS)
    (trace_id,) = ingress_traces() - before
    wanted = {ENVOY_SERVICE, "ext_authz", "pii"}
    # Envoy flushes last: the Python services' spans (100 ms batches) are in by now or never.
    with contextlib.suppress(TimeoutError):
        await receiver.wait_for(lambda: wanted <= {svc for svc, _ in of_trace(receiver, trace_id)},
                                timeout=PYTHON_EXPORT_SECONDS)
    assert wanted <= {svc for svc, _ in of_trace(receiver, trace_id)}


def _get(url: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, method=method)  # noqa: S310  (loopback URL)
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:  # noqa: S310
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""


async def test_stats_listener_serves_only_prometheus(traced: tuple[devstack.Stack, OtlpReceiver]) -> None:
    """telemetry.envoy_stats_port serves GET /stats/prometheus and 404s every other admin path
    (the admin interface itself stays on loopback)."""
    stack, _ = traced
    port = stack.config.telemetry.envoy_stats_port
    base = f"http://127.0.0.1:{port}"
    status, text = await asyncio.to_thread(_get, f"{base}/stats/prometheus")
    assert status == 200 and "envoy_server_live" in text
    for path, method in (("/stats", "GET"), ("/quitquitquit", "POST"), ("/stats/prometheus", "POST"),
                         ("/config_dump", "GET")):
        assert (await asyncio.to_thread(_get, base + path, method))[0] == 404, path
