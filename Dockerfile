# The gateway's Python services (ext_authz, ext_proc, MCP servers, the stdio bridge, the aggregator,
# the mcp-gateway CLI) in one image; docker-compose.yml and deploy/k8s/ choose the process with
# `command`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY requirements/runtime.txt requirements/runtime.txt
# xds-protos ships older opentelemetry/proto and google/rpc files: reinstall their owners last.
RUN pip install -r requirements/runtime.txt \
 && pip install --force-reinstall --no-deps \
      "opentelemetry-proto==$(sed -n 's/^opentelemetry-sdk==//p' requirements/runtime.txt)" \
      googleapis-common-protos==1.76.0 \
 && pip install --ignore-requires-python --no-deps opa-golib-python-bindings==0.4.4

COPY pyproject.toml README.md ./
COPY gateway gateway
COPY gatewayctl gatewayctl
COPY ext_authz ext_authz
COPY ext_proc ext_proc
COPY mcp_servers mcp_servers
COPY mcp_bridge mcp_bridge
COPY mcp_aggregator mcp_aggregator
COPY policies policies
COPY envoy envoy
# Editable: `mcp-gateway config render` reads the Envoy templates from /app/envoy.
RUN pip install --no-deps -e . \
 && useradd --system --uid 10001 --no-create-home mcp

USER 10001
EXPOSE 9101 9111 9201 9211 9221
ENTRYPOINT []
CMD ["mcp-gateway", "--help"]
