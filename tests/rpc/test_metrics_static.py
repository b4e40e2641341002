"""GET /metrics and the dashboard's static files on a bare RpcServer (no node behind it)."""

from __future__ import annotations

import http.client
from pathlib import Path

import trio

from rpc import MethodRegistry, Result, RpcConfig, RpcServer
from tests.rpc.conftest import Harness

METRICS_TEXT = "# HELP x_total A test counter.\n# TYPE x_total counter\nx_total 3.0\n"


def raw_get(port: int, path: str, headers: dict[str, str]) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


async def get(
    port: int, path: str, token: str | None = None, host: str | None = None
) -> tuple[int, str, bytes]:
    headers = {"Host": host or f"127.0.0.1:{port}"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return await trio.to_thread.run_sync(raw_get, port, path, headers)


async def test_metrics_are_served_from_admin_metrics_behind_the_token(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    registry = MethodRegistry()
    scrapes = 0

    @registry.method("admin_metrics", description="Test metrics.", result=Result("string"))
    async def metrics() -> str:
        nonlocal scrapes
        scrapes += 1
        return METRICS_TEXT

    server = RpcServer.for_home(registry, tmp_path, config=RpcConfig.for_tests())
    port = await nursery.start(server.run)
    token = (tmp_path / "rpc.cookie").read_text()

    status, content_type, body = await get(port, "/metrics", token)
    assert status == 200
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert body.decode() == METRICS_TEXT
    assert (await get(port, "/metrics"))[0] == 401
    assert (await get(port, "/metrics", "wrong"))[0] == 401
    assert (await get(port, "/metrics", token, host="evil.example"))[0] == 403
    assert scrapes == 1, "refused scrapes must not run the collector"
    assert server.statistics().calls_by_method == {("admin_metrics", "ok"): 1}


async def test_no_metrics_method_is_404(rpc: Harness) -> None:
    assert (await get(rpc.port, "/metrics", rpc.token))[0] == 404


async def test_calls_are_counted_by_method_and_result(rpc: Harness) -> None:
    await rpc.post_json({"jsonrpc": "2.0", "id": 1, "method": "node_add", "params": [1, 2]})
    await rpc.post_json({"jsonrpc": "2.0", "id": 2, "method": "node_add", "params": ["x"]})
    await rpc.post_json({"jsonrpc": "2.0", "id": 3, "method": "node_fail"})
    by_method = rpc.server.statistics().calls_by_method
    assert by_method[("node_add", "ok")] == 1
    assert by_method[("node_fail", "-32603")] == 1
    # Invalid params are refused before a handler runs: not a call of the method.
    assert ("node_add", "-32602") not in by_method


async def test_dashboard_files_need_no_token_but_a_loopback_host(rpc: Harness) -> None:
    status, content_type, body = await get(rpc.port, "/")
    assert status == 200 and content_type == "text/html; charset=utf-8"
    assert b'<script src="/static/app.js">' in body
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        status, content_type, _ = await get(rpc.port, f"/static/{name}")
        assert status == 200 and content_type.startswith(kind), (name, content_type)
    for path in ("/static/nope.js", "/static/..%2F_app.py", "/static/%2e%2e/_app.py"):
        assert (await get(rpc.port, path))[0] == 404, path
    assert (await get(rpc.port, "/", host="evil.example"))[0] == 403
