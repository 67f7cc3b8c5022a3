"""Free loopback ports for tests that start real servers.

Ports come from below the kernel's ephemeral range, so an outgoing connection can never be handed
one between the probe and the server's bind (a bind-to-0 probe returns an ephemeral port, which
the OS may give to any client socket a moment later). ``offsets`` reserves companion ports too:
the gRPC services serve /metrics on their port + ``telemetry.metrics_port_offset`` (1000).
"""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

METRICS_OFFSET = 1000
_LOW = 20000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int, *, offsets: tuple[int, ...] = (0, METRICS_OFFSET)) -> list[int]:
    """``count`` distinct ports p, each with every p + offset free now, none in the ephemeral range.

    The probe sockets are held together until all are chosen, so the ports differ; another
    process binding one explicitly before the server does is still possible (a clear port error).
    """
    high = _ephemeral_start() - max(offsets)
    if high - _LOW < count * 4:
        raise RuntimeError(f"no room for {count} test ports below the ephemeral range ({high})")
    rng = random.SystemRandom()
    chosen: list[int] = []
    taken: set[int] = set()
    with contextlib.ExitStack() as stack:
        for _attempt in range(count * 200):
            if len(chosen) == count:
                return chosen
            port = rng.randrange(_LOW, high)
            wanted = {port + off for off in offsets}
            if wanted & taken:
                continue
            socks = []
            try:
                for p in sorted(wanted):
                    s = stack.enter_context(socket.socket())
                    socks.append(s)
                    s.bind(("127.0.0.1", p))
            except OSError:
                for s in socks:
                    s.close()
                continue
            chosen.append(port)
            taken |= wanted
        if len(chosen) == count:
            return chosen
    raise RuntimeError(f"found only {len(chosen)} of {count} free loopback ports")


def free_port(*, offsets: tuple[int, ...] = (0, METRICS_OFFSET)) -> int:
    """One free port (see :func:`free_ports`)."""
    return free_ports(1, offsets=offsets)[0]
