"""What every command module shares: the common arguments, the RPC call, output, parsing.

Command modules import this one and nothing of each other's.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node._home import DEFAULT_HOME, Home
from node.exceptions import NodeError

if TYPE_CHECKING:
    import argparse
    from collections.abc import AsyncIterator, Callable

    from trio_websocket import WebSocketConnection

    from rpc import RpcClient

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]
    Command = Callable[[argparse.Namespace], int]

subscribe_timeout_s = 10.0
"""How long a WebSocket subscription may take to open and be confirmed."""
event_message_bytes_max = 4 * 1024 * 1024
"""The largest event the CLI accepts on a subscription (the server's are far smaller)."""


def add_home_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--home",
        type=Path,
        default=Path(os.environ.get("GPUMESH_HOME", str(DEFAULT_HOME))),
        help="node home directory (default: $GPUMESH_HOME or ~/.gpumesh)",
    )


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as one JSON document")


def add_command(
    sub: Subparsers, name: str, run: Command, *, help: str, home: bool = True, json: bool = True
) -> argparse.ArgumentParser:
    """A subcommand whose handler is ``run``; with ``--home`` and ``--json`` unless told not."""
    p = sub.add_parser(name, help=help, description=help)
    if home:
        add_home_arg(p)
    if json:
        add_json_arg(p)
    p.set_defaults(run=run)
    return p


def client(home: Path, *, timeout_s: float = 10.0) -> RpcClient:
    from rpc import RpcClient

    try:
        return RpcClient.from_home(Home(home).root, timeout_s=timeout_s)
    except FileNotFoundError:
        raise NodeError(f"no running node at {home} (start it with `gpumesh run`)") from None


def call(home: Path, method: str, params: Any = None, *, timeout_s: float = 10.0) -> Any:
    """Call ``method`` on the node at ``home``; any failure becomes a NodeError that says so."""
    from rpc import RpcCallError

    c = client(home, timeout_s=timeout_s)
    try:
        return c.call(method, params)
    except RpcCallError as exc:
        raise NodeError(f"{method}: {exc}") from None
    except OSError as exc:
        raise NodeError(f"cannot reach the node at {home}: {exc}") from None


def emit(args: argparse.Namespace, document: Any, text: str) -> int:
    print(json.dumps(document, indent=2) if args.json else text)
    return 0


def parse_size(text: str) -> int:
    """``24GB`` / ``24G`` / ``512MiB`` / plain bytes -> bytes (GB taken as GiB, as GPUs are)."""
    units = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    number = t.rstrip("KMGT")
    unit = t[len(number) :]
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise NodeError(f"cannot read size {text!r} (try 24GB)") from None


def parse_duration_ms(text: str) -> int:
    """``90s`` / ``10m`` / ``500ms`` / ``2h`` / plain seconds -> milliseconds."""
    units = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
    t = text.strip().lower()
    for unit in ("ms", "s", "m", "h"):
        if t.endswith(unit) and t[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * units[unit])
    if t.isdigit():
        return int(t) * 1000
    raise NodeError(f"cannot read duration {text!r} (try 90s, 10m, 500ms)")


def endpoint(home: Path) -> tuple[str, str]:
    """The node's ``http://127.0.0.1:PORT`` origin and its bearer token, from the home's files."""
    h = Home(home)
    try:
        port = int(h.port_path.read_text().strip())
        token = h.cookie_path.read_text().strip()
    except (FileNotFoundError, ValueError):
        raise NodeError(f"no running node at {home} (start it with `gpumesh run`)") from None
    return f"http://127.0.0.1:{port}", token


class Subscription:
    """One confirmed subscription on a node's WebSocket; ``next()`` waits for its next event."""

    def __init__(self, ws: WebSocketConnection, subscription: str, topic: str) -> None:
        self._ws = ws
        self._subscription = subscription
        self.topic = topic

    async def next(self) -> dict[str, Any]:
        from trio_websocket import ConnectionClosed

        while True:
            try:
                message = json.loads(await self._ws.get_message())
            except ConnectionClosed as exc:
                raise NodeError(f"the node closed the {self.topic} subscription: {exc}") from None
            params = message.get("params") if isinstance(message, dict) else None
            if isinstance(params, dict) and params.get("subscription") == self._subscription:
                result: dict[str, Any] = params["result"]
                return result


@contextlib.asynccontextmanager
async def open_subscription(home: Path, topic: str) -> AsyncIterator[Subscription]:
    """Subscribe to ``topic`` on the node at ``home`` (in a trio run).

    The subscription is confirmed before this yields, so whatever the caller does inside the
    block cannot race past its own events.
    """
    import trio
    from trio_websocket import HandshakeError, open_websocket_url

    origin, token = endpoint(home)
    url = "ws" + origin.removeprefix("http") + "/ws"
    headers = [(b"Authorization", f"Bearer {token}".encode())]
    try:
        async with open_websocket_url(
            url, extra_headers=headers, max_message_size=event_message_bytes_max
        ) as ws:
            with trio.fail_after(subscribe_timeout_s):
                request = {"jsonrpc": "2.0", "id": 1, "method": "rpc_subscribe", "params": [topic]}
                await ws.send_message(json.dumps(request))
                answer = json.loads(await ws.get_message())
            if "error" in answer:
                raise NodeError(f"cannot subscribe to {topic}: {answer['error'].get('message')}")
            yield Subscription(ws, answer["result"], topic)
    except (OSError, HandshakeError) as exc:
        raise NodeError(f"cannot reach the node at {home}: {exc}") from None
