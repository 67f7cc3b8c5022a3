"""A stdio MCP server with misbehaving tools, for the bridge's failure tests (stdlib only).

Tools: ``noise`` prints a non-JSON line before answering, ``huge`` writes a stdout line over any
sane limit, ``pid`` answers with its process id, ``hang`` never answers, ``exit`` exits at once,
``seen`` answers with the ids of the ``hang`` calls and of the cancellations it received,
``chatty`` sends a log message and tools/list_changed before answering, ``cwd`` answers with
its working directory.
``--exit-at-start`` makes it exit before reading anything (a crash loop), ``--once`` does so on
every start after the first in its working directory; ``--linger`` makes it outlive the end of
its stdin.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

TOOLS = ["noise", "huge", "pid", "hang", "exit", "seen", "chatty", "cwd"]


def send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def text(rid: Any, value: str) -> None:
    send({"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": value}]}})


def main() -> None:
    print("toy server starting", file=sys.stderr, flush=True)
    if "--exit-at-start" in sys.argv:
        sys.exit(2)
    if "--once" in sys.argv:
        if os.path.exists("started"):
            sys.exit(3)
        open("started", "w").close()
    hung: list[Any] = []
    cancelled: list[Any] = []
    for line in sys.stdin:
        msg = json.loads(line)
        method, rid = msg.get("method"), msg.get("id")
        if method == "notifications/cancelled":
            cancelled.append(msg["params"]["requestId"])
        if rid is None:
            continue
        if method == "initialize":
            send({"jsonrpc": "2.0", "id": rid, "result": {
                "protocolVersion": msg["params"]["protocolVersion"], "capabilities": {"tools": {}},
                "serverInfo": {"name": "toy", "version": "1"}}})
        elif method == "tools/list":
            send({"jsonrpc": "2.0", "id": rid, "result": {"tools": [
                {"name": n, "inputSchema": {"type": "object"}} for n in TOOLS]}})
        elif method == "tools/call":
            name = msg["params"]["name"]
            if name == "noise":
                print("this line is not JSON-RPC", flush=True)
                text(rid, "quiet again")
            elif name == "huge":
                sys.stdout.write("x" * (int(os.environ.get("TOY_HUGE", "100000")) + 1))
                sys.stdout.flush()
            elif name == "cwd":
                text(rid, os.getcwd())
            elif name == "pid":
                text(rid, str(os.getpid()))
            elif name == "exit":
                os._exit(7)
            elif name == "chatty":
                send({"jsonrpc": "2.0", "method": "notifications/message",
                      "params": {"level": "info", "logger": "toy", "data": "hello from stdio"}})
                send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
                text(rid, "said it")
            elif name == "seen":
                text(rid, json.dumps({"hung": hung, "cancelled": cancelled}))
            elif name == "hang":
                hung.append(rid)  # and no answer
        elif method == "ping":
            send({"jsonrpc": "2.0", "id": rid, "result": {}})
        else:
            send({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "unknown method"}})


if __name__ == "__main__":
    main()
    if "--linger" in sys.argv:
        time.sleep(600)
