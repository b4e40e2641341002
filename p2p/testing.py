"""Start N meshes in one trio run on loopback, for tests, scripts and benchmarks."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time as _time
from typing import TYPE_CHECKING, Any

import trio

from p2p._identity import peer_id_of, private_key_from_seed
from p2p._mesh import Mesh
from p2p.config import P2PConfig

if TYPE_CHECKING:
    # trio-typing (a py-libp2p dependency) shadows trio's types; TaskStatus lives there.
    from collections.abc import AsyncIterator, Callable, Iterator, Sequence

    from trio_typing import TaskStatus

poll_interval_s = 0.05
node_lines_max = 100_000


def seed_for(index: int, namespace: str = "gpumesh-test") -> bytes:
    """A deterministic 32-byte node seed, so a restarted test node keeps its peer id."""
    return hashlib.sha256(f"{namespace}/{index}".encode()).digest()


async def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout_s``."""
    with trio.move_on_after(timeout_s):
        # A bounded poll for conditions that have no event of their own (e.g. remote state).
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(poll_interval_s)
        return
    raise AssertionError(f"timed out after {timeout_s} s waiting until {what}")


async def start_mesh(
    nursery: trio.Nursery, seed: bytes, chain_id: str, config: P2PConfig
) -> tuple[Mesh, trio.CancelScope]:
    """Start one mesh in ``nursery``; cancel the returned scope to stop just that node."""
    mesh = Mesh(seed, chain_id, config)
    scope = trio.CancelScope()

    async def run(task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await mesh.run(task_status=task_status)

    await nursery.start(run)
    return mesh, scope


@contextlib.asynccontextmanager
async def open_meshes(
    count: int,
    *,
    chain_id: str = "testchain",
    config: P2PConfig | None = None,
    bootstrap_of: Callable[[int], Sequence[int]] | None = None,
    namespace: str = "gpumesh-test",
) -> AsyncIterator[list[Mesh]]:
    """``count`` meshes; node i bootstraps to ``bootstrap_of(i)`` (default: node i-1, a chain).

    Nodes start in index order, so ``bootstrap_of(i)`` may only name nodes below ``i``.
    """
    base = config or P2PConfig.for_tests()
    choose = bootstrap_of or (lambda i: [i - 1] if i > 0 else [])
    meshes: list[Mesh] = []
    async with trio.open_nursery() as nursery:
        for index in range(count):
            targets = list(choose(index))
            assert all(0 <= t < index for t in targets), f"node {index}: bad targets {targets}"
            bootstrap = tuple(meshes[t].listen_addrs()[0] for t in targets)
            node_config = dataclasses.replace(base, bootstrap=bootstrap)
            mesh, _ = await start_mesh(nursery, seed_for(index, namespace), chain_id, node_config)
            meshes.append(mesh)
        try:
            yield meshes
        finally:
            nursery.cancel_scope.cancel()


class NodeProcess:
    """A ``p2p._benchnode`` subprocess, read line by line on a thread (sync API, for scripts
    and process-level tests)."""

    def __init__(self, args: Sequence[str], *, prefix: Sequence[str] = ()) -> None:
        self.args = [*prefix, sys.executable, "-m", "p2p._benchnode", *args]
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=node_lines_max)
        self.ready: dict[str, Any] = {}
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=_repo_root(),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            try:
                self.lines.put(event, timeout=60)
            except queue.Full:
                return

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float, what: str
    ) -> dict[str, Any]:
        """Consume lines until one satisfies ``predicate``; fail with ``what`` on timeout."""
        deadline = _time.monotonic() + timeout_s
        while True:
            remaining = deadline - _time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout_s} s waiting until {what}")
            try:
                event = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if event.get("event") == "ready":
                self.ready = event
            if predicate(event):
                return event

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        """SIGKILL, no goodbye: what a crash looks like to the other nodes."""
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` currently free TCP ports (closed again, so a small race is possible)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def multiaddr_of(host: str, port: int, seed: bytes) -> str:
    """The dialable address of the node with ``seed`` listening on ``host:port``."""
    public = private_key_from_seed(seed).public_key().public_bytes_raw()
    return f"/ip4/{host}/tcp/{port}/p2p/{peer_id_of(public)}"


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


netns_subnet = "10.77.0"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def netns_bridge(count: int, prefix: str | None = None) -> Iterator[list[tuple[str, str]]]:
    """``count`` network namespaces joined by a bridge that lives in its own hub namespace
    (the host's interfaces are never touched). Yields ``(namespace, ip)`` pairs; removes
    everything on exit. Needs root and iproute2."""
    tag = prefix or f"gm{os.getpid() % 100000}"
    hub = f"{tag}-hub"
    created: list[str] = []
    try:
        _ip("netns", "add", hub)
        created.append(hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        nodes = []
        for index in range(count):
            name = f"{tag}-{index}"
            address = f"{netns_subnet}.{index + 1}"
            _ip("netns", "add", name)
            created.append(name)
            outer, inner = f"{tag}v{index}h", f"{tag}v{index}n"
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", outer, "netns", hub)
            _ip("link", "set", inner, "netns", name)
            _ip("-n", hub, "link", "set", outer, "master", "br0")
            _ip("-n", hub, "link", "set", outer, "up")
            _ip("-n", name, "link", "set", inner, "name", "eth0")
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "link", "set", "lo", "up")
            # mDNS sends to 224.0.0.251: without a route for it the send fails.
            _ip("-n", name, "route", "add", "224.0.0.0/4", "dev", "eth0")
            nodes.append((name, address))
        yield nodes
    finally:
        for name in reversed(created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def netns_available() -> bool:
    """True when we may create network namespaces (root with iproute2)."""
    if os.geteuid() != 0:
        return False
    try:
        _ip("netns", "list")
    except (OSError, subprocess.SubprocessError):
        return False
    return True
