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

import collections
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

import msgpack
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
    TxResult,
    build_block,
)
from node._tx_journal import TxJournal
from p2p import P2PError, PeerId, RequestError, Verdict

if TYPE_CHECKING:
    from collections.abc import Callable, Container
    from pathlib import Path

    from trio_typing import TaskStatus

    from ledger import SigningKey
    from p2p import GossipMessage, Mesh

log = logging.getLogger("node.chain")

CONSENSUS_PURPOSE = "consensus"
TXS_PURPOSE = "txs"
CONSENSUS_TYPE_TAG = "gpumesh/consensus/1"
CONSENSUS_REF_TYPE_TAG = "gpumesh/consensus-ref/1"
TXS_TYPE_TAG = "gpumesh/txs/1"
block_txs_max = 2000
block_bytes_max = 512 * 1024
"""A proposal carries its block over gossip, whose messages are capped at 1 MiB: stay well
under it, or a backlog builds a block no peer accepts and every round times out."""
tx_batch_interval_ms = 250
tx_batch_txs_max = 150
tx_batch_bytes_max = 32 * 1024
gossip_inline_bytes_max = 32 * 1024
"""Larger consensus messages (proposals with their blocks) are announced by hash and fetched
over a stream. py-libp2p 0.8.1 writes one gossip RPC as several yamux frames without holding
the stream across them, so two large concurrent publishes interleave and corrupt the stream
(measured: a protobuf DecodeError that stopped the host). One frame is 64 KiB."""
bodies_cached_max = 32
body_fetches_max = 8
"""Body fetches running at once."""
body_fetches_waiting_max = 32
"""Body fetches started or waiting in all; a ``BodyRef`` beyond it is dropped and counted."""
body_fetches_per_peer_max = 4
"""Body fetches started or waiting for one announcing peer."""
body_bytes_max = block_bytes_max + 64 * 1024
"""The largest consensus message body a ``BodyRef`` may announce (a proposal with its block)."""
body_fetch_timeout_s = 10.0
own_tx_rebroadcast_ms = 5000
own_pending_max = 10_000
"""Acknowledged transactions of this node not yet committed; more are refused (not dropped)."""
journal_slack_records = 1024
"""The journal is rewritten once it holds this many more records than twice the live ones."""
future_block_drift_ms = 30_000
transport_queue_max = 4096
sync_request_timeout_s = 10.0
validated_blocks_max = 8
_BLOCK_PROPOSER_FIELD = [f.name for f in dataclasses.fields(Block)].index("proposer")
commit_events_buffered_max = 256
"""Per subscriber: a subscriber that falls this far behind loses events (counted), never
stalls commits."""


def sync_protocol(chain_id: str) -> str:
    return f"/gpumesh/{chain_id}/sync/1"


@dataclasses.dataclass(frozen=True)
class TxBatch:
    """A gossip message carrying several transactions at once."""

    txs: tuple[Transaction, ...]


def _consensus_genesis(genesis: Genesis) -> consensus.Genesis:
    return consensus.Genesis(genesis.chain_id, genesis.validators)


