"""The decision core that both transport fronts of ext_authz serve.

The gRPC servicer (``ext_authz.servicer``, for Envoy's ``grpc_service``) and the HTTP front
(``ext_authz.http_front``, for Envoy's ``http_service``) each read Envoy's check into an
:class:`HttpRequest` and write the :class:`Verdict` back in their own wire form; in between, both
call one :class:`DecisionCore`.
"""

from __future__ import annotations

from typing import Protocol

from ext_authz.request import HttpRequest
from ext_authz.response import Verdict


class DecisionCore(Protocol):
    async def decide(self, req: HttpRequest, trace_headers: dict[str, str]) -> Verdict:
        """Decide one checked request (``trace_headers``: the W3C trace context to join).

        Exactly one decision log line, metrics update and span each; a failure inside is
        answered as a denial, never raised to the front.
        """
        ...
