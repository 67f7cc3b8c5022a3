"""Server entries of three kinds (module, url, command): what each accepts, and every mistake named
by its server and key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import DEFAULT_CONFIG_PATH, ConfigError, GatewayConfig, parse_config


def _config(servers: dict[str, Any], **extra: Any) -> GatewayConfig:
    raw: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["servers"] = servers
    raw["secrets"] = [*raw.get("secrets", []), *extra.pop("secrets", [])]
    raw.update(extra)
    return parse_config(raw, base_dir=Path("/srv/gw"))


def test_module_entry_is_unchanged() -> None:
    """A module entry reads as before: kind module, its instances, path /mcp upstream."""
    cfg = _config({"files": {"module": "mcp_servers.files", "instances": [{"port": 9201}]}})
    server = cfg.server("files")
    assert server.kind == "module" and server.module == "mcp_servers.files"
    assert server.upstream_path == "/mcp" and server.urls == ()


def test_url_entry_with_tls_host_and_secret_header() -> None:
    """A url entry keeps the upstream's path, derives its endpoints, resolves TLS files against
    the config's folder and keeps header values as secret references."""
    cfg = _config({"remote": {
        "url": "https://mcp.internal.example:8443/v1/mcp",
        "tls": {"ca_file": "ca.pem", "client_cert_file": "gw.crt", "client_key_file": "gw.key"},
        "host_header": "mcp.internal.example", "headers": {"authorization": "Bearer ${REMOTE_KEY}"},
        "health": "discover"}}, secrets=["REMOTE_KEY"])
    server = cfg.server("remote")
    assert server.kind == "url" and server.upstream_path == "/v1/mcp"
    assert [(i.host, i.port) for i in server.instances] == [("mcp.internal.example", 8443)]
    assert server.urls[0].authority == "mcp.internal.example:8443"
    assert server.tls is not None and server.tls.ca_file == "/srv/gw/ca.pem"
    assert server.tls.client_key_file == "/srv/gw/gw.key" and server.tls.server_name is None
    assert server.headers == (("authorization", "Bearer ${REMOTE_KEY}"),)
    assert server.health == "discover" and server.host_header == "mcp.internal.example"
    # The audience is the gateway's resource id, whatever the upstream's URL.
    assert cfg.resource_url("remote") == "https://127.0.0.1:8443/mcp/remote"


def test_url_instances_and_defaults() -> None:
    """Several endpoints share scheme and path; ports default by scheme; health is the MCP
    handshake unless a health_path asks for an HTTP check."""
    cfg = _config({"a": {"instances": [{"url": "http://10.0.0.1/mcp"}, {"url": "http://[::1]:81/mcp"}]},
                   "b": {"url": "https://b.example", "health_path": "/healthz"}})
    a, b = cfg.server("a"), cfg.server("b")
    assert [(i.host, i.port) for i in a.instances] == [("10.0.0.1", 80), ("::1", 81)]
    assert a.urls[1].authority == "[::1]:81" and a.health == "handshake"
    assert b.instances[0].port == 443 and b.upstream_path == "/" and b.health == "http"


def test_command_entry() -> None:
    """A command entry is an argv run behind the bridge on its instances' ports."""
    cfg = _config({"time": {"command": ["mcp-server-time", "--local-timezone", "UTC"],
                            "instances": [{"port": 9241}], "workdir": "work", "env": ["K"]}},
                  secrets=["K"])
    server = cfg.server("time")
    assert server.kind == "command" and server.command == ("mcp-server-time", "--local-timezone", "UTC")
    assert server.workdir == "/srv/gw/work" and server.env == ("K",) and server.module == ""


