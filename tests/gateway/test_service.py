"""The shared gRPC service life cycle on a real grpc.aio server on port 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace

from gateway.config import Instance
from gateway.service import GrpcService, GrpcSettings
from gateway.signals import run_until_signal
from tests.gateway.telemetry.otlp_receiver import OtlpReceiver

WAIT = 10.0  # bound on every wait
HEALTH_NAME = "test.Echo"


def settings(port: int = 0, otlp_endpoint: str | None = None) -> GrpcSettings:
    return GrpcSettings("svc-test", HEALTH_NAME, Instance("127.0.0.1", port),
                        otlp_endpoint=otlp_endpoint)


def add_echo(server: grpc.aio.Server) -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    # No (de)serializers: the messages are the raw bytes.
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(echo)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(HEALTH_NAME, {"Echo": handler}),))


@pytest.fixture
async def service() -> AsyncIterator[GrpcService]:
    svc = await GrpcService.open(settings())
    try:
        svc.register(add_echo)
        await svc.start()
        yield svc
    finally:
        await svc.stop(grace=None)


async def health_of(port: int) -> dict[str, int]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs omit the RPCs
        return {name: (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=WAIT)).status
                for name in ("", HEALTH_NAME)}


def scrape(port: int) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as resp:
        return int(resp.status), resp.read().decode()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_health_not_serving_until_set_serving(service: GrpcService) -> None:
    """Health reports NOT_SERVING for the server and the named service until set_serving()."""
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert await health_of(service.port) == {"": not_serving, HEALTH_NAME: not_serving}
    await service.set_serving()
    serving = health_pb2.HealthCheckResponse.SERVING
    assert await health_of(service.port) == {"": serving, HEALTH_NAME: serving}


async def test_registered_servicer_answers(service: GrpcService) -> None:
    """The servicer added through register() is served on the bound port."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            f"/{HEALTH_NAME}/Echo")
        assert await echo(b"ping", timeout=WAIT) == b"ping"


async def test_metrics_endpoint_answers(service: GrpcService) -> None:
    """Prometheus /metrics answers on its own free port beside the gRPC one."""
    assert service.metrics.host == "127.0.0.1" and service.metrics.port not in (0, service.port)
    status, text = await asyncio.to_thread(scrape, service.metrics.port)
    assert status == 200 and "# TYPE" in text


async def test_stop_leaves_nothing_listening() -> None:
    """After stop() neither the gRPC port nor the metrics port accepts connections."""
    svc = await GrpcService.open(settings())
    svc.register(add_echo)
    await svc.start()
    await svc.set_serving()
    assert not await asyncio.to_thread(refused, svc.port)
    assert not await asyncio.to_thread(refused, svc.metrics.port)
    await svc.stop()
    assert await asyncio.to_thread(refused, svc.port)
    assert await asyncio.to_thread(refused, svc.metrics.port)
    await svc.stop()  # a second stop is a no-op


async def test_close_without_start_frees_the_metrics_port() -> None:
    """A service that failed before start() is released by close() alone."""
    svc = await GrpcService.open(settings())
    await svc.close()
    assert await asyncio.to_thread(refused, svc.metrics.port)


async def test_taken_port_fails_instead_of_sharing(service: GrpcService) -> None:
    """SO_REUSEPORT is off: a second service on a port already served cannot bind it."""
    # grpc raises RuntimeError itself on a failed bind; older releases returned port 0 instead.
    with pytest.raises((OSError, RuntimeError), match="(?i)bind|listen"):
        await GrpcService.open(settings(port=service.port))


async def test_tracing_is_flushed_and_off_after_stop() -> None:
    """With an OTLP endpoint spans are exported; stop() flushes them and turns tracing off."""
    receiver = OtlpReceiver()
    await receiver.start()
    try:
        async with await GrpcService.open(settings(otlp_endpoint=receiver.endpoint)) as svc:
            assert svc.tracing
            await svc.start()
            with trace.get_tracer("test").start_as_current_span("while.serving") as span:
                assert span.is_recording()
        await receiver.wait_for(lambda: any(s.name == "while.serving" for _, s in receiver.spans))
        with trace.get_tracer("test").start_as_current_span("after.stop") as span:
            assert not span.is_recording()
    finally:
        await receiver.stop()


async def test_run_until_signal_stops_on_sigterm() -> None:
    """SIGTERM ends the wait and runs the stop callback once."""
    stops: list[None] = []

    async def stop() -> None:
        stops.append(None)

    task = asyncio.create_task(run_until_signal(stop))
    # Scheduled after the task's first step, which installs the handlers before it waits.
    asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, WAIT)
    assert stops == [None]


async def test_run_until_signal_stops_when_cancelled() -> None:
    """Cancelling the wait still runs the stop callback."""
    stops: list[None] = []

    async def stop() -> None:
        stops.append(None)

    task = asyncio.create_task(run_until_signal(stop))
    asyncio.get_running_loop().call_soon(task.cancel)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)
    assert stops == [None]
