"""Start N meshes in one trio run on loopback, for tests, scripts and benchmarks."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from typing import TYPE_CHECKING

import trio

from p2p._mesh import Mesh
from p2p.config import P2PConfig

if TYPE_CHECKING:
    # trio-typing (a py-libp2p dependency) shadows trio's types; TaskStatus lives there.
    from collections.abc import AsyncIterator, Callable, Sequence

    from trio_typing import TaskStatus

poll_interval_s = 0.05


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
