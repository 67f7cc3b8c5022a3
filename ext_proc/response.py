"""ProcessingResponse builders (pure)."""

from __future__ import annotations

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from gateway.errors import GatewayError
from gateway.jsonrpc import error_response

BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _continue(phase: str) -> pb.ProcessingResponse:
    """Let ``phase`` (the name of a ProcessingResponse oneof field) through unchanged."""
    resp = pb.ProcessingResponse()
    getattr(resp, phase).SetInParent()
    return resp


def continue_request_headers() -> pb.ProcessingResponse:
    return _continue("request_headers")


def continue_response_headers() -> pb.ProcessingResponse:
    return _continue("response_headers")


def inspect_response_body(mode: int) -> pb.ProcessingResponse:
    """Ask for the response body in ``mode``; the body will change size, so its length goes.

    With BUFFERED bodies Envoy leaves Content-Length to the processor, and it is only known
    after the body was transformed, when the headers may already be on the wire (streamed
    answers). Dropping it here makes Envoy frame the answer itself (chunked / HTTP/2 frames).
    """
    resp = pb.ProcessingResponse()
    resp.response_headers.response.header_mutation.remove_headers.append("content-length")
    resp.mode_override.response_body_mode = mode
    return resp


def continue_response_body() -> pb.ProcessingResponse:
    return _continue("response_body")


def continue_request_body() -> pb.ProcessingResponse:
    return _continue("request_body")


def continue_trailers(response: bool) -> pb.ProcessingResponse:
    return _continue("response_trailers" if response else "request_trailers")


def replace_body(body: bytes) -> pb.ProcessingResponse:
    """Replace this body chunk (or the whole buffered body) with ``body``."""
    resp = pb.ProcessingResponse()
    mutation = resp.response_body.response.body_mutation
    if body:
        mutation.body = body
    else:
        mutation.clear_body = True
    return resp


def immediate_error(err: GatewayError) -> pb.ProcessingResponse:
    """End the exchange with a JSON-RPC error instead of the upstream answer."""
    resp = pb.ProcessingResponse()
    imm = resp.immediate_response
    imm.status.code = err.http_status
    imm.body = orjson.dumps(error_response(None, err.to_rpc_error()))
    opt = imm.headers.set_headers.add()
    opt.header.key = "content-type"
    opt.header.raw_value = b"application/json"
    opt.append_action = _OVERWRITE
    imm.details = err.code
    return resp


__all__ = ["BUFFERED", "STREAMED", "continue_request_body", "continue_request_headers",
           "continue_response_body", "continue_response_headers", "continue_trailers",
           "immediate_error", "inspect_response_body", "replace_body"]