class LedgerApp(consensus.ApplicationAPI):
    """The ledger as the replicated application. Only the driver's task calls these."""

    def __init__(self, genesis: Genesis, store: LevelDBStore) -> None:
        self.genesis = genesis
        self.store = store
        self.state: LedgerState = store.load_state(genesis)
        self.mempool = Mempool(self.state, committed=lambda txh: store.transaction(txh) is not None)
        self._validated: dict[bytes, tuple[Block, LedgerState, BlockResults]] = {}
        self._new_block = trio.Event()
        self.on_commit: Callable[[Block, BlockResults], None] | None = None

    async def head(self) -> tuple[int, bytes]:
        if self.state.height == 0:
            return 0, b""
        return self.state.height, self.state.block_hash

    async def propose(self, height: int, time_ms: int, proposer: bytes) -> tuple[bytes, bytes]:
        assert height == self.state.height + 1, "propose is only asked for the next height"
        time_ms = max(time_ms, self.state.time_ms + 1)
        txs = self.mempool.reap(block_txs_max, block_bytes_max, time_ms=time_ms)
        block = build_block(
            self.state,
            height,
            self.state.block_hash,
            time_ms,
            proposer,
            txs,
            verified=self.mempool,
        )
        # build_block verified every signature; keep the result so our own validate and
        # commit of this block do not apply it a second time.
        new_state, results = ledger.apply_block(self.state, block, verify_signatures=False)
        self._remember(block.hash(), (block, new_state, results))
        return ledger.encode(block), block.hash()

    def _remember(self, block_hash: bytes, entry: tuple[Block, LedgerState, BlockResults]) -> None:
        if len(self._validated) >= validated_blocks_max:
            self._validated.pop(next(iter(self._validated)))
        self._validated[block_hash] = entry

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
        # Transactions in our mempool had their signatures checked when they arrived; only
        # the others are checked again.
        try:
            new_state, results = apply_block_checked(self.state, decoded, verified=self.mempool)
        except InvalidBlock as exc:
            raise consensus.InvalidBlock(str(exc)) from exc
        self._remember(block_hash, (decoded, new_state, results))
        return block_hash

    async def commit(self, height: int, block: bytes, commit: consensus.Commit) -> None:
        block_hash = await self.validate(height, block)
        decoded, new_state, results = self._validated.pop(block_hash)
        # The fsync happens off the trio thread; nothing else writes the store meanwhile.
        await trio.to_thread.run_sync(self.store.commit_block, decoded, commit, new_state, results)
        self._validated.clear()
        self.state = new_state
        self.mempool.update(decoded, new_state)
        event, self._new_block = self._new_block, trio.Event()
        event.set()
        if self.on_commit is not None:
            self.on_commit(decoded, results)

    async def load_block(self, height: int) -> tuple[bytes, consensus.Commit] | None:
        block = self.store.block(height)
        commit = self.store.commit(height)
        if block is None or commit is None:
            return None
        return ledger.encode(block), commit

    def block_proposer(self, block: bytes) -> bytes:
        # Read the header fields only (validate decodes, and checks, the whole block): the
        # driver asks this of every proposal it hears, and a block is up to 512 KiB.
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(block) + 1)
        unpacker.feed(block)
        try:
            fields = unpacker.read_array_header()
            header = [unpacker.unpack() for _ in range(_BLOCK_PROPOSER_FIELD + 1)]
        except (msgpack.UnpackException, ValueError, TypeError) as exc:
            raise consensus.InvalidBlock(f"block does not decode: {exc}") from exc
        proposer = header[_BLOCK_PROPOSER_FIELD]
        if fields != len(dataclasses.fields(Block)) or not isinstance(proposer, bytes):
            raise consensus.InvalidBlock("block header is malformed")
        return proposer

    def has_transactions(self) -> bool:
        return len(self.mempool) > 0

    async def wait_new_block(self) -> int:
        await self._new_block.wait()
        return self.state.height


def apply_block_checked(
    state: LedgerState, block: Block, *, verified: Container[bytes] = ()
) -> tuple[LedgerState, BlockResults]:
    if block.chain_id != state.chain_id:
        raise InvalidBlock(f"block is for chain {block.chain_id!r}")
    if block.prev_hash != state.block_hash:
        raise InvalidBlock("block does not extend our head")
    if block.time_ms <= state.time_ms:
        raise InvalidBlock("block time does not increase")
    return ledger.apply_block(state, block, verified=verified)


@dataclasses.dataclass(slots=True)
class _JournalBatch:
    txs: list[Transaction] = dataclasses.field(default_factory=list)
    hashes: list[bytes] = dataclasses.field(default_factory=list)
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    error: OSError | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class CommitEvent:
    """One committed block, as ``ChainService.subscribe_commits`` delivers it."""

    height: int
    time_ms: int
    block_hash: bytes
    tx_results: tuple[TxResult, ...]
    block: Block


@dataclasses.dataclass(frozen=True, slots=True)
class TxStatus:
    """Where a transaction stands on this node. ``state`` is ``committed`` (``ok`` and
    ``error`` say how it went), ``pending`` (in the mempool), ``evicted`` (was pending here,
    pushed out by higher-fee transactions or made stale; ``error`` says which) or ``unknown``."""

    state: str
    tx: Transaction | None = None
    height: int = 0
    index: int = 0
    ok: bool = False
    error: str = ""


