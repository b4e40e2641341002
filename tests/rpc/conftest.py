"""Fixtures for the rpc tests: a real RpcServer on loopback with a small registry of methods."""

from __future__ import annotations

import dataclasses
import http.client
import json
from pathlib import Path
from typing import Any

import pytest
import trio

from rpc import MethodRegistry, Param, Result, RpcClient, RpcConfig, RpcError, RpcServer

APP_ERROR_CODE = 4321
SECRET_DETAIL = "secret-traceback-detail"


class Gate:
    """Holds ``node_wait`` handlers until opened; counts how many are inside."""

    def __init__(self) -> None:
        self.opened = trio.Event()
        self.inside = 0
        self.changed = trio.Event()

    async def hold(self) -> None:
        self.inside += 1
        self.changed.set()
        self.changed = trio.Event()
        try:
            await self.opened.wait()
        finally:
            self.inside -= 1

    async def wait_inside(self, count: int, timeout_s: float = 10.0) -> None:
        with trio.fail_after(timeout_s):
            while self.inside < count:
                await self.changed.wait()


class Recorder:
    """What notification handlers saw, with an event per value so tests wait, not sleep."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.changed = trio.Event()

    def add(self, value: Any) -> None:
        self.values.append(value)
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, count: int, timeout_s: float = 10.0) -> None:
        with trio.fail_after(timeout_s):
            while len(self.values) < count:
                await self.changed.wait()


def make_registry(recorder: Recorder, gate: Gate) -> MethodRegistry:
    registry = MethodRegistry()

    @registry.method("node_wait", description="Waits until the test opens the gate.")
    async def wait() -> bool:
        await gate.hold()
        return True

    @registry.method(
        "node_echo",
        description="Returns its argument.",
        params=[Param("value", "any", True, "Anything.")],
        result=Result("any", "The same value."),
    )
    async def echo(value: Any) -> Any:
        return value

    @registry.method(
        "node_add",
        description="Adds two integers.",
        params=[Param("a", "integer"), Param("b", "integer", required=False)],
        result=Result("integer", "a + b"),
    )
    async def add(a: int, b: int = 0) -> int:
        return a + b

    @registry.method("node_fail", description="Raises an unexpected error.")
    async def fail() -> None:
        raise RuntimeError(SECRET_DETAIL)

    @registry.method("node_appError", description="Raises an application RpcError.")
    async def app_error() -> None:
        raise RpcError(APP_ERROR_CODE, "not today", {"reason": "testing"})

    @registry.method("node_badResult", description="Returns something JSON cannot carry.")
    async def bad_result() -> Any:
        return {"value": object()}

    @registry.method(
        "node_sleep",
        description="Sleeps (simulates a slow handler).",
        params=[Param("seconds", "number")],
    )
    async def sleep(seconds: float) -> bool:
        await trio.sleep(seconds)
        return True

    @registry.method(
        "job_record",
        description="Records a value (observes notifications).",
        params=[Param("value", "any")],
    )
    async def record(value: Any) -> bool:
        recorder.add(value)
        return True

    return registry


@dataclasses.dataclass
class Harness:
    server: RpcServer
    home: Path
    token: str
    recorder: Recorder
    gate: Gate

    @property
    def port(self) -> int:
        return self.server.port

    def client(self, timeout_s: float = 10.0) -> RpcClient:
        return RpcClient.from_home(self.home, timeout_s=timeout_s)

    async def call(self, method: str, params: Any = None) -> Any:
        return await trio.to_thread.run_sync(self.client().call, method, params)

    async def post(
        self,
        body: bytes | str | Any,
        *,
        token: str | None = "use-harness",
        host: str | None = "use-default",
        headers: dict[str, str] | None = None,
        path: str = "/",
    ) -> tuple[int, bytes]:
        """POST raw bytes (or JSON of anything else) with full control over Host and auth."""
        if isinstance(body, str):
            data = body.encode()
        elif isinstance(body, bytes):
            data = body
        else:
            data = json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json", "Content-Length": str(len(data))}
        if token == "use-harness":
            token = self.token
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        if host == "use-default":
            host = f"127.0.0.1:{self.port}"
        if host is not None:
            all_headers["Host"] = host
        all_headers.update(headers or {})
        return await trio.to_thread.run_sync(raw_post, self.port, path, data, all_headers)

    async def post_json(self, body: Any) -> tuple[int, Any]:
        status, raw = await self.post(body)
        return status, (json.loads(raw) if raw else None)


def raw_post(port: int, path: str, data: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("POST", path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(data)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


async def start_harness(
    nursery: trio.Nursery, home: Path, config: RpcConfig | None = None
) -> Harness:
    recorder, gate = Recorder(), Gate()
    server = RpcServer.for_home(
        make_registry(recorder, gate), home, config=config or RpcConfig.for_tests()
    )
    await nursery.start(server.run)
    return Harness(server, home, (home / "rpc.cookie").read_text(), recorder, gate)


@pytest.fixture
async def rpc(nursery: trio.Nursery, tmp_path: Path) -> Harness:
    return await start_harness(nursery, tmp_path)
