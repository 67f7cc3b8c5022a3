"""Faults under bounded load through the real stack: Envoy, ext_authz, ext_proc, the counter MCP
server (3 instances), the dev JWKS server and a real redis-server as the rate-limit store.

One stack serves the module and the tests run in file order: each leaves at least one healthy
instance of everything it broke, or restarts it, so the next one starts from a working gateway.
"Envoy has noticed" a dead instance is defined from Envoy's own admin API: it holds no more
connections to it than the calls still running there (0 after SIGKILL). Requests in flight on an
instance at the moment it is SIGKILLed may fail (Envoy retries only connect failures, refused
streams and resets before the request was sent, never a tools/call that reached a server);
every request that starts after Envoy has noticed must succeed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ext_authz.ratelimit import REDIS_BACKOFF_SECONDS
from gateway.jwks import FAILURE_COOLDOWN_SECONDS
from gatewayctl import tokens
from tests.ports import free_ports
from tests.reliability import load
from tests.reliability.counter_server import CARD, EMAIL
from tests.reliability.stack import ISSUER, Gateway, gateway, wait_for

pytestmark = [
    pytest.mark.timeout(150),
    pytest.mark.skipif(shutil.which("redis-server") is None,
                       reason="redis-server is not installed (make test installs it)"),
]

CLUSTER = "mcp_counter"
INTERNAL_ERROR = -32603
UNAUTHORIZED = -32001


class RedisServer:
    """A real redis-server on a fixed loopback port that a test can stop and start again."""

    def __init__(self, port: int, folder: Path) -> None:
        self.port = port
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(self._answers, f"redis-server on {self.port}")

    def _answers(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_ports(1)[0], tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, redis: RedisServer) -> Iterator[Gateway]:
    overrides = {"rate_limits": {"backend": "redis", "redis_url": redis.url,
                                 "per_user": {"rate_per_second": 5000, "burst": 5000}}}
    with gateway(tmp_path_factory.mktemp("faults"), overrides=overrides, instances=3) as running:
        running.wait_hosts(CLUSTER, set(running.instance_ports("counter")))
        yield running


def alive(gw: Gateway, component: str) -> list[str]:
    return [c.label for c in gw.stack.components
            if c.name == component and gw.stack.procs[c.label].poll() is None]


def port_of(gw: Gateway, label: str) -> int:
    return next(c.port for c in gw.stack.components if c.label == label)


def refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False  # the listener is closing with connections in its backlog: poll again


def executions(gw: Gateway, prefix: str) -> collections.Counter[str]:
    return collections.Counter(e["id"] for e in gw.ledger_lines()
                               if e["event"] in ("bump", "start") and e["id"].startswith(prefix))


async def one_call(gw: Gateway, bearer: str, tool: str, call_id: str) -> load.Outcome:
    async with load.client(gw) as http:
        args = {"id": call_id} if tool == "bump" else {}
        return await load.call(http, gw, bearer, tool, args, call_id)


async def test_sigterm_lets_in_flight_calls_finish_and_moves_new_calls(gw: Gateway) -> None:
    """SIGTERM on an instance running slow calls: they all complete; calls started after it
    stopped listening run on the other instances, without errors."""
    bearer = gw.token()
    async with load.client(gw) as http:
        slow = [asyncio.create_task(load.call(http, gw, bearer, "slow",
                                              {"id": f"term-{i}", "ms": 4000}, f"term-{i}"))
                for i in range(6)]
        starts = await asyncio.to_thread(
            wait_for, lambda: [e for e in gw.ledger_lines()
                               if e["event"] == "start" and e["id"].startswith("term-")]
            if len(executions(gw, "term-")) == 6 else None, "6 slow calls running")
        per_port = collections.Counter(e["port"] for e in starts)
        victim_port, in_flight = per_port.most_common(1)[0]
        victim = next(lbl for lbl in alive(gw, "counter") if port_of(gw, lbl) == victim_port)
        gw.kill(victim, signal.SIGTERM)
        # Noticed: the listener is closed and Envoy holds only the in-flight calls' connections.
        await asyncio.to_thread(wait_for, lambda: refuses(victim_port), "listener closed")
        await asyncio.to_thread(wait_for, lambda: gw.connections(CLUSTER, victim_port) <= in_flight,
                                "Envoy to drop idle connections to the draining instance")
        after = await load.run(gw, bearer, "term-new", count=30, concurrency=4)
        done = await asyncio.gather(*slow)
    assert [o for o in after if not o.ok] == []
    assert all(o.ok for o in done), [(o.status, o.body) for o in done if not o.ok]
    new_ports = {e["port"] for e in gw.ledger_lines() if e["id"].startswith("term-new-")}
    assert victim_port not in new_ports and len(new_ports) >= 1
    finished = {e["id"] for e in gw.ledger_lines() if e["event"] == "done"}
    assert {f"term-{i}" for i in range(6)} <= finished
    assert gw.stack.procs[victim].wait(timeout=30) == 0


async def test_sigkill_under_load_no_late_errors_no_double_execution(gw: Gateway) -> None:
    """SIGKILL of an instance mid-load: every call started after Envoy noticed succeeds, and no
    call id is executed twice across instances."""
    bearer = gw.token()
    victim = alive(gw, "counter")[0]
    victim_port = port_of(gw, victim)
    noticed: list[float] = []

    async def fault(done: int) -> None:
        if done != 60:
            return
        proc = gw.kill(victim)
        await asyncio.to_thread(proc.wait, 10)
        await asyncio.to_thread(wait_for, lambda: gw.connections(CLUSTER, victim_port) == 0,
                                "Envoy to drop its connections to the killed instance")
        noticed.append(time.monotonic())

    # Enough calls that a slow Envoy (a loaded CI machine) still leaves >= 100 after it noticed.
    out = await load.run(gw, bearer, "kill", count=500, concurrency=6, during=fault)
    assert noticed, "the fault never fired"
    late = [o for o in out if o.started > noticed[0]]
    assert len(late) >= 100, "the load ended before Envoy noticed: the test proved nothing"
    assert [(o.call_id, o.status) for o in late if not o.ok] == [], \
        [(o.call_id, o.status, str(o.body)[:300]) for o in late if not o.ok]
    # Only calls in flight on the victim at the kill may fail: at most one per worker.
    assert len([o for o in out if not o.ok]) <= 6
    counts = executions(gw, "kill-")
    assert [cid for cid, n in counts.items() if n > 1] == []
    assert {o.call_id for o in out if o.ok} <= set(counts)


def inspected_call_leaks(outcome: load.Outcome) -> bool:
    text = str(outcome.body)
    return EMAIL in text or CARD in text or CARD.replace(" ", "") in text


async def wait_masked_answer(gw: Gateway, bearer: str) -> None:
    async def attempt() -> bool:
        outcome = await one_call(gw, bearer, "contact", "mask-probe")
        assert not inspected_call_leaks(outcome)
        return outcome.ok

    deadline = time.monotonic() + 30
    while not await attempt():
        assert time.monotonic() < deadline, "masked answers did not come back"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("fault", ["slow", "dead"])
async def test_ext_proc_slow_or_dead_never_leaks_unmasked_data(gw: Gateway, fault: str) -> None:
    """With every ext_proc process stopped (slow) or killed (dead), an answer that must be masked
    is withheld (an error, no PII); un-inspected calls still work; masking comes back."""
    engineer = gw.token("engineer")  # the example policy masks PII for engineers
    await wait_masked_answer(gw, engineer)
    labels = alive(gw, "ext_proc")
    sig = signal.SIGSTOP if fault == "slow" else signal.SIGKILL
    for label in labels:
        gw.kill(label, sig)
    try:
        for i in range(5):
            outcome = await one_call(gw, engineer, "contact", f"leak-{fault}-{i}")
            assert outcome.status >= 500 and not inspected_call_leaks(outcome), outcome
        assert (await one_call(gw, gw.token(), "bump", f"uninspected-{fault}")).ok
    finally:
        for label in labels:
            if fault == "slow":
                gw.kill(label, signal.SIGCONT)
            else:
                gw.stack.procs[label].wait(timeout=10)
                gw.restart(label)
    await wait_masked_answer(gw, engineer)


async def test_jwks_down_cached_keys_work_unknown_kids_refused_fetches_bounded(gw: Gateway) -> None:
    """JWKS server dead: tokens of the cached key pass, tokens with an unknown kid get 401, and a
    burst of unknown kids causes at most one refetch per instance per failure cooldown."""
    gw.kill("jwks[0]").wait(timeout=10)
    try:
        assert (await one_call(gw, gw.token(), "bump", "jwks-cached-1")).ok
        rogue = tokens.generate_key("EC")
        forged = tokens.mint_token(rogue, issuer=ISSUER, audience=gw.url("counter"), sub="mallory",
                                   roles=["admin"], scopes=["tools:call:counter/*"], tenant="acme")
        fetches = "mcp_gateway_jwks_fetches_total"
        before = gw.metric("ext_authz", fetches)
        started = time.monotonic()
        out = await load.run(gw, forged, "jwks-forged", count=40, concurrency=4)
        elapsed = time.monotonic() - started
        after = gw.metric("ext_authz", fetches)
        assert {o.status for o in out} == {401}
        assert {o.body["error"]["code"] for o in out if o.body} == {UNAUTHORIZED}
        assert executions(gw, "jwks-forged") == collections.Counter()
        instances = len(alive(gw, "ext_authz"))
        assert after - before <= instances * (2 + elapsed / FAILURE_COOLDOWN_SECONDS)
        assert (await one_call(gw, gw.token(), "bump", "jwks-cached-2")).ok
    finally:
        gw.restart("jwks[0]")


class HungRedis:
    """Accepts connections on the Redis port, counts them and never answers."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self.accepted = 0
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.accepted += 1
                self.conns.append(conn)

    def close(self) -> None:
        # shutdown() wakes the accept() blocked in the other thread.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=10)
        for conn in self.conns:
            conn.close()


