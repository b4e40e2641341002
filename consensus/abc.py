"""The seams the consensus driver is wired through: the application, the transport, the clock."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import trio

    from consensus.types import Commit, PeerId


class ApplicationAPI(ABC):
    """The replicated application (ABCI-like): the ledger in production.

    Blocks are opaque bytes to consensus; the application names each by its hash. The async
    methods except ``load_block`` are called from the driver's one event-loop task, never
    concurrently with each other; ``load_block`` serves peers' sync requests from their handler
    tasks and only reads committed blocks; ``has_transactions`` is a cheap synchronous check.
    """

    @abstractmethod
    async def head(self) -> tuple[int, bytes]:
        """The last committed (height, block hash); (0, b"") before the first block."""

    @abstractmethod
    async def propose(self, height: int, time_ms: int, proposer: bytes) -> tuple[bytes, bytes]:
        """A new block for ``height`` on top of the head: (block bytes, block hash)."""

    @abstractmethod
    async def validate(self, height: int, block: bytes) -> bytes:
        """The block's hash if it is a valid next block at ``height``; raise ``InvalidBlock``."""

    @abstractmethod
    async def commit(self, height: int, block: bytes, commit: Commit) -> None:
        """Apply and durably store the decided block and its certificate (fsynced on return)."""

    @abstractmethod
    async def load_block(self, height: int) -> tuple[bytes, Commit] | None:
        """A committed block and its commit, for serving block sync; None if not stored."""

    @abstractmethod
    def block_proposer(self, block: bytes) -> bytes:
        """The proposer address the block names (raise ``InvalidBlock`` if it does not
        decode): the driver checks it against the round's proposer."""

    @abstractmethod
    def has_transactions(self) -> bool:
        """True when the mempool holds transactions worth a block (no empty-block churn)."""


class TransportAPI(ABC):
    """How consensus messages move: gossip for proposals and votes, request/response for sync.

    Production: a gossipsub topic and a stream protocol on the p2p host; the node routes the
    stream protocol's requests to ``ConsensusDriver.handle_request``.
    """

    @abstractmethod
    async def broadcast(self, data: bytes) -> None:
        """Send ``data`` to every peer on the consensus topic (best effort)."""

    @abstractmethod
    def incoming(self) -> trio.MemoryReceiveChannel[tuple[PeerId, bytes]]:
        """Messages from peers as (originating peer, bytes); bounded by the transport."""

    @abstractmethod
    async def request(self, peer: PeerId, data: bytes) -> bytes:
        """Send a sync request to ``peer`` and return its reply; raise ``TransportError``."""

    @abstractmethod
    def peers(self) -> list[PeerId]:
        """Peers currently reachable, to ask for blocks."""


class ClockAPI(ABC):
    """Time for the driver: a monotonic clock for timeouts, a wall clock for block times."""

    @abstractmethod
    def monotonic_ms(self) -> int: ...

    @abstractmethod
    def wall_ms(self) -> int: ...

    @abstractmethod
    def trio_deadline(self, deadline_ms: int) -> float:
        """The ``trio.current_time()`` at which ``monotonic_ms()`` reaches ``deadline_ms``: the
        driver waits with trio cancel scopes, so trio's clock (a MockClock in tests) drives it."""
