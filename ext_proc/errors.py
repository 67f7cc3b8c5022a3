"""The ext_proc error tree: stable codes (metric labels, log fields) mapped to HTTP + JSON-RPC.

Every one of them ends the exchange with an ImmediateResponse: the response body is never passed
through when it could not be inspected.
"""

from __future__ import annotations

from gateway.errors import FORBIDDEN, INTERNAL_ERROR, GatewayError


class InspectionError(GatewayError):
    """The response could not be inspected safely; the client gets an error instead of it."""

    code = "inspection_error"
    rpc_code = INTERNAL_ERROR
    http_status = 502


class MetadataMissing(InspectionError):
    """ext_authz did not hand over the caller context (misconfigured route or filter order)."""

    code = "metadata_missing"
    http_status = 500


class MetadataInvalid(InspectionError):
    code = "metadata_invalid"
    http_status = 500


class UnsupportedContent(InspectionError):
    """A content type or encoding that cannot be inspected on a route that must be inspected."""

    code = "unsupported_content"


class ResponseTooLarge(InspectionError):
    code = "response_too_large"


class InvalidUpstreamResponse(InspectionError):
    """The upstream answered something that is not a JSON-RPC message where one was expected."""

    code = "invalid_upstream_response"


class ListPolicyError(InspectionError):
    """The list-filter policy query failed or answered something other than a list of names."""

    code = "list_policy_error"
    rpc_code = FORBIDDEN
    http_status = 503


class InspectionTimeout(InspectionError):
    code = "inspection_timeout"
    http_status = 504
