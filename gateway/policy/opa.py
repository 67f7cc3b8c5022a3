"""The remote backend: an OPA server's REST data API, through opa-python-client's AsyncOpaClient.

``POST /v1/data/<entrypoint>`` with ``{"input": ...}`` answers ``{"result": ...}``; no ``result``
means the rule is undefined (a deny by the contract). One client, and so one aiohttp session and
its keep-alive connections, lives from ``start()`` to ``close()``. Every query is bounded by
``timeout`` and never retried: the client's own retries sleep with backoff, which a request in
flight cannot afford, so they are switched off.

An OPA run with ``--authentication=token --authorization=basic`` wants every query to carry
``Authorization: Bearer <token>`` and answers 401 without a valid one (its ``system.authz``
policy decides); ``token`` is sent on every request of the session.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from opa_client.opa_async import AsyncOpaClient

from gateway.policy.engine import DEFAULT_OPA_TIMEOUT_SECONDS, PolicyEngine
from gateway.policy.errors import PolicyError, PolicyEvalError, PolicyInputError

logger = logging.getLogger(__name__)

MAX_TOKEN_CHARS = 4096


class OpaEngine(PolicyEngine):
    def __init__(self, url: str, entrypoint: str, *, timeout: float = DEFAULT_OPA_TIMEOUT_SECONDS,
                 token: str | None = None) -> None:
        super().__init__(entrypoint)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PolicyError(f"policy.opa_url must be an http(s) URL, got {url!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise PolicyError(f"policy.opa_url must name the OPA server only (no path), got {url!r}")
        if timeout <= 0:
            raise PolicyError("the OPA timeout must be positive")
        if token is not None and not (0 < len(token) <= MAX_TOKEN_CHARS and token.isascii()
                                      and token.isprintable() and " " not in token):
            raise PolicyError(f"policy.opa_token: the token must be 1-{MAX_TOKEN_CHARS} visible "
                              f"ASCII characters")
        self.url = url
        self.timeout = timeout
        self._client = AsyncOpaClient(
            host=parts.hostname, port=parts.port or (443 if parts.scheme == "https" else 80),
            ssl=parts.scheme == "https", retries=0, timeout=timeout, token=token,
        )
        self._started = False

    async def start(self) -> None:
        # Only opens the session: OPA may come up after the gateway, and until it answers every
        # decision is a deny with error_code policy_error.
        if not self._started:
            await self._client._init_session()
            self._started = True

    async def close(self) -> None:
        if self._started:
            self._started = False
            await self._client.close_connection()

    async def evaluate(self, entrypoint: str, policy_input: Any) -> tuple[bool, Any]:
        if not self._started:
            raise PolicyError("the policy engine is not started")
        try:
            async with asyncio.timeout(self.timeout):
                answer = await self._client.query_rule(input_data=policy_input, package_path=entrypoint)
        except TimeoutError:
            raise PolicyEvalError(f"OPA did not answer within {self.timeout:.3f}s") from None
        except aiohttp.ClientResponseError as exc:
            if exc.status in (401, 403):
                raise PolicyEvalError(f"OPA refused the gateway's credentials (HTTP {exc.status}): "
                                      f"check policy.opa_token and OPA's system.authz") from None
            raise PolicyEvalError(f"OPA answered HTTP {exc.status} for {entrypoint}") from None
        except aiohttp.ClientError as exc:
            raise PolicyEvalError(f"OPA unreachable at {self.url}: {type(exc).__name__}: {exc}") from None
        except ValueError as exc:  # a body that is not JSON
            raise PolicyEvalError(f"OPA answered something that is not JSON: {exc}") from None
        except TypeError as exc:  # the input holds a value json.dumps cannot encode
            raise PolicyInputError(f"policy input is not JSON: {exc}") from None
        if not isinstance(answer, dict):
            raise PolicyEvalError(f"OPA answered a {type(answer).__name__}, expected an object")
        if "result" not in answer:
            return False, None
        return True, answer["result"]
