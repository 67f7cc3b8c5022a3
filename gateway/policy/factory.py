"""The factory that picks a policy backend from config.

Apart from the interface (``gateway.policy.engine``) because it imports the backends, and they
import the interface.
"""

from __future__ import annotations

from gateway.config import ConfigError, PolicyConfig, secret_value
from gateway.policy.embedded import EmbeddedEngine
from gateway.policy.engine import DEFAULT_OPA_TIMEOUT_SECONDS, DEFAULT_RELOAD_INTERVAL_SECONDS, PolicyEngine
from gateway.policy.errors import PolicyError
from gateway.policy.opa import OpaEngine


def build_engine(cfg: PolicyConfig, *, reload_interval: float = DEFAULT_RELOAD_INTERVAL_SECONDS,
                 opa_timeout: float = DEFAULT_OPA_TIMEOUT_SECONDS,
                 extra_entrypoints: tuple[str, ...] = ()) -> PolicyEngine:
    """The backend ``cfg.engine`` names. Nothing is loaded or connected until ``start()``."""
    if cfg.engine == "embedded":
        return EmbeddedEngine(cfg.dir, cfg.entrypoint, reload_interval=reload_interval,
                              extra_entrypoints=extra_entrypoints,
                              cache_size=cfg.decision_cache_size,
                              eval_timeout_ms=cfg.eval_timeout_ms, eval_workers=cfg.eval_workers,
                              eval_max_abandoned=cfg.eval_max_abandoned,
                              eval_max_waiting=cfg.eval_max_waiting)
    if cfg.engine == "opa":
        if not cfg.opa_url:
            raise PolicyError("policy.opa_url is required when policy.engine is 'opa'")
        token = None
        if cfg.opa_token is not None:
            try:
                token = secret_value(cfg.opa_token, "policy.opa_token")
            except ConfigError as exc:
                raise PolicyError(str(exc)) from None
        return OpaEngine(cfg.opa_url, cfg.entrypoint, timeout=opa_timeout, token=token)
    raise PolicyError(f"unknown policy engine {cfg.engine!r}: expected 'embedded' or 'opa'")