async def test_redis_down_fails_closed_fast_without_retry_storm(gw: Gateway,
                                                                 redis: RedisServer) -> None:
    """Redis refused or hung: requests get ext_authz's own 503 rate_limit_unavailable with
    Retry-After (answered within Envoy's ext_authz timeout), never reach a server, ext_authz
    stays up, connection attempts stay bounded; service resumes when Redis is back."""
    bearer = gw.token()
    assert (await one_call(gw, bearer, "bump", "redis-before")).ok
    redis.stop()
    hung: HungRedis | None = None
    try:
        for phase in ("refused", "hung"):
            if phase == "hung":
                hung = HungRedis(redis.port)
            started = time.monotonic()
            async with load.client(gw) as http:
                out = [await load.call(http, gw, bearer, "bump", {"id": f"redis-{phase}-{i}"},
                                       f"redis-{phase}-{i}") for i in range(40)]
            elapsed = time.monotonic() - started
            assert {o.status for o in out} == {503}
            assert {(o.body or {}).get("error", {}).get("data", {}).get("reason") for o in out} \
                == {"rate_limit_unavailable"}
            assert {o.body["error"]["code"] for o in out if o.body} == {INTERNAL_ERROR}
            assert executions(gw, f"redis-{phase}") == collections.Counter()
            if hung is not None:
                # One attempt (plus one retry) per instance per backoff window, at most.
                windows = 2 + elapsed / REDIS_BACKOFF_SECONDS
                assert hung.accepted <= len(alive(gw, "ext_authz")) * 2 * windows
        assert alive(gw, "ext_authz") == ["ext_authz[0]", "ext_authz[1]"]
    finally:
        if hung is not None:
            hung.close()
        redis.start()

    # Every instance resumes, not just the first one Envoy picks: an instance still inside its
    # backoff window refuses, so only a run of successes long enough to have reached each
    # instance (least-request picks among idle hosts at random) counts as resumed.
    streak, deadline = 0, time.monotonic() + 15
    async with load.client(gw) as http:
        while streak < 24:
            assert time.monotonic() < deadline, "service did not resume after Redis came back"
            ok = (await load.call(http, gw, bearer, "bump", {"id": "redis-after"},
                                  "redis-after")).ok
            streak = streak + 1 if ok else 0


