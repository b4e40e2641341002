"""The seams the node implements for the market: the network and the chain.

The market may import only ``ledger`` and ``compute``; the node adapts ``p2p.Mesh`` to
``MarketNetAPI`` and its ledger store + mempool + consensus to ``ChainAPI``.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING

import ledger

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import trio

    from ledger import Account, ChainParams, Receipt, Trade, Transaction


@dataclasses.dataclass(frozen=True, slots=True)
class Incoming:
    """One gossip message as the market receives it; ``sender`` is the 32-byte address
    (the Ed25519 key that signed the gossip envelope, which is also the ledger address)."""

    sender: bytes
    sender_peer_id: str
    type_tag: str
    payload: bytes


class MarketNetAPI(abc.ABC):
    """What the market needs of the p2p mesh."""

    local_peer_id: str

    @abc.abstractmethod
    async def publish(self, purpose: str, type_tag: str, payload: bytes) -> None:
        """Gossip ``payload`` on ``purpose`` (signed by the node key)."""

    @abc.abstractmethod
    def subscribe(self, purpose: str) -> trio.MemoryReceiveChannel[Incoming]:
        """Gossip of ``purpose`` from other nodes (never our own)."""

    def subscribe_validated(
        self, purpose: str, validator: Callable[[Incoming], bool | None]
    ) -> trio.MemoryReceiveChannel[Incoming]:
        """Like ``subscribe``, with ``validator`` run on each message before it is relayed:
        True accepts, False rejects it (the mesh counts it against the peer that sent it),
        None drops it without blame (stale, or not for us now). A transport without gossip
        validation may fall back to ``subscribe``: the consumer checks everything again."""
        return self.subscribe(purpose)

    @abc.abstractmethod
    def set_handler(self, protocol: str, handler: Callable[[str, bytes], Awaitable[bytes]]) -> None:
        """Serve ``protocol``: ``handler(peer_id, request) -> response``. A handler raising
        ``NetError`` answers the caller with that error's message."""

    @abc.abstractmethod
    async def request(self, peer_id: str, protocol: str, payload: bytes, timeout_s: float) -> bytes:
        """One request/response with ``peer_id``; raises ``NetError`` on any failure."""


class ChainAPI(abc.ABC):
    """What the market needs of the ledger: submit transactions, read trades and accounts.

    ``submit`` takes a builder so the chain service picks the nonce (the sender's next one,
    counting its pending mempool transactions); the market's builder signs with the node key
    and returns the signed transaction, so the chain service never needs the key.
    """

    @abc.abstractmethod
    async def submit(self, tx_builder: Callable[[int], Transaction]) -> bytes:
        """Build with the next nonce, add to the mempool, gossip; returns the tx hash.
        Raises ``ChainRejected`` with the mempool's reason."""

    @abc.abstractmethod
    def trade(self, job_id: bytes) -> Trade | None:
        """The committed trade for ``job_id`` (open or closed), or None."""

    @abc.abstractmethod
    def receipt(self, job_id: bytes) -> Receipt | None:
        """The committed receipt transaction that settled ``job_id``, or None."""

    @abc.abstractmethod
    def account(self, address: bytes) -> Account: ...

    def params(self) -> ChainParams:
        """The chain-wide rules (fee minimum, provider bond minimum, ...); a chain that names
        none has the permissive defaults."""
        return ledger.ChainParams()

    @abc.abstractmethod
    def head(self) -> tuple[int, int]:
        """``(height, time_ms)`` of the last committed block."""

    @abc.abstractmethod
    async def wait_new_block(self) -> int:
        """Return the new height once the next block commits."""

    @abc.abstractmethod
    def tx_result(self, tx_hash: bytes) -> tuple[bool, bool, str] | None:
        """``(committed, ok, error)``: ``(False, False, "")`` while pending in the mempool;
        None when the chain knows nothing of it (never seen, or evicted)."""
