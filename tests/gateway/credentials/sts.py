"""A small RFC 8693 token endpoint for tests: no registry package here runs a real one without a
JVM or the internet (docs/upstream-credentials.md, "Testing").

It follows the RFC's request (``application/x-www-form-urlencoded`` POST with ``grant_type``
``urn:ietf:params:oauth:grant-type:token-exchange``, ``subject_token``, ``subject_token_type``,
``audience``, ``resource``, ``scope``, ``requested_token_type``; client_secret_basic client
authentication) and its answers (section 2.2.1: ``access_token``, ``issued_token_type``,
``token_type``, ``expires_in``; errors as RFC 6749 section 5.2 JSON: ``invalid_request``,
``invalid_client`` (401), ``unsupported_grant_type``, ``invalid_grant``, ``invalid_target``).

Tests steer it: ``mode`` ``ok`` | ``refuse`` (400 invalid_grant) | ``fail`` (500) | ``hang``
(answers only when stopped), ``expires_in``. In process: :class:`TokenServer`; as a process
(``python -m tests.gateway.credentials.sts --port P --client-id ID --client-secret S``) it also
serves ``GET /-/requests`` (what it received) and ``POST /-/mode`` (``{"mode": ..., "expires_in":
...}``) for end-to-end tests.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import web

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105  # a URN
TOKEN_TYPES = frozenset({ACCESS_TOKEN_TYPE, "urn:ietf:params:oauth:token-type:jwt",
                         "urn:ietf:params:oauth:token-type:id_token",
                         "urn:ietf:params:oauth:token-type:refresh_token"})


@dataclass
class Issued:
    """One exchange the server answered with a token."""

    token: str
    subject_token: str
    audience: str | None
    form: dict[str, str]


@dataclass
class TokenServer:
    client_id: str = "gateway"
    client_secret: str = "sts-client-secret"  # noqa: S105  # a test value
    mode: str = "ok"
    expires_in: int | None = 300
    allowed_audiences: frozenset[str] | None = None  # None: any
    requests: list[dict[str, Any]] = field(default_factory=list)
    issued: list[Issued] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self.handle)
        app.router.add_get("/-/requests", self._requests)
        app.router.add_post("/-/mode", self._set_mode)
        app.router.add_get("/-/health", self._health)
        return app

    async def start(self, port: int = 0) -> None:
        self._runner = web.AppRunner(self.app())
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def _client(self, request: web.Request) -> str | None:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Basic "):
            return None
        try:
            pair = base64.b64decode(auth[6:], validate=True).decode()
        except ValueError:
            return None
        cid, _, secret = pair.partition(":")
        if unquote_plus(cid) != self.client_id or \
                not secrets.compare_digest(unquote_plus(secret), self.client_secret):
            return None
        return self.client_id

    async def handle(self, request: web.Request) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        self.requests.append({"form": form, "authorization": request.headers.get("authorization"),
                              "content_type": request.content_type})
        if self.mode == "hang":
            await asyncio.wait_for(self._release.wait(), 60)
        if self.mode == "fail":
            return web.json_response({"error": "server_error"}, status=500)
        if self._client(request) is None:
            return _error("invalid_client", "client authentication failed", 401,
                          {"www-authenticate": 'Basic realm="sts"'})
        if request.content_type != "application/x-www-form-urlencoded":
            return _error("invalid_request", "the request must be form-encoded")
        if form.get("grant_type") != GRANT_TYPE:
            return _error("unsupported_grant_type", "only token exchange is served")
        subject = form.get("subject_token")
        if not subject or form.get("subject_token_type") not in TOKEN_TYPES:
            return _error("invalid_request", "subject_token and a known subject_token_type are required")
        requested = form.get("requested_token_type", ACCESS_TOKEN_TYPE)
        if requested not in TOKEN_TYPES:
            return _error("invalid_request", "unknown requested_token_type")
        audience = form.get("audience")
        if self.allowed_audiences is not None and audience not in self.allowed_audiences:
            return _error("invalid_target", "this audience is not served")
        if self.mode == "refuse":
            return _error("invalid_grant", "the subject token is not acceptable")
        token = "xchg-" + secrets.token_urlsafe(24)
        self.issued.append(Issued(token, subject, audience, form))
        answer: dict[str, Any] = {"access_token": token, "issued_token_type": requested,
                                  "token_type": "Bearer"}
        if self.expires_in is not None:
            answer["expires_in"] = self.expires_in
        return web.json_response(answer, headers={"cache-control": "no-store"})

    async def _requests(self, _: web.Request) -> web.Response:
        return web.json_response({"requests": self.requests,
                                  "issued": [{"token": i.token, "subject_token": i.subject_token,
                                              "audience": i.audience} for i in self.issued]})

    async def _set_mode(self, request: web.Request) -> web.Response:
        doc = await request.json()
        self.mode = doc.get("mode", self.mode)
        if "expires_in" in doc:
            self.expires_in = doc["expires_in"]
        return web.json_response({"mode": self.mode})

    async def _health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})


def _error(code: str, description: str, status: int = 400,
           headers: dict[str, str] | None = None) -> web.Response:
    """An RFC 6749 section 5.2 error answer."""
    return web.Response(status=status, text=json.dumps({"error": code, "error_description": description}),
                        content_type="application/json",
                        headers={"cache-control": "no-store", **(headers or {})})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client-id", default="gateway")
    parser.add_argument("--client-secret", required=True)
    args = parser.parse_args()
    server = TokenServer(client_id=args.client_id, client_secret=args.client_secret)
    web.run_app(server.app(), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
