"""OAuth 2.0 Token Exchange (RFC 8693) for one upstream, with a bounded cache.

One client per credentialed server. :meth:`TokenExchangeClient.token` answers from the cache
while an issued token has more than ``refresh_before_seconds`` left (and, for a client token as
subject, while that token is valid: an exchanged token never outlives its subject); otherwise it
exchanges at the token endpoint, once per key however many checks miss at the same moment.

Fail closed: the endpoint down, slower than ``timeout_ms``, answering 5xx is
:class:`TokenExchangeUnavailable` (503); an RFC 6749 section 5.2 error or an answer without a
usable bearer token is :class:`TokenExchangeRefused` (502). Tokens (subject and issued) and the
client secret are never logged or put in an error.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import orjson

from gateway.credentials.config import TokenExchangeCredentials
from gateway.credentials.errors import TokenExchangeRefused, TokenExchangeUnavailable
from gateway.credentials.metrics import CREDENTIALS

logger = logging.getLogger(__name__)

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
MAX_ANSWER_BYTES = 64 * 1024
MAX_TOKEN_CHARS = 12 * 1024
# A token type that may be sent as "Bearer <token>" (RFC 8693 section 2.2.1: N_A when the
# issued token is not an access token, which is still presented as is).
_BEARER_TYPES = frozenset({"bearer", "n_a"})
_ERROR_CODE = re.compile(r"^[\x20-\x21\x23-\x5b\x5d-\x7e]{1,64}$")  # RFC 6749 5.2 charset, bounded
_TOKEN = re.compile(r"^[\x21-\x7e]+$")


class TokenExchangeClient:
    """Exchanges subject tokens for tokens of ``config.audience`` (see the module docstring).

    ``client_secret`` is the secret's value. ``clock`` is wall time (expiry is absolute)."""

    def __init__(self, server: str, config: TokenExchangeCredentials, client_secret: str, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.server = server
        self._config = config
        pair = f"{quote_plus(config.client_id, safe='')}:{quote_plus(client_secret, safe='')}"
        # client_secret_basic: RFC 6749 section 2.3.1 form-encodes both before Basic.
        self._authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        self._clock = clock
        self._cache: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[tuple[str, float]]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.exchanges = 0  # answers asked of the endpoint (metrics and tests)
        self._count = {outcome: CREDENTIALS.labels(server, "token_exchange", outcome)
                       for outcome in ("cached", "exchanged", "unavailable", "refused")}

    @staticmethod
    def cache_key(subject_token: str, audience: str) -> str:
        """Who the token is for and where: a digest, so the cache never holds a subject token."""
        return hashlib.sha256(f"{audience}\0{subject_token}".encode()).hexdigest()

    async def token(self, subject_token: str | Callable[[], str], subject_token_type: str, *,
                    key: str, not_after: float | None = None) -> str:
        """An issued token for ``key`` (the caller and audience, see :meth:`cache_key`).
        ``subject_token`` may be a function, called on a miss only (a minted assertion).
        ``not_after``: when the subject stops being valid (the cached token is dropped then)."""
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None:
            if now < hit[1]:
                self._cache.move_to_end(key)
                self._count["cached"].inc()
                return hit[0]
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            subject = subject_token() if callable(subject_token) else subject_token
            task = asyncio.create_task(self._fetch(subject, subject_token_type, key, not_after))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        # A caller that gives up (Envoy's deadline) does not cancel the others' exchange.
        token, _ = await asyncio.shield(task)
        return token

    def _done(self, key: str, task: asyncio.Task[tuple[str, float]]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: waiters got it, or none is left to

    async def _fetch(self, subject_token: str, subject_token_type: str, key: str,
                     not_after: float | None) -> tuple[str, float]:
        try:
            token, expires_in = await self._exchange(subject_token, subject_token_type)
        except TokenExchangeUnavailable:
            self._count["unavailable"].inc()
            raise
        except TokenExchangeRefused:
            self._count["refused"].inc()
            raise
        self._count["exchanged"].inc()
        now = self._clock()
        until = now + expires_in - self._config.refresh_before_seconds if expires_in else now
        if not_after is not None:
            until = min(until, not_after)
        if until > now and self._config.cache_size > 0:
            self._cache[key] = (token, until)
            self._cache.move_to_end(key)
            while len(self._cache) > self._config.cache_size:
                self._cache.popitem(last=False)
        return token, until

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            ctx: ssl.SSLContext | bool = True
            if self._config.ca_file:
                ctx = ssl.create_default_context(cafile=self._config.ca_file)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, ssl=ctx),
                timeout=aiohttp.ClientTimeout(total=self._config.timeout_ms / 1000),
                headers={"accept": "application/json", "authorization": self._authorization})
        return self._session

    def _form(self, subject_token: str, subject_token_type: str) -> dict[str, str]:
        cfg = self._config
        form = {"grant_type": GRANT_TYPE, "subject_token": subject_token,
                "subject_token_type": subject_token_type,
                "requested_token_type": cfg.requested_token_type, "audience": cfg.audience}
        if cfg.resource:
            form["resource"] = cfg.resource
        if cfg.scope:
            form["scope"] = cfg.scope
        return form

    async def _exchange(self, subject_token: str, subject_token_type: str) -> tuple[str, int | None]:
        """One request to the endpoint: the issued token and its expires_in."""
        server = self.server
        self.exchanges += 1
        try:
            async with self._http().post(self._config.token_endpoint,
                                         data=self._form(subject_token, subject_token_type),
                                         allow_redirects=False) as reply:
                status = reply.status
                body = await reply.content.read(MAX_ANSWER_BYTES + 1)
        except TimeoutError:
            logger.warning("token exchange for server %s: no answer within %d ms", server,
                           self._config.timeout_ms)
            raise self._unavailable("did not answer in time") from None
        except (aiohttp.ClientError, OSError) as exc:
            logger.warning("token exchange for server %s: endpoint unreachable (%s)", server,
                           type(exc).__name__)
            raise self._unavailable("cannot be reached") from None
        if status >= 500:
            logger.warning("token exchange for server %s: endpoint answered %d", server, status)
            raise self._unavailable(f"answered HTTP {status}")
        doc = _json(body)
        if status != 200:
            code = doc.get("error") if isinstance(doc, dict) else None
            code = code if isinstance(code, str) and _ERROR_CODE.match(code) else "invalid_answer"
            logger.warning("token exchange for server %s refused: HTTP %d, error %s", server,
                           status, code)
            raise TokenExchangeRefused(
                f"the token endpoint refused a credential for server {server} ({code})",
                data={"server": server, "error": code})
        if not isinstance(doc, dict):
            raise self._refused("an answer that is not a JSON object")
        token = doc.get("access_token")
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS \
                or not _TOKEN.match(token):
            raise self._refused("no usable access_token")
        token_type = doc.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() not in _BEARER_TYPES:
            raise self._refused("a token that is not a bearer token")
        expires_in = doc.get("expires_in")
        if expires_in is not None and (not isinstance(expires_in, int) or isinstance(expires_in, bool)
                                       or expires_in < 0):
            raise self._refused("an invalid expires_in")
        return token, expires_in

    def _unavailable(self, what: str) -> TokenExchangeUnavailable:
        return TokenExchangeUnavailable(
            f"the token endpoint for server {self.server} {what}; try again shortly",
            data={"server": self.server})

    def _refused(self, what: str) -> TokenExchangeRefused:
        logger.warning("token exchange for server %s: the endpoint answered %s", self.server, what)
        return TokenExchangeRefused(f"the token endpoint answered {what} for server {self.server}",
                                    data={"server": self.server, "error": "invalid_answer"})

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        if self._session is not None:
            await self._session.close()


def _json(body: bytes) -> Any:
    if len(body) > MAX_ANSWER_BYTES:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def subject_expiry(claims: Mapping[str, Any]) -> float | None:
    """The ``exp`` of verified claims (when the subject token stops being valid)."""
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
