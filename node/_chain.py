"""The chain service: the ledger as consensus's application, wired onto the p2p mesh.

- ``LedgerApp`` implements ``consensus.ApplicationAPI`` over the LevelDB store and mempool.
- ``MeshTransport`` carries consensus messages on the ``consensus`` gossip topic and block sync
  over a request/response stream protocol.
- ``ChainService`` owns the store, mempool, driver and transaction gossip. Transactions are
  gossiped in batches every ``tx_batch_interval_ms`` (never one message per transaction: the
  mesh sustains ~50-100 messages/s per node), and a node re-gossips its own still-pending
  transactions every ``own_tx_rebroadcast_ms`` so a lost batch costs latency, not the tx.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import trio

import consensus
import ledger
from ledger import (
    Block,
    BlockResults,
    DecodeError,
    Genesis,
    InvalidBlock,
    LedgerState,
    LevelDBStore,
    Mempool,
    MempoolRejected,
    Transaction,
    build_block,
)
from p2p import P2PError, PeerId

if TYPE_CHECKING:
    from pathlib import Path

    from trio_typing import TaskStatus

    from ledger import SigningKey
    from p2p import GossipMessage, Mesh

log = logging.getLogger("node.chain")

CONSENSUS_PURPOSE = "consensus"
TXS_PURPOSE = "txs"
CONSENSUS_TYPE_TAG = "gpumesh/consensus/1"
TXS_TYPE_TAG = "gpumesh/txs/1"
block_txs_max = 5000
block_bytes_max = 4 * 1024 * 1024
tx_batch_interval_ms = 50
tx_batch_txs_max = 1000
tx_batch_bytes_max = 900 * 1024
own_tx_rebroadcast_ms = 5000
own_pending_max = 10_000
future_block_drift_ms = 30_000
transport_queue_max = 4096
sync_request_timeout_s = 10.0
validated_blocks_max = 8


def sync_protocol(chain_id: str) -> str:
    return f"/gpumesh/{chain_id}/sync/1"


@dataclasses.dataclass(frozen=True)
class TxBatch:
    """A gossip message carrying several transactions at once."""

    txs: tuple[Transaction, ...]


def _to_ledger_commit(commit: consensus.Commit) -> ledger.Commit:
    # consensus.Commit mirrors ledger.Commit field for field: same canonical bytes.
    return ledger.decode(ledger.Commit, ledger.encode(commit))


def _consensus_genesis(genesis: Genesis) -> consensus.Genesis:
    validators = tuple(
        ledger.decode(consensus.Validator, ledger.encode(v)) for v in genesis.validators
    )
    return consensus.Genesis(genesis.chain_id, validators)


def _to_consensus_commit(commit: ledger.Commit) -> consensus.Commit:
    return ledger.decode(consensus.Commit, ledger.encode(commit))


class LedgerApp(consensus.ApplicationAPI):
    """The ledger as the replicated application. Only the driver's task calls these."""

    def __init__(self, genesis: Genesis, store: LevelDBStore) -> None:
        self.genesis = genesis
        self.store = store
        self.state: LedgerState = store.load_state(genesis)
        self.mempool = Mempool(self.state)
        self._validated: dict[bytes, tuple[Block, LedgerState, BlockResults]] = {}
        self._new_block = trio.Event()
        self.commit_listeners: list[Any] = []

    async def head(self) -> tuple[int, bytes]:
        if self.state.height == 0:
            return 0, b""
        return self.state.height, self.state.block_hash

    async def propose(self, height: int, time_ms: int, proposer: bytes) -> tuple[bytes, bytes]:
        assert height == self.state.height + 1, "propose is only asked for the next height"
        time_ms = max(time_ms, self.state.time_ms + 1)
        txs = self.mempool.reap(block_txs_max, block_bytes_max, time_ms=time_ms)
        block = build_block(self.state, height, self.state.block_hash, time_ms, proposer, txs)
        data = ledger.encode(block)
        return data, block.hash()

    async def validate(self, height: int, block: bytes) -> bytes:
        try:
            decoded = ledger.decode(Block, block, max_bytes=block_bytes_max + 64 * 1024)
        except DecodeError as exc:
            raise consensus.InvalidBlock(f"block does not decode: {exc}") from exc
        block_hash = decoded.hash()
        if block_hash in self._validated:
            return block_hash
        if decoded.height != height or height != self.state.height + 1:
            raise consensus.InvalidBlock(f"block height {decoded.height}, expected {height}")
        if decoded.time_ms > time.time() * 1000 + future_block_drift_ms:
            raise consensus.InvalidBlock("block time is too far in the future")
        try:
            new_state, results = apply_block_checked(self.state, decoded)
        except InvalidBlock as exc:
            raise consensus.InvalidBlock(str(exc)) from exc
        if len(self._validated) >= validated_blocks_max:
            self._validated.pop(next(iter(self._validated)))
        self._validated[block_hash] = (decoded, new_state, results)
        return block_hash

    async def commit(self, height: int, block: bytes, commit: consensus.Commit) -> None:
        block_hash = await self.validate(height, block)
        decoded, new_state, results = self._validated.pop(block_hash)
        # The fsync happens off the trio thread; nothing else writes the store meanwhile.
        await trio.to_thread.run_sync(
            self.store.commit_block, decoded, _to_ledger_commit(commit), new_state, results
        )
        self._validated.clear()
        self.state = new_state
        self.mempool.update(decoded, new_state)
        event, self._new_block = self._new_block, trio.Event()
        event.set()
        for listener in self.commit_listeners:
            listener(decoded, results)

    async def load_block(self, height: int) -> tuple[bytes, consensus.Commit] | None:
        block = self.store.block(height)
        commit = self.store.commit(height)
        if block is None or commit is None:
            return None
        return ledger.encode(block), _to_consensus_commit(commit)

    def has_transactions(self) -> bool:
        return len(self.mempool) > 0

    async def wait_new_block(self) -> int:
        await self._new_block.wait()
        return self.state.height


