"""Compile-check a policy folder in a child process before the serving process builds it.

rego-cpp 1.5.2 aborts the whole process (an uncaught ``std::runtime_error``, a segfault) on some
policies, e.g. ``with input as x``. A crash in a throw-away child costs nothing; the same crash in
ext_authz would take every in-flight request with it. The child builds the bundle with the
serving entrypoints and evaluates each once with an empty input, so a policy that crashes only
when queried is caught too.

The child then runs the error-level checks of ``mcp-gateway policy check``
(``gateway.policy.static``: OPA's strict compile of every module, tests included, and undefined
data paths), so a policy the check refuses never serves: rego-cpp compiles a misspelt rule name
or an unbound variable as "undefined", which can quietly switch a condition off.

    python -m gateway.policy.check DIR ENTRYPOINT [ENTRYPOINT ...]   (exit 0: safe to build)
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.policy.errors import PolicyCompileError, PolicyError
from gateway.policy.rego import CompiledPolicy, load_sources
from gateway.policy.static import check_sources, describe, errors

DEFAULT_CHECK_TIMEOUT_SECONDS = 30.0
_MAX_STDERR = 64 * 1024
# The folder holding the ``gateway`` package: the child must import this very code, whatever
# the caller's working directory.
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


def check(policy_dir: str, entrypoints: Sequence[str]) -> None:
    """Build and query once in this process, then check statically; raises PolicyError (or
    crashes, which is the point)."""
    sources = load_sources(policy_dir, include_tests=True)
    compiled = CompiledPolicy(sources, entrypoints)  # the serving modules: tests left out
    for ep in compiled.entrypoints:
        try:
            compiled.evaluate(ep, {})
        except PolicyError:
            pass  # a runtime error on an empty input is the policy's business, not a crash
    # After the build: what rego-cpp refuses keeps its own file:line:col message.
    refused = errors(check_sources(sources, compiled.entrypoints[0],
                                   extra_entrypoints=compiled.entrypoints[1:], serving_compile=False))
    if refused:
        raise PolicyCompileError("the policy fails `mcp-gateway policy check`:\n"
                                 + "\n".join(map(describe, refused)))


async def check_in_subprocess(policy_dir: str, entrypoints: Sequence[str], *,
                              limit_seconds: float = DEFAULT_CHECK_TIMEOUT_SECONDS) -> None:
    """Raise PolicyCompileError unless a child process builds and queries the policy cleanly."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH")) if p)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.policy.check", os.fspath(policy_dir), *entrypoints,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=env)
    try:
        async with asyncio.timeout(limit_seconds):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise PolicyCompileError(f"the policy check did not finish within {limit_seconds:g} s") from None
    finally:
        if proc.returncode is None:  # cancelled: leave no child behind
            proc.kill()
            await proc.wait()
    detail = err[-_MAX_STDERR:].decode("utf-8", "replace").strip()
    if proc.returncode == 0:
        return
    if proc.returncode is not None and proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        raise PolicyCompileError(f"the policy crashes rego-cpp ({name}): {detail[-500:]}")
    raise PolicyCompileError(detail or f"the policy check failed (exit {proc.returncode})")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print("usage: python -m gateway.policy.check DIR ENTRYPOINT [ENTRYPOINT ...]", file=sys.stderr)
        return 2
    try:
        check(args[0], args[1:])
    except PolicyError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
