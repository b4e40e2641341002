"""JSON-RPC 2.0 over HTTP POST, on a real server on loopback: every error code and the limits."""

from __future__ import annotations

import http.client
import json
import logging
from typing import TYPE_CHECKING, Any

import pytest
import trio

from rpc import (
    CALL_TIMEOUT,
    FORBIDDEN,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NOT_SUPPORTED,
    PARSE_ERROR,
    SERVER_BUSY,
    UNAUTHORIZED,
    RpcCallError,
    RpcClient,
    RpcConfig,
)
from tests.rpc.conftest import APP_ERROR_CODE, SECRET_DETAIL, Harness, start_harness

if TYPE_CHECKING:
    from pathlib import Path


def req(method: str, params: Any = None, id: Any = 1) -> dict[str, Any]:
    request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        request["params"] = params
    return request


def error_code(reply: Any) -> int:
    assert isinstance(reply, dict), f"expected a response object: {reply!r}"
    assert "error" in reply, f"expected an error response: {reply!r}"
    code = reply["error"]["code"]
    assert isinstance(code, int), f"error code is not an integer: {reply!r}"
    return code


async def test_call_by_position_and_by_name(rpc: Harness) -> None:
    assert await rpc.call("node_add", [2, 3]) == 5, "positional params were not mapped in order"
    assert await rpc.call("node_add", {"b": 4, "a": 1}) == 5, "named params were not mapped"
    assert await rpc.call("node_add", [7]) == 7, "an optional param left out should default"
    assert await rpc.call("node_add", [7, None]) == 7, "null for an optional param means absent"
    status, reply = await rpc.post_json(req("node_echo", {"value": {"x": [1, "two", None]}}, "s"))
    assert status == 200, f"HTTP {status}"
    assert reply == {"jsonrpc": "2.0", "id": "s", "result": {"x": [1, "two", None]}}, reply


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ([], "missing required param 'a'"),
        ({"b": 1}, "missing required param 'a'"),
        ({"a": 1, "c": 2}, "unknown param 'c'"),
        ([1, 2, 3], "too many params"),
        (["1"], "param 'a' must be of type integer"),
        ([True], "param 'a' must be of type integer"),
        ({"a": 1.5}, "param 'a' must be of type integer"),
        ({"a": 1, "b": "x"}, "param 'b' must be of type integer"),
    ],
)
async def test_invalid_params_name_the_param(rpc: Harness, params: Any, needle: str) -> None:
    status, reply = await rpc.post_json(req("node_add", params))
    assert status == 200, f"HTTP {status}"
    assert error_code(reply) == INVALID_PARAMS, reply
    assert needle in reply["error"]["message"], f"message should say {needle!r}: {reply!r}"
    assert reply["id"] == 1, f"the id must be echoed: {reply!r}"


async def test_parse_error(rpc: Harness) -> None:
    for body in (b'{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]', b"\xff\xfe", b""):
        status, raw = await rpc.post(body)
        reply = json.loads(raw)
        assert status == 200, f"HTTP {status} for {body!r}"
        assert error_code(reply) == PARSE_ERROR, f"{body!r}: {reply!r}"
        assert reply["id"] is None, f"a parse error has a null id: {reply!r}"


async def test_parse_error_for_non_json_constants_and_deep_nesting(rpc: Harness) -> None:
    for body in (b"NaN", b'{"jsonrpc":"2.0","method":"node_echo","params":[Infinity],"id":1}'):
        _, raw = await rpc.post(body)
        assert error_code(json.loads(raw)) == PARSE_ERROR, f"{body!r} is not JSON"
    deep = b"[" * 30_000 + b"]" * 30_000
    status, raw = await rpc.post(deep)
    assert status == 200, f"deep nesting gave HTTP {status}"
    assert error_code(json.loads(raw)) == PARSE_ERROR, raw[:200]