def apply_block_checked(state: LedgerState, block: Block) -> tuple[LedgerState, BlockResults]:
    if block.chain_id != state.chain_id:
        raise InvalidBlock(f"block is for chain {block.chain_id!r}")
    if block.prev_hash != state.block_hash:
        raise InvalidBlock("block does not extend our head")
    if block.time_ms <= state.time_ms:
        raise InvalidBlock("block time does not increase")
    return ledger.apply_block(state, block)


class MeshTransport(consensus.TransportAPI):
    def __init__(self, mesh: Mesh, chain_id: str) -> None:
        self._mesh = mesh
        self._protocol = sync_protocol(chain_id)
        self._send, self._receive = trio.open_memory_channel[tuple[consensus.PeerId, bytes]](
            transport_queue_max
        )
        self.dropped = 0

    async def broadcast(self, data: bytes) -> None:
        await self._mesh.publish(CONSENSUS_PURPOSE, CONSENSUS_TYPE_TAG, data)

    def incoming(self) -> trio.MemoryReceiveChannel[tuple[consensus.PeerId, bytes]]:
        return self._receive

    def deliver(self, message: GossipMessage) -> None:
        try:
            self._send.send_nowait((consensus.PeerId(message.sender_peer_id), message.payload))
        except trio.WouldBlock:
            self.dropped += 1  # consensus rebroadcasts; a full queue must not stall gossip

    async def request(self, peer: consensus.PeerId, data: bytes) -> bytes:
        try:
            return await self._mesh.request(
                PeerId(peer), self._protocol, data, sync_request_timeout_s
            )
        except P2PError as exc:
            raise consensus.TransportError(str(exc)) from exc

    def peers(self) -> list[consensus.PeerId]:
        return [consensus.PeerId(p.peer_id) for p in self._mesh.peers()]


