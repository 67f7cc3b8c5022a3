"""The benchmark's gateway configs load with the current config rules (a `make bench` run would
otherwise stop at its first row)."""

from __future__ import annotations

from pathlib import Path

from bench.configs import RunContext, load_gateway_config


def test_bench_gateway_config_loads(tmp_path: Path) -> None:
    for transport in (None, "grpc", "http"):
        config = load_gateway_config(RunContext(tmp_path / (transport or "default")), transport)
        assert [s.name for s in config.servers] == ["bench"]
        assert not config.aggregate.enabled
