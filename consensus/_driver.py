"""The consensus driver: runs the pure engine under trio against an app, a transport and a clock.

One task (the event loop) owns the engine, the WAL and every call into the application, so
nothing races; helper tasks only turn the outside world into events on a bounded channel:

- receive: decode, check signature, membership, proposer and shape; drop and count bad input
  per sending peer; hand good messages to the event loop;
- timers: one heap of the engine's scheduled timeouts;
- pacer: starts round 0 of a height when there is something to do (transactions, the empty-block
  interval, or ``create_empty_blocks``), and re-sends our own messages while a height is stuck
  (gossip loses messages; the paper assumes they eventually arrive);
- sync: asks peers for committed blocks when we are behind or stuck, verifies each commit and
  applies it.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

import trio

from consensus._clock import TrioClock
from consensus._commit import verify_commit
from consensus._engine import (
    Action,
    CastProposal,
    CastVote,
    Decide,
    Engine,
    ReportEvidence,
    RequestBlock,
    ScheduleTimeout,
    ValidateBlock,
)
from consensus._signing import sign_message, verify_message
from consensus._validators import ValidatorSet
from consensus._wal import Wal, WalRecord
from consensus.exceptions import (
    ConfigError,
    InvalidBlock,
    InvalidCommit,
    InvalidMessage,
    TransportError,
)
from consensus.types import (
    ConsensusStatus,
    Envelope,
    Evidence,
    MessageKind,
    PeerId,
    Proposal,
    Step,
    SyncBlock,
    SyncRequest,
    SyncResponse,
    Vote,
    hash_bytes,
)
from ledger import DecodeError, LedgerError, decode, digest, encode

if TYPE_CHECKING:
    from pathlib import Path

    # trio-typing's stubs (a py-libp2p dependency) shadow trio's own types and export
    # TaskStatus only from here.
    from trio_typing import TaskStatus

    from consensus.abc import ApplicationAPI, ClockAPI, TransportAPI
    from consensus.config import ConsensusConfig
    from consensus.types import Commit, Genesis
    from ledger import SigningKey

log = logging.getLogger(__name__)

events_max = 256
"""Events queued for the event loop; producers wait when it is full (backpressure)."""
timers_max = 1024
peers_scored_max = 4096
"""Peers whose bad-message counts are kept; beyond that they are pooled under one key."""
sync_request_bytes_max = 64
sync_bursts_max = 1000
"""Back-to-back sync requests while catching up before pausing one interval."""
sync_idle_factor = 10
"""An idle node (no height in progress) polls peers for blocks this many times less often."""
actions_per_event_max = 100_000
_other_peers = PeerId("*other*")
verified_cache_max = 8192
proposer_cache_max = 64
"""Blocks whose named proposer we remember (proposals are re-sent; decoding is not free)."""
"""Recently verified (chain, message) digests. Gossip delivers duplicates and replays, and the
simulation runs many nodes in one process; a signature check costs ~0.1-0.4 ms."""
_verified: OrderedDict[bytes, None] = OrderedDict()


@dataclasses.dataclass(frozen=True, slots=True)
class _MessageEvent:
    peer: PeerId
    message: Proposal | Vote


@dataclasses.dataclass(frozen=True, slots=True)
class _TimeoutEvent:
    height: int
    round: int
    step: Step


@dataclasses.dataclass(frozen=True, slots=True)
class _StartEvent:
    height: int


@dataclasses.dataclass(frozen=True, slots=True)
class _RebroadcastEvent:
    height: int


@dataclasses.dataclass(frozen=True, slots=True)
class _SyncEvent:
    peer: PeerId
    response: SyncResponse
    done: trio.Event


_Event = _MessageEvent | _TimeoutEvent | _StartEvent | _RebroadcastEvent | _SyncEvent


@dataclasses.dataclass
class DriverStatistics:
    """Counters for metrics and tests; ``bad_by_peer`` is what scoring peers down reads."""

    messages_received: int = 0
    messages_bad: int = 0
    messages_stale: int = 0
    messages_future: int = 0
    bad_by_peer: dict[PeerId, int] = dataclasses.field(default_factory=dict)
    proposals_signed: int = 0
    votes_signed: int = 0
    double_sign_refused: int = 0
    rebroadcasts: int = 0
    commits: int = 0
    blocks_synced: int = 0
    sync_requests_sent: int = 0
    sync_requests_served: int = 0
    sync_failures: int = 0
    sync_unproven_heads: int = 0
    """Sync responses claiming a head above ours without the commit that proves it."""
    evidence_found: int = 0


class ConsensusDriver:
    """Runs consensus for one node: a validator when ``key`` is in the genesis set, else a
    follower that verifies commits and applies blocks.

    Wiring (the node does this): gossip topic bytes in through ``transport.incoming()``, out
    through ``transport.broadcast``; the block-sync stream protocol's handler returns
    ``await driver.handle_request(peer, request_bytes)``; ``notify_transactions()`` from the
    mempool; ``status()`` for ``consensus_status``; ``take_evidence()`` for the next block.
    """

    def __init__(
        self,
        *,
        genesis: Genesis,
        config: ConsensusConfig,
        app: ApplicationAPI,
        transport: TransportAPI,
        clock: ClockAPI | None = None,
        key: SigningKey | None = None,
        wal_path: Path | None = None,
    ) -> None:
        self.chain_id = genesis.chain_id
        self.validators = ValidatorSet(genesis.validators)
        self.config = config
        self._app = app
        self._transport = transport
        self._clock: ClockAPI = clock if clock is not None else TrioClock()
        self._key = key
        self.address = key.address if key is not None else None
        self.is_validator = self.address is not None and self.address in self.validators
        if self.is_validator and wal_path is None:
            raise ConfigError("[consensus] wal_path is required for a validator")
        self._wal_path = wal_path
        self._wal: Wal | None = None
        self._engine = Engine(
            validators=self.validators, address=self.address, config=config, height=1
        )
        self._committed_height = 0
        self._best_known_height = 0
        self._signed: dict[tuple[int, int, int], bytes] = {}
        self._future: deque[_MessageEvent] = deque(maxlen=config.future_messages_max)
        self._timers: list[tuple[int, int, int, int, Step]] = []
        self._timer_seq = 0
        self._timer_wake = trio.Event()
        self._sync_wake = trio.Event()
        self._txs_wake = trio.Event()
        self._committed = trio.Event()
        self._evidence: deque[Evidence] = deque(maxlen=config.evidence_max)
        self._events_send, self._events_recv = trio.open_memory_channel[_Event](events_max)
        self._height_since_ms = 0
        self._last_rebroadcast_ms = 0
        self._sync_peer_index = 0
        self._preferred_sync_peer: PeerId | None = None
        self._proposer_cache: dict[bytes, bytes] = {}
        self.stats = DriverStatistics()

    # --- public -----------------------------------------------------------------------------

    @property
    def committed_height(self) -> int:
        return self._committed_height

    def status(self) -> ConsensusStatus:
        return ConsensusStatus(
            height=self._engine.height,
            round=self._engine.round,
            step=self._engine.step,
            last_committed_height=self._committed_height,
            validators=self.validators.validators,
            is_validator=self.is_validator,
            catching_up=self.catching_up,
            best_known_height=max(self._best_known_height, self._committed_height),
            pending_evidence=len(self._evidence),
        )

    @property
    def catching_up(self) -> bool:
        """True while a peer has shown us a committed height above ours."""
        return self._best_known_height > self._committed_height

    def pending_evidence(self) -> tuple[Evidence, ...]:
        return tuple(self._evidence)

    def take_evidence(self) -> list[Evidence]:
        """Hand over detected equivocations (for the app to put in a block) and forget them."""
        taken = list(self._evidence)
        self._evidence.clear()
        return taken

    def notify_transactions(self) -> None:
        """The mempool got transactions: start the height now instead of at the next poll."""
        self._txs_wake.set()

    async def wait_committed(self, height: int) -> None:
        """Return once ``height`` is committed here (tests, and the CLI's wait-for-block)."""
        while self._committed_height < height:
            await self._committed.wait()

    async def handle_request(self, peer: PeerId, data: bytes) -> bytes:
        """Serve a block-sync request; raise ``InvalidMessage`` (and score the peer) if bad.

        Runs in the transport's handler task: it only reads committed blocks.
        """
        try:
            request = decode(SyncRequest, data, max_bytes=sync_request_bytes_max)
        except DecodeError as exc:
            self._bad(peer, f"bad sync request: {exc}")
            raise InvalidMessage(f"bad sync request: {exc}") from exc
        if request.from_height < 1 or request.count < 1:
            self._bad(peer, "sync request out of range")
            raise InvalidMessage("sync request out of range")
        self.stats.sync_requests_served += 1
        head = self._committed_height
        last = min(head, request.from_height + min(request.count, self.config.sync_blocks_max) - 1)
        blocks: list[SyncBlock] = []
        size = 0
        for height in range(request.from_height, last + 1):
            loaded = await self._app.load_block(height)
            if loaded is None:
                break
            block, commit = loaded
            size += len(block) + 128 * (1 + len(commit.signatures))
            if blocks and size > self.config.sync_response_bytes_max:
                break
            blocks.append(SyncBlock(height, block, commit))
        head_commit: Commit | None = None
        if blocks and blocks[-1].height == head:
            head_commit = blocks[-1].commit
        elif head > 0:
            loaded = await self._app.load_block(head)
            head_commit = None if loaded is None else loaded[1]
        return encode(SyncResponse(head, tuple(blocks), head_commit))

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        records: list[WalRecord] = []
        if self.is_validator:
            assert self._wal_path is not None
            self._wal, records = Wal.open(self._wal_path, fsync=self.config.wal_fsync)
        try:
            head_height, _ = await self._app.head()
            self._committed_height = head_height
            self._engine = Engine(
                validators=self.validators,
                address=self.address,
                config=self.config,
                height=head_height + 1,
            )
            self._height_since_ms = self._clock.monotonic_ms()
            restore = self._restore(records, head_height)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive_loop)
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self._pacer_loop)
                nursery.start_soon(self._sync_loop)
                await self._execute(restore)
                task_status.started()
                await self._event_loop()
        finally:
            if self._wal is not None:
                self._wal.close()

    # --- restart ----------------------------------------------------------------------------

    def _restore(self, records: list[WalRecord], head_height: int) -> list[Action]:
        own: list[Proposal | Vote] = []
        blocks: dict[bytes, bytes] = {}
        for record in records:
            if record.height <= head_height:
                continue  # committed before the crash; the WAL reset had not happened yet
            message = _decode_envelope(record.envelope, self.config.message_bytes_max)
            assert message is not None, "the WAL holds only envelopes we encoded"
            self._signed[_slot(message)] = record.envelope
            own.append(message)
            if record.block:
                blocks[_block_hash_of(message)] = record.block
            if isinstance(message, Proposal):
                blocks[message.block_hash] = message.block
        if own:
            log.info("consensus: restoring %d signed messages from the WAL", len(own))
        return self._engine.restore(own, blocks)

    # --- the event loop ---------------------------------------------------------------------

    async def _event_loop(self) -> None:
        async for event in self._events_recv:
            if isinstance(event, _MessageEvent):
                await self._on_message(event)
            elif isinstance(event, _TimeoutEvent):
                await self._execute(self._engine.on_timeout(event.height, event.round, event.step))
            elif isinstance(event, _StartEvent):
                if event.height == self._engine.height:
                    await self._execute(self._engine.start_round(0))
            elif isinstance(event, _RebroadcastEvent):
                if event.height == self._engine.height:
                    await self._rebroadcast()
            else:
                try:
                    await self._apply_sync(event.peer, event.response)
                finally:
                    event.done.set()

    async def _on_message(self, event: _MessageEvent) -> None:
        message = event.message
        height = self._engine.height
        if message.height < height:
            self.stats.messages_stale += 1
            return
        if message.height > height:
            # The sender says it committed height-1 (or more): we may be behind. A signature
            # is no proof of a height (a faulty validator signs any), so ``best_known_height``
            # moves only with a commit; this only asks a peer for blocks.
            self.stats.messages_future += 1
            if message.height == height + 1:
                self._future.append(event)
            else:
                self._preferred_sync_peer = event.peer
                self._sync_wake.set()
            return
        if isinstance(message, Proposal):
            await self._execute(self._engine.on_proposal(message))
        else:
            await self._execute(self._engine.on_vote(message))

    async def _execute(self, actions: list[Action]) -> None:
        queue = deque(actions)
        for _ in range(actions_per_event_max):
            if not queue:
                return
            action = queue.popleft()
            if isinstance(action, CastVote):
                vote = Vote(action.vote_type, action.height, action.round, action.block_hash)
                signed_vote = await self._sign_and_send(vote, action.block)
                assert isinstance(signed_vote, Vote)
                queue.extend(self._engine.on_vote(signed_vote))
            elif isinstance(action, CastProposal):
                proposal = Proposal(
                    action.height, action.round, action.pol_round, action.block_hash, action.block
                )
                signed_proposal = await self._sign_and_send(proposal, b"")
                assert isinstance(signed_proposal, Proposal)
                if signed_proposal.pol_round >= 0:
                    await self._relay_pol(signed_proposal.pol_round, signed_proposal.block_hash)
                queue.extend(self._engine.on_proposal(signed_proposal))
            elif isinstance(action, ScheduleTimeout):
                self._schedule(action)
            elif isinstance(action, RequestBlock):
                assert self.address is not None
                block, block_hash = await self._app.propose(
                    action.height, self._clock.wall_ms(), self.address
                )
                queue.extend(
                    self._engine.on_block_value(action.height, action.round, block_hash, block)
                )
            elif isinstance(action, ValidateBlock):
                valid = await self._validate(action.height, action.block, action.block_hash)
                queue.extend(
                    self._engine.on_block_validated(action.height, action.block_hash, valid)
                )
            elif isinstance(action, Decide):
                for rest in queue:
                    if isinstance(rest, ReportEvidence):
                        self._keep_evidence(rest.evidence)
                await self._commit(action.height, action.block, action.commit)
                return  # the engine moved to a new height; what was queued is for the old one
            elif isinstance(action, ReportEvidence):
                self._keep_evidence(action.evidence)
        raise AssertionError("consensus actions kept multiplying")

    def _keep_evidence(self, evidence: Evidence) -> None:
        self.stats.evidence_found += 1
        self._evidence.append(evidence)
        log.warning(
            "consensus: validator %s equivocated at height %d round %d",
            evidence.vote_a.signer.hex()[:16],
            evidence.vote_a.height,
            evidence.vote_a.round,
        )

    async def _validate(self, height: int, block: bytes, block_hash: bytes) -> bool:
        try:
            got = await self._app.validate(height, block)
        except (InvalidBlock, LedgerError) as exc:
            log.info("consensus: invalid block at height %d: %s", height, exc)
            return False
        return got == block_hash

    async def _sign_and_send(self, message: Proposal | Vote, lock_block: bytes) -> Proposal | Vote:
        """Sign, log (fsync) and broadcast; never sign a second message for the same step.

        The WAL holds every message we signed for this height; if we already signed this
        (height, round, step) — before a restart — we re-send that message instead.
        """
        assert self._key is not None
        assert self._wal is not None
        slot = _slot(message)
        existing = self._signed.get(slot)
        if existing is not None:
            signed = _decode_envelope(existing, self.config.message_bytes_max)
            assert signed is not None
            if _block_hash_of(signed) != _block_hash_of(message):
                self.stats.double_sign_refused += 1
                log.warning("consensus: refused to sign a second message for %s", slot)
            envelope = existing
        else:
            signed = sign_message(message, self._key, self.chain_id)
            kind = MessageKind.PROPOSAL if isinstance(signed, Proposal) else MessageKind.VOTE
            envelope = encode(Envelope(kind, encode(signed)))
            self._wal.append(WalRecord(message.height, envelope, lock_block))
            self._signed[slot] = envelope
            if isinstance(signed, Proposal):
                self.stats.proposals_signed += 1
            else:
                self.stats.votes_signed += 1
        await self._broadcast(envelope)
        return signed

    async def _broadcast(self, envelope: bytes) -> None:
        try:
            await self._transport.broadcast(envelope)
        except TransportError as exc:
            log.info("consensus: broadcast failed: %s", exc)

    async def _rebroadcast(self) -> None:
        """Re-send our recent messages, and the proof behind our valid value: gossip loses
        messages, and the paper's liveness assumes every message eventually arrives."""
        engine = self._engine
        for (height, round_, _), envelope in list(self._signed.items()):
            if height == engine.height and round_ >= engine.round - 1:
                self.stats.rebroadcasts += 1
                await self._broadcast(envelope)
        if engine.valid_hash is not None and engine.valid_round >= 0:
            await self._relay_pol(engine.valid_round, engine.valid_hash)

    async def _relay_pol(self, round_: int, block_hash: bytes) -> None:
        for vote in self._engine.pol_votes(round_, block_hash):
            self.stats.rebroadcasts += 1
            await self._broadcast(encode(Envelope(MessageKind.VOTE, encode(vote))))

    async def _commit(self, height: int, block: bytes, commit: Commit) -> None:
        assert height == self._committed_height + 1, "blocks are committed in order"
        await self._app.commit(height, block, commit)
        self._committed_height = height
        self.stats.commits += 1
        if self._wal is not None:
            self._wal.reset()
        self._signed.clear()
        self._engine.start_height(height + 1)
        self._height_since_ms = self._clock.monotonic_ms()
        self._committed.set()
        self._committed = trio.Event()
        buffered = [e for e in self._future if e.message.height == height + 1]
        self._future.clear()
        for event in buffered:
            await self._on_message(event)

    # --- receive ----------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        async for peer, data in self._transport.incoming():
            self.stats.messages_received += 1
            message = self._check(peer, data)
            if message is not None:
                await self._events_send.send(_MessageEvent(peer, message))

    def _check(self, peer: PeerId, data: bytes) -> Proposal | Vote | None:
        """Decode, then validate; anything wrong is dropped and counted against ``peer``."""
        try:
            message = _decode_envelope(data, self.config.message_bytes_max)
        except DecodeError as exc:
            self._bad(peer, f"undecodable: {exc}")
            return None
        if message is None:
            self._bad(peer, "unknown message kind")
            return None
        problem = self._problem(message)
        if problem is not None:
            self._bad(peer, problem)
            return None
        return message

    def _problem(self, message: Proposal | Vote) -> str | None:
        if message.signer not in self.validators:
            return "signer is not a validator"
        if message.height < 1 or message.round < 0:
            return f"height {message.height} round {message.round} out of range"
        if isinstance(message, Proposal):
            if len(message.block_hash) != hash_bytes:
                return "proposal block hash is not 32 bytes"
            if not -1 <= message.pol_round < message.round:
                return f"proposal pol_round {message.pol_round} not in -1..round-1"
            if message.signer != self.validators.proposer(message.height, message.round):
                return "proposal from a validator who is not this round's proposer"
            if message.pol_round < 0:
                # A fresh block: it must name its proposer (whom the block's fees pay).
                named = self._named_proposer(message.signer, message.block_hash, message.block)
                if named != message.signer:
                    return "proposal's block names another proposer"
            elif not self._proposer_fits(message.height, message.pol_round, message.block):
                return "re-proposed block names a proposer of no round up to its pol_round"
        elif len(message.block_hash) not in (0, hash_bytes):
            return "vote block hash is neither nil nor 32 bytes"
        if not _verify_cached(message, self.chain_id):
            return "bad signature"
        return None

    def _named_proposer(self, signer: bytes, block_hash: bytes, block: bytes) -> bytes | None:
        key = signer + block_hash
        named = self._proposer_cache.get(key)
        if named is None:
            try:
                named = self._app.block_proposer(block)
            except (InvalidBlock, LedgerError):
                return None
            if len(self._proposer_cache) >= proposer_cache_max:
                self._proposer_cache.pop(next(iter(self._proposer_cache)))
            self._proposer_cache[key] = named
        return named

    def _proposer_fits(self, height: int, last_round: int, block: bytes) -> bool:
        """Whether ``block`` names the proposer of some round 0..``last_round`` of
        ``height`` (a block re-proposed in a later round keeps its first proposer)."""
        try:
            named = self._app.block_proposer(block)
        except (InvalidBlock, LedgerError):
            return False
        rounds = min(last_round + 1, self.validators.proposer_cycle_length)
        return any(self.validators.proposer(height, r) == named for r in range(rounds))

    def check_message(self, data: bytes) -> str | None:
        """Why a consensus gossip message is invalid (undecodable, unknown signer, bad
        signature, wrong proposer...), or None: the node's gossip validator, so the mesh
        does not relay what the driver would drop. Stale messages are not invalid."""
        try:
            message = _decode_envelope(data, self.config.message_bytes_max)
        except DecodeError as exc:
            return f"undecodable: {exc}"
        if message is None:
            return "unknown message kind"
        return self._problem(message)

    def is_stale(self, data: bytes) -> bool:
        """True for a decodable message of a height this node has committed (the gossip
        validator need not relay it: block sync serves those heights)."""
        try:
            message = _decode_envelope(data, self.config.message_bytes_max)
        except DecodeError:
            return False
        return message is not None and message.height <= self._committed_height

    def _bad(self, peer: PeerId, reason: str) -> None:
        self.stats.messages_bad += 1
        scores = self.stats.bad_by_peer
        if peer not in scores and len(scores) >= peers_scored_max:
            peer = _other_peers
        scores[peer] = scores.get(peer, 0) + 1
        log.debug("consensus: dropped a message from %s: %s", peer, reason)

    # --- timers and pacing ------------------------------------------------------------------

    def _schedule(self, action: ScheduleTimeout) -> None:
        if len(self._timers) >= timers_max:
            height = self._engine.height
            self._timers = [t for t in self._timers if t[2] >= height]
            heapq.heapify(self._timers)
            if len(self._timers) >= timers_max:
                heapq.heappop(self._timers)  # the soonest is the most likely stale
        self._timer_seq += 1
        deadline = self._clock.monotonic_ms() + action.duration_ms
        heapq.heappush(
            self._timers, (deadline, self._timer_seq, action.height, action.round, action.step)
        )
        if self._timers[0][1] == self._timer_seq:
            self._timer_wake.set()

    async def _timer_loop(self) -> None:
        while True:
            self._timer_wake = trio.Event()
            if not self._timers:
                await self._timer_wake.wait()
                continue
            deadline, _, height, round_, step = self._timers[0]
            if self._clock.monotonic_ms() >= deadline:
                heapq.heappop(self._timers)
                if height == self._engine.height:
                    await self._events_send.send(_TimeoutEvent(height, round_, step))
                continue
            await self._sleep_or_wake(deadline, self._timer_wake)

    async def _sleep_or_wake(self, deadline_ms: int, wake: trio.Event) -> None:
        with trio.move_on_at(self._clock.trio_deadline(deadline_ms)):
            await wake.wait()

    async def _pacer_loop(self) -> None:
        """Start idle heights when there is work; re-send our messages while a height is stuck."""
        config = self.config
        while True:
            self._txs_wake = trio.Event()
            now = self._clock.monotonic_ms()
            engine = self._engine
            since = now - self._height_since_ms
            if self.is_validator and engine.step == Step.NEW_HEIGHT:
                if since >= config.timeout_commit_ms and (
                    config.create_empty_blocks
                    or (
                        config.empty_block_interval_ms > 0
                        and since >= config.empty_block_interval_ms
                    )
                    or self._app.has_transactions()
                ):
                    await self._events_send.send(_StartEvent(engine.height))
            elif (
                self.is_validator
                and engine.step != Step.COMMIT
                and since >= config.rebroadcast_interval_ms
                and now - self._last_rebroadcast_ms >= config.rebroadcast_interval_ms
            ):
                self._last_rebroadcast_ms = now
                await self._events_send.send(_RebroadcastEvent(engine.height))
            await self._sleep_or_wake(now + config.idle_poll_ms, self._txs_wake)

    # --- block sync -------------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        config = self.config
        # Ask once at start: a node joining (or restarting into) a quiet chain learns the head
        # without waiting for the next block's gossip.
        for _ in range(sync_bursts_max):
            if not (await self._sync_once() and self.catching_up):
                break
        while True:
            self._sync_wake = trio.Event()
            now = self._clock.monotonic_ms()
            interval = config.sync_interval_ms
            if self._engine.step == Step.NEW_HEIGHT and not self.catching_up:
                # Idle and, as far as we know, at the head: a peer that moves on will gossip
                # the next height and wake us, so poll rarely.
                interval *= sync_idle_factor
            if self.catching_up or now - self._height_since_ms >= interval:
                for _ in range(sync_bursts_max):
                    if not (await self._sync_once() and self.catching_up):
                        break
            await self._sleep_or_wake(now + interval, self._sync_wake)

    async def _sync_once(self) -> bool:
        """Ask one peer for the blocks after ours; True if it had some."""
        peer = self._preferred_sync_peer
        self._preferred_sync_peer = None
        if peer is None:
            peers = self._transport.peers()
            if not peers:
                return False
            self._sync_peer_index = (self._sync_peer_index + 1) % len(peers)
            peer = peers[self._sync_peer_index]
        request = SyncRequest(self._committed_height + 1, self.config.sync_blocks_max)
        self.stats.sync_requests_sent += 1
        try:
            data = await self._transport.request(peer, encode(request))
            response = decode(SyncResponse, data, max_bytes=self.config.sync_response_bytes_max)
        except TransportError as exc:
            self.stats.sync_failures += 1
            log.debug("consensus: sync request to %s failed: %s", peer, exc)
            return False
        except DecodeError as exc:
            self._bad(peer, f"bad sync response: {exc}")
            return False
        done = trio.Event()
        await self._events_send.send(_SyncEvent(peer, response, done))
        await done.wait()
        return bool(response.blocks)

    async def _apply_sync(self, peer: PeerId, response: SyncResponse) -> None:
        head_commit = response.head_commit
        if head_commit is not None and head_commit.height > self._best_known_height:
            if head_commit.height != response.head_height:
                self._bad(peer, "sync: head commit is not for the head height")
                return
            try:
                verify_commit(head_commit, self.validators, self.chain_id)
            except InvalidCommit as exc:
                self._bad(peer, f"sync: head {exc}")
                return
            self._best_known_height = head_commit.height
        elif response.head_height > max(self._best_known_height, self._committed_height):
            # A height without its commit is not believed (a peer could keep us "catching up"
            # forever); only the blocks it sent, each with a commit, count.
            self.stats.sync_unproven_heads += 1
        for synced in response.blocks:
            if synced.height <= self._committed_height:
                continue
            if synced.height != self._committed_height + 1 or synced.commit.height != synced.height:
                self._bad(peer, "sync response out of order")
                return
            try:
                verify_commit(synced.commit, self.validators, self.chain_id)
            except InvalidCommit as exc:
                self._bad(peer, f"sync: {exc}")
                return
            if not self._proposer_fits(synced.height, synced.commit.round, synced.block):
                self._bad(peer, "sync: block names a proposer of no round up to its commit")
                return
            if not await self._validate(synced.height, synced.block, synced.commit.block_hash):
                self._bad(peer, "sync: block does not match its commit or is invalid")
                return
            self.stats.blocks_synced += 1
            await self._commit(synced.height, synced.block, synced.commit)


def _verify_cached(message: Proposal | Vote, chain_id: str) -> bool:
    key = digest(chain_id.encode() + b"\0" + encode(message))
    if key in _verified:
        _verified.move_to_end(key)
        return True
    if not verify_message(message, chain_id):
        return False
    _verified[key] = None
    if len(_verified) > verified_cache_max:
        _verified.popitem(last=False)
    return True


def _slot(message: Proposal | Vote) -> tuple[int, int, int]:
    step = 0 if isinstance(message, Proposal) else int(message.vote_type)
    return (message.height, message.round, step)


def _block_hash_of(message: Proposal | Vote) -> bytes:
    return message.block_hash


def _decode_envelope(data: bytes, max_bytes: int) -> Proposal | Vote | None:
    """Raise ``DecodeError`` on bad bytes; None for a kind this version does not know."""
    envelope = decode(Envelope, data, max_bytes=max_bytes)
    if envelope.kind == MessageKind.PROPOSAL:
        return decode(Proposal, envelope.body, max_bytes=max_bytes)
    if envelope.kind == MessageKind.VOTE:
        return decode(Vote, envelope.body, max_bytes=max_bytes)
    return None