@pytest.mark.parametrize(
    "body",
    [
        1,
        "a string",
        {"jsonrpc": "2.0", "method": 1, "params": "bar"},
        {"jsonrpc": "1.0", "method": "node_add", "id": 1},
        {"method": "node_add", "id": 1},
        {"jsonrpc": "2.0", "method": "node_add", "params": "x", "id": 1},
        {"jsonrpc": "2.0", "method": "node_add", "id": {"an": "object"}},
        {"jsonrpc": "2.0", "method": "node_add", "id": True},
    ],
)
async def test_invalid_request(rpc: Harness, body: Any) -> None:
    status, raw = await rpc.post(json.dumps(body).encode())
    reply = json.loads(raw)
    assert status == 200, f"HTTP {status}"
    assert error_code(reply) == INVALID_REQUEST, f"{body!r}: {reply!r}"


async def test_method_not_found(rpc: Harness) -> None:
    status, reply = await rpc.post_json(req("node_nope"))
    assert status == 200, f"HTTP {status}"
    assert error_code(reply) == METHOD_NOT_FOUND, reply
    assert "node_nope" in reply["error"]["message"], reply
    _, reply = await rpc.post_json(req("x" * 5000))
    assert len(reply["error"]["message"]) < 200, "a long method name must not be echoed whole"


async def test_internal_error_hides_the_traceback(
    rpc: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="rpc"):
        status, raw = await rpc.post(req("node_fail"))
    reply = json.loads(raw)
    assert status == 200, f"HTTP {status}"
    assert error_code(reply) == INTERNAL_ERROR, reply
    assert SECRET_DETAIL.encode() not in raw, f"the exception text leaked: {raw!r}"
    assert b"Traceback" not in raw, f"a traceback leaked: {raw!r}"
    assert any(r.exc_info and SECRET_DETAIL in str(r.exc_info[1]) for r in caplog.records), (
        "the traceback should be logged on the server"
    )
    _, reply = await rpc.post_json(req("node_badResult"))
    assert error_code(reply) == INTERNAL_ERROR, f"an unserialisable result: {reply!r}"


async def test_application_error_carries_code_message_and_data(rpc: Harness) -> None:
    with pytest.raises(RpcCallError) as info:
        await rpc.call("node_appError")
    assert (info.value.code, info.value.message) == (APP_ERROR_CODE, "not today"), info.value
    assert info.value.data == {"reason": "testing"}, info.value.data


async def test_call_timeout(nursery: trio.Nursery, tmp_path: Path) -> None:
    h = await start_harness(nursery, tmp_path, RpcConfig.for_tests().replace(call_timeout_s=0.2))
    with pytest.raises(RpcCallError) as info:
        await h.call("node_wait")
    assert info.value.code == CALL_TIMEOUT, info.value
    assert h.gate.inside == 0, "the timed-out handler should have been cancelled"


async def test_subscribe_over_http_is_not_supported(rpc: Harness) -> None:
    _, reply = await rpc.post_json(req("rpc_subscribe", ["newHeads"]))
    assert error_code(reply) == NOT_SUPPORTED, reply


async def test_notification_runs_and_gets_no_response(rpc: Harness) -> None:
    status, raw = await rpc.post({"jsonrpc": "2.0", "method": "job_record", "params": ["one"]})
    assert (status, raw) == (204, b""), f"a notification got an answer: {status} {raw!r}"
    await rpc.recorder.wait_for(1)
    assert rpc.recorder.values == ["one"], rpc.recorder.values
    # Even a notification that fails is not answered.
    status, raw = await rpc.post({"jsonrpc": "2.0", "method": "node_nope"})
    assert (status, raw) == (204, b""), f"a failed notification got an answer: {raw!r}"


