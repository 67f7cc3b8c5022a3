"""The web console (docs/console.md): server-rendered pages for security and operations teams,
served behind Envoy at ``<public_url>/console``.

Modules by concern: ``settings`` (one typed object from the config and the command line),
``auth`` (token verification, the console's Rego decision, sessions and CSRF), ``web``
(security headers, the session and CSRF middlewares), ``views`` (the pages), ``envoy_stats``
(health, rate, errors and latency from Envoy's admin interface), ``audit_search`` (bounded
reads of the audit trail), ``matrix`` (who may call what, from the policy) and ``app`` (wiring
and the process's lifecycle)."""
