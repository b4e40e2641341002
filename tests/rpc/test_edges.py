"""The edges of issue 11: non-finite numbers, slow or half-open connections, foreign origins."""

from __future__ import annotations

import json

import pytest
import trio

from rpc import FORBIDDEN, PARSE_ERROR
from tests.rpc.conftest import Harness

close_wait_s = 15.0
"""How long a test waits for the server to act on a timeout (2 s in ``for_tests``)."""


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","method":"node_echo","params":[1],"id":1e400}',
        b'{"jsonrpc":"2.0","method":"node_echo","params":[-1e400],"id":1}',
        b'{"jsonrpc":"2.0","method":"node_echo","params":{"value":NaN},"id":1}',
        b'[{"jsonrpc":"2.0","method":"node_echo","params":[-Infinity],"id":1}]',
    ],
)
async def test_non_finite_numbers_are_parse_errors(rpc: Harness, body: bytes) -> None:
    status, raw = await rpc.post(body)
    assert status == 200, f"{body!r} gave HTTP {status}: {raw!r}"
    reply = json.loads(raw)
    assert reply["error"]["code"] == PARSE_ERROR, reply
    assert reply["id"] is None, reply


async def test_the_nodes_own_origin_is_allowed(rpc: Harness) -> None:
    for origin in (f"http://127.0.0.1:{rpc.port}", f"http://localhost:{rpc.port}"):
        status, raw = await rpc.post(
            {"jsonrpc": "2.0", "method": "node_add", "params": [1], "id": 1},
            headers={"Origin": origin},
        )
        assert status == 200, f"Origin {origin} gave HTTP {status}: {raw!r}"


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "null",
        "https://127.0.0.1:{port}",
        "http://127.0.0.1:1",
        "http://127.0.0.1",
        "http://127.0.0.1:{port}.evil.example",
        "http://evil.example:{port}",
        "",
    ],
)
async def test_foreign_origins_are_forbidden(rpc: Harness, origin: str) -> None:
    origin = origin.format(port=rpc.port)
    status, raw = await rpc.post(
        {"jsonrpc": "2.0", "method": "node_add", "params": [1], "id": 1},
        headers={"Origin": origin},
    )
    assert status == 403, f"Origin {origin!r} gave HTTP {status}: {raw!r}"
    assert json.loads(raw)["error"]["code"] == FORBIDDEN


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    received = b""
    with trio.fail_after(close_wait_s):
        while chunk := await stream.receive_some(65536):
            received += chunk
    return received


async def test_a_half_open_connection_is_closed(rpc: Harness) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", rpc.port)
    async with stream:
        await stream.send_all(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finishes
        assert await read_until_closed(stream) == b"", "closed without an answer"


async def test_a_stalled_body_gets_408_and_frees_its_slot(rpc: Harness) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", rpc.port)
    async with stream:
        await stream.send_all(
            b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {rpc.token}\r\n".encode()
            + b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"jsonrpc"'
        )
        answer = await read_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert rpc.server.statistics().body_timeouts == 1
    assert await rpc.call("node_add", [1]) == 1