async def test_batch_mixed(rpc: Harness) -> None:
    batch = [
        req("node_add", [1, 2], "a"),
        {"jsonrpc": "2.0", "method": "job_record", "params": ["n"]},
        req("node_nope", None, "b"),
        {"foo": "boo"},
        req("node_add", {"a": "x"}, "c"),
        req("node_echo", ["v"], "d"),
    ]
    status, reply = await rpc.post_json(batch)
    assert status == 200, f"HTTP {status}"
    assert isinstance(reply, list), f"a batch is answered with an array: {reply}"
    assert len(reply) == 5, f"one answer per non-notification: {reply}"
    by_id = {r["id"]: r for r in reply}
    assert by_id["a"]["result"] == 3, reply
    assert error_code(by_id["b"]) == METHOD_NOT_FOUND, reply
    assert error_code(by_id[None]) == INVALID_REQUEST, reply
    assert error_code(by_id["c"]) == INVALID_PARAMS, reply
    assert by_id["d"]["result"] == "v", reply
    await rpc.recorder.wait_for(1)


async def test_batch_limits(rpc: Harness) -> None:
    status, reply = await rpc.post_json([])
    assert status == 200, f"empty batch: HTTP {status}"
    assert not isinstance(reply, list), f"an empty batch gets one error, not an array: {reply!r}"
    assert error_code(reply) == INVALID_REQUEST, reply
    _, reply = await rpc.post_json([1, 2, 3])
    assert [error_code(r) for r in reply] == [INVALID_REQUEST] * 3, reply
    cap = rpc.server.config.batch_calls_max
    _, reply = await rpc.post_json([req("node_add", [i], i) for i in range(cap)])
    assert sorted(r["result"] for r in reply) == list(range(cap)), "a full batch must be served"
    _, reply = await rpc.post_json([req("node_add", [i], i) for i in range(cap + 1)])
    assert not isinstance(reply, list), f"an oversized batch gets one error: {reply!r}"
    assert error_code(reply) == INVALID_REQUEST, reply
    assert "cap" in reply["error"]["message"], reply


async def test_all_notification_batch_is_204(rpc: Harness) -> None:
    batch = [{"jsonrpc": "2.0", "method": "job_record", "params": [i]} for i in range(3)]
    status, raw = await rpc.post(batch)
    assert (status, raw) == (204, b""), f"all-notification batch: {status} {raw!r}"
    await rpc.recorder.wait_for(3)
    assert sorted(rpc.recorder.values) == [0, 1, 2], rpc.recorder.values


@pytest.mark.parametrize("token", [None, "", "wrong", "x" * 43])
async def test_missing_or_wrong_token_is_401(rpc: Harness, token: str | None) -> None:
    status, raw = await rpc.post(req("node_add", [1]), token=token)
    assert status == 401, f"token {token!r} gave HTTP {status}"
    assert error_code(json.loads(raw)) == UNAUTHORIZED, raw
    assert rpc.recorder.values == [], "nothing may run unauthenticated"


async def test_basic_auth_scheme_is_refused(rpc: Harness) -> None:
    status, _ = await rpc.post(
        req("node_add", [1]), token=None, headers={"Authorization": f"Basic {rpc.token}"}
    )
    assert status == 401, f"a non-Bearer scheme gave HTTP {status}"


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost:1234", "LOCALHOST", "[::1]", "[::1]:80", "127.0.0.1:8545"]
)
async def test_loopback_host_names_are_accepted(rpc: Harness, host: str) -> None:
    status, raw = await rpc.post(req("node_add", [1]), host=host)
    assert status == 200, f"Host {host!r} gave HTTP {status}: {raw!r}"


@pytest.mark.parametrize(
    "host",
    [
        "",
        "evil.example",
        "evil.example:80",
        "127.0.0.1.evil.example",
        "localhost:x",
        "127.0.0.2",
        "[::2]",
        "localhost.",
        "0.0.0.0",
    ],
)
async def test_other_host_names_are_forbidden(rpc: Harness, host: str | None) -> None:
    status, raw = await rpc.post(req("node_add", [1]), host=host)
    assert status == 403, f"Host {host!r} gave HTTP {status}: {raw!r}"
    assert error_code(json.loads(raw)) == FORBIDDEN, raw


