"""The upstream credentials' Prometheus series (served on each ext_authz process's /metrics)."""

from __future__ import annotations

from prometheus_client import Counter

from gateway.telemetry.metrics import NAMESPACE

# outcome: sent (static or registered credential set), exchanged (a token endpoint answer),
# cached (an exchanged token reused), missing (no registered credential), unavailable (503),
# refused (the token endpoint's error answer, 502). Servers come from the config: bounded.
CREDENTIALS = Counter(
    "upstream_credentials", "Upstream credentials resolved by ext_authz, by server, kind and outcome.",
    ["server", "kind", "outcome"], namespace=NAMESPACE,
)
