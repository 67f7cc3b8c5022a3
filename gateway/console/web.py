"""The console's HTTP security: headers on every answer, the session, and the checks every
state-changing request passes (same origin, CSRF token).

* Content-Security-Policy: scripts, styles, images and fetches from the console's own origin
  only, no inline script or style, no framing (``frame-ancestors 'none'`` and X-Frame-Options),
  forms post only to the console, no ``<base>``.
* The session cookie ``__Host-mcp-console`` holds a random id only: ``Secure; HttpOnly;
  SameSite=Strict; Path=/``, no Domain (the ``__Host-`` prefix makes browsers refuse it
  otherwise). The token stays on the server; it is never put in a URL, a page or a log line.
* Every POST must come from the console's own origin (``Origin``, else ``Sec-Fetch-Site:
  same-origin``; neither: refused) and carry the session's CSRF token (the sign-in form: the
  value of its own ``__Host-`` cookie, double submit)."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; "
       "base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: under it browsers send "Origin: null" on same-origin form posts.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}
LOGIN_COOKIE = "__Host-mcp-console-login"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
MAX_FORM_BYTES = 256 * 1024


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    port = f":{parts.port}" if parts.port and parts.port != default else ""
    return f"{parts.scheme}://{(parts.hostname or '').lower()}{port}"


def same_origin(request: web.Request, public_origin: str) -> bool:
    """Whether a state-changing request comes from the console's own pages."""
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin != "null" and origin_of(origin) == public_origin
    return request.headers.get("Sec-Fetch-Site") == "same-origin"


def tokens_equal(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())


def cookie_header(name: str, value: str, *, max_age: int, same_site: str = "Strict") -> str:
    """A Set-Cookie value with the console's flags (built by hand: every flag is explicit)."""
    return f"{name}={value}; Path=/; Max-Age={max_age}; Secure; HttpOnly; SameSite={same_site}"


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The security headers on every answer, errors included; pages are never cached."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if not request.path.startswith("/console/static/"):
        response.headers["Cache-Control"] = "no-store"
    if isinstance(response, web.HTTPException):
        raise response
    return response