@dataclasses.dataclass(frozen=True)
class BodyRef:
    """Gossiped in place of a consensus message too large to gossip: fetch it by hash."""

    digest: bytes
    size: int


def body_protocol(chain_id: str) -> str:
    return f"/gpumesh/{chain_id}/consensus-body/1"


class MeshTransport(consensus.TransportAPI):
    def __init__(self, mesh: Mesh, chain_id: str) -> None:
        self._mesh = mesh
        self._protocol = sync_protocol(chain_id)
        self.body_protocol = body_protocol(chain_id)
        self._send, self._receive = trio.open_memory_channel[tuple[consensus.PeerId, bytes]](
            transport_queue_max
        )
        self._bodies: dict[bytes, bytes] = {}
        self._fetching: set[bytes] = set()
        self._fetching_by_peer: dict[str, int] = {}
        self.fetches_dropped = 0
        self._fetch_limit = trio.CapacityLimiter(body_fetches_max)
        self._nursery: trio.Nursery | None = None
        self.dropped = 0
        self.fetch_failures = 0

    def _cache(self, digest: bytes, data: bytes) -> None:
        if len(self._bodies) >= bodies_cached_max:
            self._bodies.pop(next(iter(self._bodies)))
        self._bodies[digest] = data

    async def serve_body(self, peer: PeerId, request: bytes) -> bytes:
        body = self._bodies.get(request)
        if body is None:
            raise RequestError("no such consensus message body")
        return body

    async def broadcast(self, data: bytes) -> None:
        if len(data) <= gossip_inline_bytes_max:
            await self._mesh.publish(CONSENSUS_PURPOSE, CONSENSUS_TYPE_TAG, data)
            return
        digest = ledger.digest(data)
        self._cache(digest, data)
        ref = ledger.encode(BodyRef(digest, len(data)))
        await self._mesh.publish(CONSENSUS_PURPOSE, CONSENSUS_REF_TYPE_TAG, ref)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def deliver_ref(self, message: GossipMessage) -> None:
        try:
            ref = ledger.decode(BodyRef, message.payload, max_bytes=128)
        except DecodeError:
            self.dropped += 1
            return
        if ref.digest in self._fetching or self._nursery is None:
            return
        cached = self._bodies.get(ref.digest)
        if cached is not None:
            self._push(message.sender_peer_id, cached)
            return
        peer = message.sender_peer_id
        waiting = self._fetching_by_peer.get(peer, 0)
        if len(self._fetching) >= body_fetches_waiting_max or waiting >= body_fetches_per_peer_max:
            self.fetches_dropped += 1
            return
        self._fetching.add(ref.digest)
        self._fetching_by_peer[peer] = waiting + 1
        self._nursery.start_soon(self._fetch, peer, ref)

    async def _fetch(self, peer: PeerId, ref: BodyRef) -> None:
        try:
            async with self._fetch_limit:
                body = await self._mesh.request(
                    peer, self.body_protocol, ref.digest, body_fetch_timeout_s
                )
            if len(body) != ref.size or ledger.digest(body) != ref.digest:
                self.fetch_failures += 1
                log.info("consensus body does not match its digest", extra={"peer": peer})
                return
            self._cache(ref.digest, body)  # so we can serve peers that ask us
            self._push(peer, body)
        except P2PError as exc:
            self.fetch_failures += 1
            log.info("consensus body fetch failed", extra={"peer": peer, "err": repr(exc)})
        finally:
            self._fetching.discard(ref.digest)
            left = self._fetching_by_peer.pop(peer) - 1
            if left:
                self._fetching_by_peer[peer] = left

    def _push(self, peer: str, data: bytes) -> None:
        try:
            self._send.send_nowait((consensus.PeerId(peer), data))
        except trio.WouldBlock:
            self.dropped += 1

    def incoming(self) -> trio.MemoryReceiveChannel[tuple[consensus.PeerId, bytes]]:
        return self._receive

    def deliver(self, message: GossipMessage) -> None:
        if message.type_tag == CONSENSUS_REF_TYPE_TAG:
            self.deliver_ref(message)
        else:
            # consensus rebroadcasts; a full queue must drop, never stall gossip
            self._push(message.sender_peer_id, message.payload)

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
        self._own_pending: dict[bytes, Transaction] = {}
        """Acknowledged, journaled, not yet committed or dropped (insertion order)."""
        self._journal = TxJournal(data_dir / "own_txs.journal")
        self._journal_batch = _JournalBatch()
        self._journal_wake = trio.Event()
        self._journal_rewrite = False
        self.journal_restored = 0
        self.gossip_rejected = 0
        self.consensus_rejected = 0
        self._commit_subscribers: list[trio.MemorySendChannel[CommitEvent]] = []
        self.commit_events_dropped = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        store = LevelDBStore(self.data_dir / "ledger")
        try:
            self.app = LedgerApp(self.genesis, store)
            self.app.on_commit = self._on_commit
            await self._restore_journal(self.app)
            self.driver = consensus.ConsensusDriver(
                genesis=_consensus_genesis(self.genesis),
                config=self.config,
                app=self.app,
                transport=self.transport,
                key=self.key,
                wal_path=self.data_dir / "consensus.wal",
            )
            driver = self.driver

            async def serve_sync(peer: PeerId, data: bytes) -> bytes:
                return await driver.handle_request(consensus.PeerId(peer), data)

            self.mesh.set_handler(sync_protocol(self.chain_id), serve_sync)
            self.mesh.set_handler(self.transport.body_protocol, self.transport.serve_body)
            consensus_in = self.mesh.subscribe(CONSENSUS_PURPOSE, self._validate_consensus)
            txs_in = self.mesh.subscribe(TXS_PURPOSE, self._validate_txs)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.transport.run)
                nursery.start_soon(self._pump_consensus, consensus_in)
                nursery.start_soon(self._pump_txs, txs_in)
                nursery.start_soon(self._gossip_outbox)
                nursery.start_soon(self._rebroadcast_own)
                nursery.start_soon(self._journal_writer)
                await nursery.start(driver.run)
                task_status.started()
        finally:
            store.close()

    async def _pump_consensus(self, channel: trio.MemoryReceiveChannel[GossipMessage]) -> None:
        async for message in channel:
            self.transport.deliver(message)

    async def _pump_txs(self, channel: trio.MemoryReceiveChannel[GossipMessage]) -> None:
        # The validator admitted the batch's transactions already; here only what is left:
        # drain the subscription so it never fills.
        async for _ in channel:
            pass

    def _validate_txs(self, message: GossipMessage) -> Verdict:
        """The ``txs`` topic's gossip validator: admit each transaction to the mempool (so a
        batch is checked once, here); a batch that does not decode, or carries a transaction
        only a broken or hostile sender makes (bad signature, fee below the minimum, too
        large), is rejected and counts toward the forwarder's ban score."""
        if message.sender_peer_id == self.mesh.peer_id:
            return Verdict.ACCEPT
        if self.app is None or self.driver is None:
            return Verdict.IGNORE
        try:
            batch = ledger.decode(TxBatch, message.payload, max_bytes=tx_batch_bytes_max)
        except DecodeError as exc:
            self.gossip_rejected += 1
            log.info("bad tx batch", extra={"peer": message.sender_peer_id, "err": str(exc)})
            return Verdict.REJECT
        if not 0 < len(batch.txs) <= tx_batch_txs_max:
            self.gossip_rejected += 1
            return Verdict.REJECT
        added = faults = 0
        for tx in batch.txs:
            try:
                self.app.mempool.add(tx)
                added += 1
            except MempoolRejected as exc:
                if exc.reason in Mempool.peer_fault_reasons:
                    faults += 1
        if added:
            self.driver.notify_transactions()
        if faults:
            self.gossip_rejected += 1
            return Verdict.REJECT
        return Verdict.ACCEPT

    def _validate_consensus(self, message: GossipMessage) -> Verdict:
        """The ``consensus`` topic's gossip validator: what the driver would drop as invalid
        (undecodable, not a validator, bad signature, not the round's proposer, a block that
        names another proposer) is rejected and scored; messages for heights we committed
        are not relayed (block sync serves those)."""
        if message.sender_peer_id == self.mesh.peer_id:
            return Verdict.ACCEPT
        if message.type_tag == CONSENSUS_REF_TYPE_TAG:
            try:
                ref = ledger.decode(BodyRef, message.payload, max_bytes=128)
            except DecodeError:
                self.consensus_rejected += 1
                return Verdict.REJECT
            if len(ref.digest) != 32 or not 0 < ref.size <= body_bytes_max:
                self.consensus_rejected += 1
                return Verdict.REJECT
            return Verdict.ACCEPT
        if message.type_tag != CONSENSUS_TYPE_TAG:
            self.consensus_rejected += 1
            return Verdict.REJECT
        driver = self.driver
        if driver is None:
            return Verdict.IGNORE
        if driver.is_stale(message.payload):
            return Verdict.IGNORE
        if driver.check_message(message.payload) is not None:
            self.consensus_rejected += 1
            return Verdict.REJECT
        return Verdict.ACCEPT

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
            if self._own_pending:
                self._outbox.extend(self._own_pending.values())
                self._outbox_wake.set()

    # -- the journal of acknowledged transactions ----------------------------------------------

    async def _restore_journal(self, app: LedgerApp) -> None:
        """Put the journaled transactions back (those the chain has not committed or made
        stale meanwhile), queue them for gossip, and rewrite the journal to just those."""
        not_restored: collections.Counter[str] = collections.Counter()
        for tx in await trio.to_thread.run_sync(self._journal.load):
            try:
                txh = app.mempool.add(tx, local=True)
            except MempoolRejected as exc:
                not_restored[exc.reason] += 1  # committed or made stale while we were down
                continue
            self._own_pending[txh] = tx
        self.journal_restored = len(self._own_pending)
        if not_restored:
            log.info("journaled txs not restored", extra=dict(not_restored))
        await trio.to_thread.run_sync(self._journal.rewrite, list(self._own_pending.values()))
        if self._own_pending:
            log.info("restored own pending transactions", extra={"txs": self.journal_restored})
            self._outbox.extend(self._own_pending.values())
            self._outbox_wake.set()

    async def _journal_writer(self) -> None:
        """The one task that writes the journal: appends in groups (one fsync for every
        submission that arrived meanwhile) and rewrites it when it has grown."""
        while True:
            await self._journal_wake.wait()
            self._journal_wake = trio.Event()
            if self._journal_rewrite:
                self._journal_rewrite = False
                await trio.to_thread.run_sync(
                    self._journal.rewrite, list(self._own_pending.values())
                )
            batch, self._journal_batch = self._journal_batch, _JournalBatch()
            if not batch.txs:
                continue
            try:
                await trio.to_thread.run_sync(self._journal.append, batch.txs)
                # Here, not in the submitters: a rewrite must never run between the fsync
                # and the transactions joining what it keeps.
                self._own_pending.update(zip(batch.hashes, batch.txs, strict=True))
            except OSError as exc:
                batch.error = exc
                log.error("cannot write the tx journal", extra={"err": repr(exc)})
            finally:
                batch.done.set()

    async def _journal_append(self, txh: bytes, tx: Transaction) -> None:
        batch = self._journal_batch
        batch.txs.append(tx)
        batch.hashes.append(txh)
        self._journal_wake.set()
        await batch.done.wait()
        if batch.error is not None:
            raise batch.error

    def _on_commit(self, block: Block, results: BlockResults) -> None:
        if self._own_pending:
            assert self.app is not None
            mempool = self.app.mempool
            for result in results.tx_results:
                self._own_pending.pop(result.tx_hash, None)
            gone = [h for h in self._own_pending if h not in mempool]
            for txh in gone:
                # Made stale or invalid by the block; mempool.dropped(txh) keeps the reason.
                del self._own_pending[txh]
            if self._journal.records > 2 * len(self._own_pending) + journal_slack_records:
                self._journal_rewrite = True
                self._journal_wake.set()
        self._publish_commit(block, results)

    # -- API for RPC and the market --------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once ``run`` has opened the store, restored the journal and made the driver
        (RPC answers "starting" until then); the read API asserts the store is open."""
        return self.app is not None and self.driver is not None

    def _app(self) -> LedgerApp:
        assert self.app is not None, "the chain service is not running"
        return self.app

    @property
    def state(self) -> LedgerState:
        return self._app().state

    @property
    def params(self) -> ledger.ChainParams:
        """The chain's rules from genesis (fee_min, bonds, slashing)."""
        return self.genesis.params

    def head(self) -> tuple[int, int]:
        """``(height, time_ms)`` of the last committed block (``(0, genesis time)`` before)."""
        state = self._app().state
        return state.height, state.time_ms

    def head_record(self) -> ledger.Head | None:
        """The store's head (hash, state root), or None before block 1."""
        return self._app().store.head()

    def account(self, address: bytes) -> ledger.Account:
        # From the state, not the store: before block 1 the store holds no genesis accounts.
        return self._app().state.account(address)

    def trade(self, job_id: bytes) -> ledger.Trade | None:
        """The committed trade for ``job_id`` (open or closed), or None."""
        return self._app().store.trade(job_id)

    def receipt(self, job_id: bytes) -> ledger.ReceiptRecord | None:
        """The committed receipt that settled ``job_id`` (with its tx hash, height), or None."""
        return self._app().store.receipt(job_id)

    def block(self, height: int) -> Block | None:
        return self._app().store.block(height)

    def block_by_hash(self, block_hash: bytes) -> Block | None:
        return self._app().store.block_by_hash(block_hash)

    def block_commit(self, height: int) -> consensus.Commit | None:
        return self._app().store.commit(height)

    def tx_status(self, tx_hash: bytes) -> TxStatus:
        app = self._app()
        record = app.store.transaction(tx_hash)
        if record is not None:
            return TxStatus(
                "committed", record.tx, record.height, record.index, record.ok, record.error
            )
        pending = app.mempool.get(tx_hash)
        if pending is not None:
            return TxStatus("pending", pending)
        dropped = app.mempool.dropped(tx_hash)
        if dropped is not None:
            return TxStatus("evicted", error=dropped)
        return TxStatus("unknown")

    def mempool_statistics(self) -> ledger.MempoolStatistics:
        return self._app().mempool.statistics()

    def subscribe_commits(self) -> trio.MemoryReceiveChannel[CommitEvent]:
        """A channel of committed blocks, ``commit_events_buffered_max`` deep. A subscriber
        that falls behind loses events (counted in ``commit_events_dropped``); closing the
        receiving end unsubscribes."""
        send, receive = trio.open_memory_channel[CommitEvent](commit_events_buffered_max)
        self._commit_subscribers.append(send)
        return receive

    def _publish_commit(self, block: Block, results: BlockResults) -> None:
        event = CommitEvent(block.height, block.time_ms, block.hash(), results.tx_results, block)
        alive: list[trio.MemorySendChannel[CommitEvent]] = []
        for send in self._commit_subscribers:
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                self.commit_events_dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                continue
            alive.append(send)
        self._commit_subscribers = alive

    async def submit(self, tx: Transaction) -> bytes:
        """Add a signed transaction to the mempool, journal it (fsynced: on return it survives
        a crash of this node), and gossip it; raises ``MempoolRejected`` (``own_full`` when
        this node already holds ``own_pending_max`` acknowledged transactions)."""
        assert self.app is not None and self.driver is not None, "chain service not running"
        if len(self._own_pending) >= own_pending_max:
            raise MempoolRejected(
                "own_full", f"this node holds {own_pending_max} unconfirmed transactions"
            )
        tx_hash = self.app.mempool.add(tx, local=True)
        await self._journal_append(tx_hash, tx)
        self._outbox.append(tx)
        self._outbox_wake.set()
        self.driver.notify_transactions()
        return tx_hash

    def next_nonce(self, address: bytes) -> int:
        """The nonce the next transaction from ``address`` should carry (pending ones counted)."""
        app = self._app()
        return app.mempool.next_nonce(address)

    async def wait_new_block(self) -> int:
        return await self._app().wait_new_block()