@pytest.mark.parametrize(("entry", "message"), [
    ({"module": "m", "url": "http://h/mcp", "instances": [{"port": 1}]},
     "servers.x: exactly one of module, url, command (found module, url)"),
    ({"description": "nothing to run"}, "servers.x: exactly one of module, url, command"),
    ({"url": "mcp.internal.example/mcp"}, "servers.x.url: 'mcp.internal.example/mcp' needs a scheme"),
    ({"url": "ftp://h/mcp"}, "servers.x.url: 'ftp://h/mcp' needs a scheme"),
    ({"url": "https://user:pw@h/mcp"}, "servers.x.url: credentials in the URL"),
    ({"url": "https://h/mcp?x=1"}, "servers.x.url: a query or fragment"),
    ({"url": "https://h:99999/mcp"}, "servers.x.url: 'https://h:99999/mcp' has an invalid port"),
    ({"url": "https://h/a/../mcp"}, "servers.x.url: the path must be plain"),
    ({"url": "http://h/mcp", "args": ["--x"]}, "servers.x: unknown key(s) args"),
    ({"url": "http://h/mcp", "tls": {"ca_file": "ca.pem"}}, "servers.x.tls: only for an https url"),
    ({"url": "https://h/mcp", "tls": {"client_cert_file": "c"}},
     "servers.x.tls: client_cert_file and client_key_file go together"),
    ({"instances": [{"url": "http://a/mcp"}, {"url": "http://b/v2"}]},
     "servers.x.instances[1].url: every instance needs the scheme and path"),
    ({"url": "http://h/mcp", "instances": [{"url": "http://a/mcp"}]},
     "servers.x: url and instances exclude each other"),
    ({"url": "http://h/mcp", "headers": {"authorization": "Bearer ${NOPE}"}},
     "servers.x.headers.authorization: ${NOPE} is not listed in secrets"),
    ({"url": "http://h/mcp", "headers": {"x-mcp-user": "admin"}},
     "servers.x.headers.x-mcp-user: this header is set by the gateway"),
    ({"url": "http://h/mcp", "headers": {"x-key": "100%ENVIRONMENT(HOME)%"}},
     "servers.x.headers.x-key: '%' is not allowed"),
    ({"url": "http://h/mcp", "headers": {"x-key": "a\r\nb"}}, "servers.x.headers.x-key must be a one-line"),
    ({"url": "http://h/mcp", "health": "ready"}, "servers.x.health must be one of"),
    ({"url": "http://h/mcp", "health": "http"}, "servers.x: health_path is needed for health: http"),
    ({"url": "http://h/mcp", "health_path": "healthz"}, "servers.x.health_path must start with '/'"),
    ({"command": [], "instances": [{"port": 1}]}, "servers.x.command must be a non-empty list"),
    ({"command": "mcp-server-time", "instances": [{"port": 1}]}, "servers.x.command must be list"),
    ({"command": ["t"]}, "servers.x.instances must be a list of at least 1"),
    ({"command": ["t"], "module": "m", "instances": [{"port": 1}]},
     "servers.x: exactly one of module, url, command (found module, command)"),
])
def test_mistakes_name_server_and_key(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _config({"x": entry})
    assert message in str(err.value)


def test_command_runtime() -> None:
    """A command entry may name the packages its program comes from: pip or npm specs, kept as
    written; without `runtime` the command is looked up on PATH."""
    cfg = _config({
        "time": {"command": ["mcp-server-time"], "instances": [{"port": 9241}],
                 "runtime": {"pip": ["mcp-server-time==2026.10.19", " tzdata "]}},
        "everything": {"command": ["mcp-server-everything"], "instances": [{"port": 9242}],
                       "runtime": {"npm": ["@modelcontextprotocol/server-everything@2026.8.31"]}},
        "plain": {"command": ["/usr/bin/true"], "instances": [{"port": 9243}]}})
    time_rt, npm_rt = cfg.server("time").runtime, cfg.server("everything").runtime
    assert time_rt is not None and time_rt.kind == "pip"
    assert time_rt.packages == ("mcp-server-time==2026.10.19", "tzdata")
    assert npm_rt is not None and npm_rt.kind == "npm"
    assert npm_rt.packages == ("@modelcontextprotocol/server-everything@2026.8.31",)
    assert cfg.server("plain").runtime is None


@pytest.mark.parametrize(("runtime", "message"), [
    ({}, "servers.x.runtime must name exactly one of pip, npm"),
    ({"pip": ["a"], "npm": ["b"]}, "servers.x.runtime must name exactly one of pip, npm (found pip, npm)"),
    ({"uv": ["a"]}, "servers.x.runtime must name exactly one of pip, npm (found uv)"),
    (["a"], "servers.x.runtime must name exactly one of pip, npm"),
    ({"pip": []}, "servers.x.runtime.pip must be a non-empty list of package specs"),
    ({"pip": "mcp-server-time"}, "servers.x.runtime.pip must be a non-empty list"),
    ({"npm": [""]}, "servers.x.runtime.npm must be a non-empty list"),
    ({"pip": [3]}, "servers.x.runtime.pip must be a non-empty list"),
    ({"pip": ["--index-url=https://evil.example", "a"]},
     "servers.x.runtime.pip: '--index-url=https://evil.example' is an installer option"),
    ({"npm": ["-g"]}, "servers.x.runtime.npm: '-g' is an installer option"),
    ({"pip": ["a\nb"]}, "servers.x.runtime.pip: 'a\\nb' must be one line"),
])
def test_runtime_mistakes_name_the_key(runtime: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _config({"x": {"command": ["t"], "instances": [{"port": 1}], "runtime": runtime}})
    assert message in str(err.value)


def test_runtime_only_with_command() -> None:
    """A module or url server runs no installed program: `runtime` is refused there."""
    with pytest.raises(ConfigError, match=r"servers\.x: unknown key\(s\) runtime"):
        _config({"x": {"url": "http://h/mcp", "runtime": {"pip": ["a"]}}})
