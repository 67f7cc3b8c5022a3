"""A tiny ext_authz stand-in for dev stack tests (gRPC Authorization + grpc.health.v1).

Allows requests whose bearer token is ``good`` (setting ``x-mcp-user: tester``) or ``inspect``
(which also sets ``x-mcp-inspect: 1`` and the caller context ext_proc reads, masking every PII
type), denies the rest with 401. Run as ``python -m tests.e2e.standin_authz --config FILE --port N``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_health.v1 import health, health_pb2_grpc


class Authz(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(self, request: Any, context: Any) -> Any:  # noqa: N802
        http = request.attributes.request.http
        headers = http.headers
        bearer = headers.get("authorization")
        if bearer in ("Bearer good", "Bearer inspect"):
            set_headers = {"x-mcp-user": "tester"}
            response = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))
            if bearer == "Bearer inspect":
                set_headers["x-mcp-inspect"] = "1"
                try:
                    method = json.loads(http.raw_body or http.body or "{}").get("method")
                except ValueError:
                    method = None
                response.dynamic_metadata.update({
                    "mcp_method": method or "", "server": http.path.rsplit("/", 1)[-1],
                    "tool": None, "sub": "tester", "tenant": None, "roles": ["admin"],
                    "mask": ["all"], "decision_id": "standin", "request_id": None})
            response.ok_response.CopyFrom(external_auth_pb2.OkHttpResponse(
                headers=[base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=k, value=v),
                    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
                    for k, v in set_headers.items()],
                headers_to_remove=[] if "x-mcp-inspect" in set_headers else ["x-mcp-inspect"]))
            return response
        denied = external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.Unauthorized),
            body='{"error":"unauthorized"}')
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.UNAUTHENTICATED), denied_response=denied)


async def serve(port: int) -> None:
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Authz(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
