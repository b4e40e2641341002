"""The interface the node daemon (and the RPC layer, through it) uses of the mesh."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    # trio-typing (a py-libp2p dependency) shadows trio's types; TaskStatus lives there.
    from collections.abc import Awaitable, Callable

    from trio_typing import TaskStatus

    from p2p.types import GossipMessage, PeerEvent, PeerId, PeerInfo, Verdict


class MeshAPI(abc.ABC):
    peer_id: PeerId
    public_key: bytes

    @abc.abstractmethod
    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None: ...

    @abc.abstractmethod
    def listen_addrs(self) -> list[str]: ...

    @abc.abstractmethod
    def peers(self) -> list[PeerInfo]: ...

    @abc.abstractmethod
    def peer_count(self) -> int: ...

    @abc.abstractmethod
    def peer_events(self) -> trio.MemoryReceiveChannel[PeerEvent]: ...

    @abc.abstractmethod
    def subscribe(
        self,
        purpose: str,
        validator: Callable[[GossipMessage], bool | Verdict] | None = None,
        *,
        peer_rate_per_s: float | None = None,
        peer_burst: int | None = None,
    ) -> trio.MemoryReceiveChannel[GossipMessage]: ...

    @abc.abstractmethod
    async def publish(self, purpose: str, type_tag: str, payload: bytes) -> bytes: ...

    @abc.abstractmethod
    def set_handler(
        self, protocol: str, handler: Callable[[PeerId, bytes], Awaitable[bytes]]
    ) -> None: ...

    @abc.abstractmethod
    async def request(
        self, peer_id: PeerId, protocol: str, payload: bytes, timeout_s: float | None = None
    ) -> bytes: ...

    @abc.abstractmethod
    def statistics(self) -> dict[str, Any]: ...