class ChainService:
    """Store + mempool + consensus driver + transaction gossip, as one trio service."""

    def __init__(
        self,
        *,
        genesis: Genesis,
        data_dir: Path,
        key: SigningKey,
        mesh: Mesh,
        config: consensus.ConsensusConfig,
    ) -> None:
        self.genesis = genesis
        self.chain_id = genesis.chain_id
        self.key = key
        self.mesh = mesh
        self.data_dir = data_dir
        self.config = config
        self.app: LedgerApp | None = None
        self.driver: consensus.ConsensusDriver | None = None
        self.transport = MeshTransport(mesh, self.chain_id)
        self._outbox: list[Transaction] = []
        self._outbox_wake = trio.Event()
        self._own_pending: deque[tuple[bytes, Transaction]] = deque(maxlen=own_pending_max)
        self.gossip_rejected = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        store = LevelDBStore(self.data_dir / "ledger")
        try:
            self.app = LedgerApp(self.genesis, store)
            self.driver = consensus.ConsensusDriver(
                genesis=_consensus_genesis(self.genesis),
                config=self.config,
                app=self.app,
                transport=self.transport,
                key=self.key,
                wal_path=self.data_dir / "consensus.wal",
            )
            driver = self.driver
            self.mesh.set_handler(
                sync_protocol(self.chain_id),
                lambda peer, data: driver.handle_request(consensus.PeerId(peer), data),
            )
            consensus_in = self.mesh.subscribe(CONSENSUS_PURPOSE)
            txs_in = self.mesh.subscribe(TXS_PURPOSE)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump_consensus, consensus_in)
                nursery.start_soon(self._pump_txs, txs_in)
                nursery.start_soon(self._gossip_outbox)
                nursery.start_soon(self._rebroadcast_own)
                await nursery.start(driver.run)
                task_status.started()
        finally:
            store.close()

    async def _pump_consensus(self, channel: trio.MemoryReceiveChannel[GossipMessage]) -> None:
        async for message in channel:
            self.transport.deliver(message)

    async def _pump_txs(self, channel: trio.MemoryReceiveChannel[GossipMessage]) -> None:
        assert self.app is not None and self.driver is not None
        async for message in channel:
            try:
                batch = ledger.decode(TxBatch, message.payload, max_bytes=tx_batch_bytes_max)
            except DecodeError as exc:
                self.gossip_rejected += 1
                log.info("bad tx batch", extra={"peer": message.sender_peer_id, "err": str(exc)})
                continue
            added = 0
            for tx in batch.txs:
                try:
                    self.app.mempool.add(tx)
                    added += 1
                except MempoolRejected as exc:
                    if exc.reason not in ("duplicate", "stale_nonce", "nonce_taken"):
                        self.gossip_rejected += 1
            if added:
                self.driver.notify_transactions()

    async def _gossip_outbox(self) -> None:
        while True:
            await self._outbox_wake.wait()
            self._outbox_wake = trio.Event()
            # Gather what arrives within one interval into as few messages as possible.
            await trio.sleep(tx_batch_interval_ms / 1000)
            pending, self._outbox = self._outbox, []
            while pending:
                chunk, pending = pending[:tx_batch_txs_max], pending[tx_batch_txs_max:]
                await self._publish_batch(chunk)

    async def _publish_batch(self, txs: list[Transaction]) -> None:
        data = ledger.encode(TxBatch(tuple(txs)))
        if len(data) > tx_batch_bytes_max and len(txs) > 1:
            half = len(txs) // 2
            await self._publish_batch(txs[:half])
            await self._publish_batch(txs[half:])
            return
        try:
            await self.mesh.publish(TXS_PURPOSE, TXS_TYPE_TAG, data)
        except P2PError as exc:
            log.warning("tx gossip failed", extra={"err": str(exc), "txs": len(txs)})

    async def _rebroadcast_own(self) -> None:
        while True:
            await trio.sleep(own_tx_rebroadcast_ms / 1000)
            assert self.app is not None
            mempool = self.app.mempool
            still = [(h, tx) for h, tx in self._own_pending if h in mempool]
            self._own_pending = deque(still, maxlen=own_pending_max)
            if still:
                self._outbox.extend(tx for _, tx in still)
                self._outbox_wake.set()

    # -- API for RPC and the market --------------------------------------------------------

    @property
    def state(self) -> LedgerState:
        assert self.app is not None, "the chain service is not running"
        return self.app.state

    def submit(self, tx: Transaction) -> bytes:
        """Add a signed transaction to the mempool and gossip it; raises ``MempoolRejected``."""
        assert self.app is not None and self.driver is not None, "chain service not running"
        tx_hash = self.app.mempool.add(tx)
        self._own_pending.append((tx_hash, tx))
        self._outbox.append(tx)
        self._outbox_wake.set()
        self.driver.notify_transactions()
        return tx_hash

    def next_nonce(self, address: bytes) -> int:
        """The nonce the next transaction from ``address`` should carry (pending ones counted)."""
        assert self.app is not None
        nonce = self.app.state.account(address).nonce
        pending = {tx.nonce for tx in self.app.mempool if tx.signer == address}
        while nonce in pending:
            nonce += 1
        return nonce

    async def wait_new_block(self) -> int:
        assert self.app is not None
        return await self.app.wait_new_block()