async def test_ext_authz_one_down_other_serves_all_down_fails_closed_then_recovers(
        gw: Gateway) -> None:
    """One ext_authz killed mid-load: calls after Envoy noticed succeed. All killed: 403/503 and
    nothing reaches a server. Restarted: service comes back without touching Envoy."""
    bearer = gw.token()
    first, second = alive(gw, "ext_authz")
    noticed: list[float] = []

    async def fault(done: int) -> None:
        if done != 40:
            return
        await asyncio.to_thread(gw.kill(first).wait, 10)
        await asyncio.to_thread(wait_for, lambda: gw.connections("ext_authz", port_of(gw, first)) == 0,
                                "Envoy to drop its connection to the killed ext_authz")
        noticed.append(time.monotonic())

    out = await load.run(gw, bearer, "authz-one", count=200, concurrency=6, during=fault)
    assert noticed and len([o for o in out if o.started > noticed[0]]) >= 60
    assert [(o.call_id, o.status, o.body) for o in out if o.started > noticed[0] and not o.ok] == []
    assert len([o for o in out if not o.ok]) <= 6

    await asyncio.to_thread(gw.kill(second).wait, 10)
    upstream_before = gw.stat(f"cluster.{CLUSTER}.upstream_rq_total")
    denied = await load.run(gw, bearer, "authz-none", count=20, concurrency=4)
    assert {o.status for o in denied} <= {403, 503} and denied
    assert executions(gw, "authz-none") == collections.Counter()
    assert gw.stat(f"cluster.{CLUSTER}.upstream_rq_total") == upstream_before

    for label in (first, second):
        gw.restart(label)

    async def back() -> bool:
        return (await one_call(gw, bearer, "bump", "authz-back")).ok
    deadline = time.monotonic() + 60
    while not await back():
        assert time.monotonic() < deadline, "service did not come back after ext_authz restarted"
        await asyncio.sleep(0.2)
