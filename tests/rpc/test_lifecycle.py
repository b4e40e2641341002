"""Start, files, shutdown: the cookie and port files, clean cancellation, the HTTP thread."""

from __future__ import annotations

import os
import stat
import threading
from typing import TYPE_CHECKING

import pytest
import trio

from rpc import (
    SHUTTING_DOWN,
    TOPIC_NEW_HEADS,
    ConfigError,
    MethodRegistry,
    RpcCallError,
    RpcClient,
    RpcConfig,
    RpcServer,
    RpcTransportError,
)
from tests.rpc.conftest import start_harness

if TYPE_CHECKING:
    from pathlib import Path


def rpc_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "rpc-http"]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_files_and_clean_shutdown(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # the cookie must be 0600 whatever the umask
    try:
        async with trio.open_nursery() as nursery:
            h = await start_harness(nursery, tmp_path)
            cookie, port_file = tmp_path / "rpc.cookie", tmp_path / "rpc.port"
            assert mode_of(cookie) == 0o600, f"cookie mode {oct(mode_of(cookie))}"
            assert mode_of(port_file) == 0o644, f"port file mode {oct(mode_of(port_file))}"
            assert len(h.token) >= 43, f"token too short: {len(h.token)} chars"
            assert int(port_file.read_text()) == h.port > 0, "the port file names the bound port"
            assert await h.call("node_add", [1, 1]) == 2, "the from_home client works"
            assert len(rpc_threads()) == 1, "one HTTP thread while running"
            names = await trio.to_thread.run_sync(os.listdir, tmp_path)
            leftovers = [name for name in names if name.endswith(".tmp")]
            assert leftovers == [], f"temp files left behind: {leftovers}"
            nursery.cancel_scope.cancel()
    finally:
        os.umask(old_umask)
    assert not cookie.exists(), "the cookie must be removed on shutdown"
    assert not port_file.exists(), "the port file must be removed on shutdown"
    assert rpc_threads() == [], "the HTTP thread must be joined on shutdown"
    with pytest.raises(FileNotFoundError):
        RpcClient.from_home(tmp_path)
    client = RpcClient(f"http://127.0.0.1:{h.port}/", h.token, timeout_s=5)
    with pytest.raises(RpcTransportError):
        await trio.to_thread.run_sync(client.call, "node_add", [1])


async def test_shutdown_is_prompt_and_answers_calls_in_flight(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    with trio.fail_after(10):  # generous on a loaded CI box; the design target is < 1 s
        async with trio.open_nursery() as nursery:
            h = await start_harness(nursery, tmp_path)

            async def stuck_call() -> None:
                try:
                    await h.call("node_wait")
                except (RpcCallError, RpcTransportError) as exc:
                    errors.append(exc)

            nursery.start_soon(stuck_call)
            await h.gate.wait_inside(1)
            started = trio.current_time()
            h.server.registry  # noqa: B018 - the server object outlives run()
            nursery.cancel_scope.cancel()
        elapsed = trio.current_time() - started
    assert len(errors) == 1, f"the call in flight must be answered, not hang: {errors}"
    error = errors[0]
    assert isinstance(error, RpcCallError), f"expected a JSON-RPC answer, got {error!r}"
    assert error.code == SHUTTING_DOWN, error
    assert rpc_threads() == [], "the HTTP thread must be joined"
    print(f"shutdown with a call in flight took {elapsed * 1000:.0f} ms")


async def test_stale_cookie_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "rpc.cookie").write_text("stale-token-from-a-crash")
    os.chmod(tmp_path / "rpc.cookie", 0o644)
    async with trio.open_nursery() as nursery:
        h = await start_harness(nursery, tmp_path)
        assert h.token != "stale-token-from-a-crash", "a fresh token each start"
        assert mode_of(tmp_path / "rpc.cookie") == 0o600, "the replaced cookie is 0600"
        nursery.cancel_scope.cancel()


async def test_port_in_use_fails_start_and_cleans_up(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with trio.open_nursery() as nursery:
        h = await start_harness(nursery, tmp_path / "a")
        second = RpcServer(MethodRegistry(), port=h.port, cookie_path=tmp_path / "b" / "rpc.cookie")
        with pytest.raises(OSError, match="address already in use"):
            await nursery.start(second.run)
        assert not (tmp_path / "b" / "rpc.cookie").exists(), "a failed start removes its cookie"
        assert await h.call("node_add", [2]) == 2, "the first server is unaffected"
        nursery.cancel_scope.cancel()
    assert rpc_threads() == [], "both HTTP threads must be gone"


async def test_publish_when_not_running_is_a_no_op(tmp_path: Path) -> None:
    server = RpcServer(MethodRegistry(), port=0, cookie_path=tmp_path / "rpc.cookie")
    assert server.publish(TOPIC_NEW_HEADS, {"height": 1}) is False, "nobody can be listening"
    assert server.port == 0, "no port before start"


def test_config_validation() -> None:
    RpcConfig.default()
    RpcConfig.for_tests()
    with pytest.raises(ConfigError, match="batch_calls_max"):
        RpcConfig(batch_calls_max=0)
    with pytest.raises(ConfigError, match="call_timeout_s"):
        RpcConfig(call_timeout_s=-1.0)


async def test_unwritable_cookie_path_fails_start_without_a_thread(tmp_path: Path) -> None:
    server = RpcServer(MethodRegistry(), port=0, cookie_path=tmp_path / "missing" / "rpc.cookie")
    async with trio.open_nursery() as nursery:
        with pytest.raises(FileNotFoundError):
            await nursery.start(server.run)
    assert rpc_threads() == [], "no HTTP thread may be left after a failed start"
