"""JSON-RPC over WebSocket and subscriptions, against a real server with a real WS client."""

from __future__ import annotations

import base64
import http.client
import json
import os
import threading
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket

from rpc import (
    CLOSE_SLOW_SUBSCRIBER,
    INVALID_PARAMS,
    SERVER_BUSY,
    SUBSCRIPTION_LIMIT,
    TOPIC_JOBS,
    TOPIC_NEW_HEADS,
    TOPIC_PEERS,
    RpcConfig,
    UnknownTopic,
)
from tests.rpc.conftest import start_harness

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from tests.rpc.conftest import Harness

ws_message_bytes_max = 4 * 1024 * 1024


@asynccontextmanager
async def connect(
    h: Harness,
    *,
    token: str | None = "use-harness",
    query_token: str | None = None,
    queue: int = 64,
) -> AsyncIterator[WebSocketConnection]:
    token = h.token if token == "use-harness" else token
    headers = [(b"Authorization", f"Bearer {token}".encode())] if token is not None else []
    resource = "/ws" if query_token is None else f"/ws?token={query_token}"
    async with open_websocket(
        "127.0.0.1",
        h.port,
        resource,
        use_ssl=False,
        extra_headers=headers,
        message_queue_size=queue,
        max_message_size=ws_message_bytes_max,
        connect_timeout=10,
        disconnect_timeout=10,
    ) as ws:
        try:
            yield ws
        finally:
            # trio-websocket 0.12 never closes a client's TCP stream when the server started
            # the close (4008, 1001): close it here or the socket leaks (ResourceWarning).
            await ws._stream.aclose()