async def test_missing_host_is_refused(rpc: Harness) -> None:
    # HTTP/1.1 requires Host; aiohttp's parser refuses its absence before our check runs.
    status, _ = await rpc.post(req("job_record", [1]), host=None)
    assert status in (400, 403), f"a request without Host gave HTTP {status}"
    assert rpc.recorder.values == [], "nothing may run without a Host header"


async def test_body_cap_is_413(rpc: Harness) -> None:
    cap = rpc.server.config.request_body_bytes_max
    padding = "x" * (cap - 100)
    status, reply = await rpc.post_json(req("node_echo", [padding]))
    assert (status, reply.get("result")) == (200, padding), "a body under the cap must be served"
    status, raw = await rpc.post(req("node_echo", ["x" * cap]))
    assert status == 413, f"a body over the cap gave HTTP {status}"
    assert error_code(json.loads(raw)) == INVALID_REQUEST, raw


async def test_chunked_body_over_the_cap_is_413(rpc: Harness) -> None:
    cap = rpc.server.config.request_body_bytes_max
    small = json.dumps(req("node_add", [1])).encode()
    status, raw = await _post_chunked(rpc, small)
    assert status == 200, f"chunked body: {status} {raw!r}"
    assert json.loads(raw)["result"] == 1, f"chunked body: {raw!r}"
    # No Content-Length to check up front: the cap must hold while the body is read.
    status, _ = await _post_chunked(rpc, json.dumps(req("node_echo", ["x" * cap])).encode())
    assert status == 413, f"a chunked body over the cap gave HTTP {status}"


async def _post_chunked(rpc: Harness, body: bytes) -> tuple[int, bytes]:
    def post() -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", rpc.port, timeout=10)
        try:
            conn.request(
                "POST",
                "/",
                body=iter([body[i : i + 4096] for i in range(0, len(body), 4096)]),
                headers={"Authorization": f"Bearer {rpc.token}"},
                encode_chunked=True,
            )
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    return await trio.to_thread.run_sync(post)


async def test_requests_in_flight_are_bounded(rpc: Harness) -> None:
    limit = rpc.server.config.requests_in_flight_max
    async with trio.open_nursery() as nursery:
        for _ in range(limit):
            nursery.start_soon(rpc.call, "node_wait")
        await rpc.gate.wait_inside(limit)
        status, raw = await rpc.post(req("node_add", [1]))
        assert status == 503, f"request {limit + 1} should be refused at once, got HTTP {status}"
        assert error_code(json.loads(raw)) == SERVER_BUSY, raw
        rpc.gate.opened.set()
    assert await rpc.call("node_add", [1]) == 1, "the server must serve again once calls finish"
    assert rpc.server.statistics().rejected_busy == 1, rpc.server.statistics()


async def test_only_post_slash(rpc: Harness) -> None:
    status, _ = await rpc.post(req("node_add", [1]), path="/other")
    assert status == 404, f"POST /other gave HTTP {status}"


async def test_client_batch_and_notify(rpc: Harness) -> None:
    client = rpc.client()
    results = await trio.to_thread.run_sync(
        client.batch, [("node_add", [1, 2]), ("node_nope", None), ("node_echo", {"value": "v"})]
    )
    assert results[0] == 3, results
    assert isinstance(results[1], RpcCallError), f"a failed entry is returned: {results!r}"
    assert results[1].code == METHOD_NOT_FOUND, results[1]
    assert results[2] == "v", results
    await trio.to_thread.run_sync(client.notify, "job_record", ["by-notify"])
    await rpc.recorder.wait_for(1)
    assert rpc.recorder.values == ["by-notify"], rpc.recorder.values


async def test_client_surfaces_http_refusals_as_call_errors(rpc: Harness) -> None:
    client = RpcClient(f"http://127.0.0.1:{rpc.port}/", "wrong-token", timeout_s=5)
    with pytest.raises(RpcCallError) as info:
        await trio.to_thread.run_sync(client.call, "node_add", [1])
    assert info.value.code == UNAUTHORIZED, info.value