async def upgrade_status(
    h: Harness, *, token: str | None, resource: str = "/ws", host: str | None = None
) -> tuple[int, bytes]:
    """Attempt a WebSocket upgrade by hand and return the HTTP status and body.

    trio-websocket 0.12 leaks its socket when the server refuses the upgrade, so refusals are
    checked with http.client.
    """
    headers = {
        "Host": host or f"127.0.0.1:{h.port}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"

    def attempt() -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", h.port, timeout=10)
        try:
            conn.putrequest("GET", resource, skip_host=True, skip_accept_encoding=True)
            for name, value in headers.items():
                conn.putheader(name, value)
            conn.endheaders()
            response = conn.getresponse()
            try:
                return response.status, response.read() if response.status != 101 else b""
            finally:
                response.close()
        finally:
            conn.close()

    return await trio.to_thread.run_sync(attempt)


async def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll a condition owned by the HTTP thread (no trio event to wait on), bounded in time."""
    with trio.move_on_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 - the state lives on another thread
            await trio.sleep(0.01)
    assert predicate(), f"timed out waiting for: {what}"


class Caller:
    """Sends calls with fresh ids and sorts what comes back into responses and notifications."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.next_id = 0
        self.notifications: list[dict[str, Any]] = []

    async def call(self, method: str, params: Any = None) -> dict[str, Any]:
        self.next_id += 1
        request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": self.next_id}
        if params is not None:
            request["params"] = params
        await self.ws.send_message(json.dumps(request))
        with trio.fail_after(10):
            while True:
                message = json.loads(await self.ws.get_message())
                if message.get("id") == self.next_id:
                    return dict(message)
                self.notifications.append(message)

    async def result(self, method: str, params: Any = None) -> Any:
        reply = await self.call(method, params)
        assert "result" in reply, f"{method} failed: {reply!r}"
        return reply["result"]

    async def next_notification(self) -> dict[str, Any]:
        if self.notifications:
            return self.notifications.pop(0)
        with trio.fail_after(10):
            return dict(json.loads(await self.ws.get_message()))


async def test_calls_and_batches_over_websocket(rpc: Harness) -> None:
    async with connect(rpc) as ws:
        caller = Caller(ws)
        assert await caller.result("node_add", [40, 2]) == 42, "a call over WS"
        await ws.send_message(
            json.dumps(
                [{"jsonrpc": "2.0", "method": "node_add", "params": [i], "id": i} for i in (1, 2)]
            )
        )
        batch = json.loads(await ws.get_message())
        assert sorted(r["result"] for r in batch) == [1, 2], f"a batch over WS: {batch!r}"
        await ws.send_message("not json")
        reply = json.loads(await ws.get_message())
        assert reply["error"]["code"] == -32700, f"parse error over WS: {reply!r}"


async def test_websocket_auth(rpc: Harness) -> None:
    for token in (None, "wrong"):
        status, body = await upgrade_status(rpc, token=token)
        assert status == 401, f"token {token!r}: HTTP {status} {body!r}"
    status, _ = await upgrade_status(rpc, token=None, resource="/ws?token=wrong")
    assert status == 401, f"a wrong ?token= gave HTTP {status}"
    status, _ = await upgrade_status(rpc, token=rpc.token, host="evil.example")
    assert status == 403, f"a foreign Host on /ws gave HTTP {status}"
    status, _ = await upgrade_status(rpc, token=rpc.token)
    assert status == 101, f"a good upgrade gave HTTP {status}"
    async with connect(rpc, token=None, query_token=rpc.token) as ws:
        assert await Caller(ws).result("node_add", [1]) == 1, "the token may come as ?token="


async def test_subscription_delivery_in_order(rpc: Harness) -> None:
    async with connect(rpc) as ws:
        caller = Caller(ws)
        heads = await caller.result("rpc_subscribe", [TOPIC_NEW_HEADS])
        peers = await caller.result("rpc_subscribe", {"topic": TOPIC_PEERS})
        assert isinstance(heads, str) and heads != peers, f"subscription ids: {heads!r} {peers!r}"
        assert rpc.server.publish(TOPIC_JOBS, {"nobody": "listens"}) is False, "no subscriber"
        for height in range(5):
            assert rpc.server.publish(TOPIC_NEW_HEADS, {"height": height}), "publish refused"
        assert rpc.server.publish(TOPIC_PEERS, {"peer": "p1", "event": "connected"})
        got = [await caller.next_notification() for _ in range(6)]
        for n in got:
            assert (n["jsonrpc"], n["method"]) == ("2.0", "subscription"), n
            assert "id" not in n, f"a notification has no id: {n!r}"
        heights = [
            n["params"]["result"]["height"] for n in got if n["params"]["subscription"] == heads
        ]
        assert heights == [0, 1, 2, 3, 4], f"newHeads out of order or lost: {got!r}"
        assert any(n["params"]["subscription"] == peers for n in got), f"no peers event: {got!r}"

        assert await caller.result("rpc_unsubscribe", [heads]) is True, "unsubscribe"
        assert await caller.result("rpc_unsubscribe", [heads]) is False, "second unsubscribe"
        rpc.server.publish(TOPIC_NEW_HEADS, {"height": 5})
        rpc.server.publish(TOPIC_PEERS, {"peer": "p2", "event": "connected"})
        after = await caller.next_notification()
        assert after["params"]["subscription"] == peers, f"unsubscribed topic still sent: {after!r}"
    with pytest.raises(UnknownTopic):
        rpc.server.publish("noSuchTopic", {})


async def test_subscription_errors_and_limits(rpc: Harness) -> None:
    cap = rpc.server.config.subscriptions_per_connection_max
    async with connect(rpc) as ws:
        caller = Caller(ws)
        reply = await caller.call("rpc_subscribe", ["noSuchTopic"])
        assert reply["error"]["code"] == INVALID_PARAMS, reply
        for _ in range(cap):
            await caller.result("rpc_subscribe", [TOPIC_JOBS])
        reply = await caller.call("rpc_subscribe", [TOPIC_JOBS])
        assert reply["error"]["code"] == SUBSCRIPTION_LIMIT, f"subscription {cap + 1}: {reply!r}"
        assert rpc.server.statistics().subscriptions == cap, rpc.server.statistics()
    # Closing the connection removes its subscriptions.
    await wait_until(lambda: rpc.server.statistics().subscriptions == 0, "subscriptions removed")


async def test_websocket_connections_are_bounded(rpc: Harness) -> None:
    cap = rpc.server.config.websocket_connections_max
    async with trio.open_nursery() as nursery:
        opened = 0
        all_open, done = trio.Event(), trio.Event()

        async def hold() -> None:
            nonlocal opened
            async with connect(rpc) as ws:
                assert await Caller(ws).result("node_add", [1]) == 1
                opened += 1
                if opened == cap:
                    all_open.set()
                await done.wait()

        for _ in range(cap):
            nursery.start_soon(hold)
        with trio.fail_after(10):
            await all_open.wait()
        status, body = await upgrade_status(rpc, token=rpc.token)
        assert status == 503, f"connection {cap + 1}: HTTP {status}"
        assert json.loads(body)["error"]["code"] == SERVER_BUSY, body
        done.set()


async def test_slow_subscriber_is_dropped_and_never_blocks(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A subscriber that stops reading is closed with 4008 once its queue overflows; a reading
    subscriber of the same topic gets every event, and publish never waits."""
    # The dropped subscriber reads its backlog (and the close frame) only after the fast one
    # has caught up: give the close handshake room on a loaded machine.
    config = RpcConfig.for_tests().replace(slow_close_timeout_s=60.0)
    rpc = await start_harness(nursery, tmp_path, config)
    pad = "x" * 65536
    async with connect(rpc, queue=1) as slow_ws, connect(rpc) as fast_ws:
        slow, fast = Caller(slow_ws), Caller(fast_ws)
        slow_sub = await slow.result("rpc_subscribe", [TOPIC_NEW_HEADS])
        await fast.result("rpc_subscribe", [TOPIC_NEW_HEADS])
        received: list[int] = []
        progress = trio.Event()

        async def read_fast() -> None:
            nonlocal progress
            while True:
                received.append((await fast.next_notification())["params"]["result"]["n"])
                progress.set()
                progress = trio.Event()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_fast)
            published = 0
            # The slow side's socket buffers hold a few MiB; 2,000 x 64 KiB is far beyond. The
            # publisher keeps pace with the fast reader, never with the slow one.
            with trio.fail_after(60):
                while rpc.server.statistics().subscribers_dropped == 0:
                    assert published < 2000, "the slow subscriber was never dropped"
                    while published - len(received) >= 4:
                        await progress.wait()
                    assert rpc.server.publish(TOPIC_NEW_HEADS, {"n": published, "pad": pad})
                    published += 1
            with trio.fail_after(60):
                while len(received) < published:
                    await progress.wait()
            nursery.cancel_scope.cancel()
        assert received == list(range(published)), "the fast subscriber lost or reordered events"

        seen: list[int] = []

        async def drain_slow() -> None:
            with trio.fail_after(30):
                while True:
                    message = json.loads(await slow_ws.get_message())
                    assert message["params"]["subscription"] == slow_sub, message
                    seen.append(message["params"]["result"]["n"])

        with pytest.raises(ConnectionClosed) as info:
            await drain_slow()
        assert info.value.reason.code == CLOSE_SLOW_SUBSCRIBER, f"close: {info.value.reason}"
        assert seen == list(range(len(seen))), "the slow subscriber got a non-prefix of events"
        assert len(seen) < published, "the slow subscriber cannot have had everything"
        print(f"slow subscriber dropped after {published} events; it had read {len(seen)}")
    assert rpc.server.statistics().subscribers_dropped == 1, rpc.server.statistics()


async def test_oversized_websocket_message_closes_with_1009(rpc: Harness) -> None:
    cap = rpc.server.config.request_body_bytes_max
    async with connect(rpc) as ws:
        await ws.send_message(
            json.dumps({"jsonrpc": "2.0", "method": "node_echo", "params": ["x" * cap], "id": 1})
        )
        with pytest.raises(ConnectionClosed) as info:
            await read_with_deadline(ws)
        assert info.value.reason.code == 1009, f"close: {info.value.reason}"


async def read_with_deadline(ws: WebSocketConnection) -> str | bytes:
    with trio.fail_after(10):
        return await ws.get_message()


async def test_shutdown_closes_websockets_with_1001(tmp_path: Path) -> None:
    async with trio.open_nursery() as server_nursery:
        h = await start_harness(server_nursery, tmp_path)
        async with connect(h) as ws:
            caller = Caller(ws)
            await caller.result("rpc_subscribe", [TOPIC_PEERS])
            server_nursery.cancel_scope.cancel()
            with pytest.raises(ConnectionClosed) as info:
                await read_with_deadline(ws)
            assert info.value.reason.code == 1001, f"close on shutdown: {info.value.reason}"
    threads = [t for t in threading.enumerate() if t.name == "rpc-http"]
    assert threads == [], "the HTTP thread must be joined after shutdown"
