"""The mempool: transactions waiting for a block, bounded, ordered by fee, each sender's in
nonce order.

``add`` runs the stateless checks (signature included) and the stateful ones against the last
committed state (fee at least the chain's ``fee_min``, a sender who can pay it, a nonce up to
``nonce_gap_max`` ahead of the account's, at most ``sender_transactions_max`` pending per
sender). A full pool makes room by evicting the lowest-fee transaction that ends its sender's
nonce chain (never a local one, never one of the newcomer's sender), only for a strictly
higher fee. ``reap`` hands a proposer transactions highest fee first, each sender's in nonce
order, that apply cleanly in order on top of that state (it simulates them, so a sender's
pending transactions that together overspend are cut where the money runs out). ``update``
takes the newly committed state and drops what the block made stale. Nothing leaves silently:
an evicted or dropped transaction's hash is remembered with the reason (``dropped``), and
counted (``statistics``).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
from typing import TYPE_CHECKING, ClassVar

from ledger._codec import encode
from ledger._state import LedgerState, _Overlay, _transition
from ledger.exceptions import InvalidTransaction, MempoolRejected
from ledger.types import Block, Transaction, TxHash, transaction_bytes_max, tx_hash

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from ledger._keys import Address

mempool_transactions_max = 20_000
mempool_bytes_max = 32 * 1024 * 1024
nonce_gap_max = 64
"""How far past the account's nonce a pending transaction may be."""
sender_transactions_max = 64
"""Pending transactions per sender: one key cannot fill the pool."""
dropped_remembered_max = 50_000
"""How many evicted or dropped hashes the pool remembers the reason for."""

REJECT_REASONS = (
    "too_large",
    "duplicate",
    "committed",
    "invalid",
    "fee_too_low",
    "unfunded",
    "stale_nonce",
    "nonce_gap",
    "nonce_taken",
    "sender_full",
    "rejected",
    "full",
)
"""Every ``MempoolRejected.reason`` ``add`` raises."""
PEER_FAULT_REASONS = frozenset({"too_large", "invalid", "fee_too_low"})
"""Refusals that only a broken or hostile sender causes, whatever the receiver's state (a
relay of honest gossip never does): the node scores the peer that relayed them. The others
happen to honest relays: races with blocks, a receiver that is behind (a sender funded, or
nonces used, in blocks it has not applied yet), another node's view of the pool."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Entry:
    tx: Transaction
    tx_hash: TxHash
    size: int
    seq: int
    local: bool


@dataclasses.dataclass(frozen=True, slots=True)
class MempoolStatistics:
    transactions: int
    bytes: int
    senders: int
    local: int
    evicted: int
    """Pushed out by higher-fee transactions while the pool was full."""
    dropped_invalid: int
    """Dropped after a block made them stale or unable to apply."""
    rejected: dict[str, int]
    """Refusals by ``add``, by reason."""


class Mempool:
    reject_reasons: ClassVar[tuple[str, ...]] = REJECT_REASONS
    peer_fault_reasons: ClassVar[frozenset[str]] = PEER_FAULT_REASONS

    def __init__(
        self,
        state: LedgerState,
        *,
        transactions_max: int = mempool_transactions_max,
        bytes_max: int = mempool_bytes_max,
        sender_max: int = sender_transactions_max,
        committed: Callable[[bytes], bool] | None = None,
    ) -> None:
        """``committed(hash)`` says whether a transaction is already in the chain (the
        store's index), so a committed hash is never admitted again."""
        self._state = state
        self._transactions_max = transactions_max
        self._bytes_max = bytes_max
        self._sender_max = sender_max
        self._committed = committed
        self._by_hash: dict[TxHash, _Entry] = {}
        self._by_sender: dict[Address, dict[int, _Entry]] = {}
        self._tails: list[tuple[int, int, TxHash]] = []
        """Heap of (fee, -seq, hash) of entries that ended their sender's chain when pushed;
        checked again when popped (lazy deletion)."""
        self._bytes = 0
        self._local = 0
        self._seq = itertools.count()
        self._dropped: collections.OrderedDict[TxHash, str] = collections.OrderedDict()
        self._evicted = 0
        self._dropped_invalid = 0
        self._rejected: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._by_hash)

    def __contains__(self, tx_hash: object) -> bool:
        return tx_hash in self._by_hash

    def __iter__(self) -> Iterator[Transaction]:
        return iter([e.tx for e in self._by_hash.values()])

    def get(self, tx_hash: bytes) -> Transaction | None:
        entry = self._by_hash.get(TxHash(tx_hash))
        return None if entry is None else entry.tx

    def dropped(self, tx_hash: bytes) -> str | None:
        """Why a transaction that was pending here left without being committed, or None."""
        return self._dropped.get(TxHash(tx_hash))

    def next_nonce(self, sender: bytes) -> int:
        """The account's nonce, moved past every pending nonce of ``sender`` that follows it."""
        nonce = self._state.account(sender).nonce
        pending = self._by_sender.get(sender, {})  # type: ignore[call-overload]
        while nonce in pending:
            nonce += 1
        return nonce

    def statistics(self) -> MempoolStatistics:
        return MempoolStatistics(
            len(self._by_hash),
            self._bytes,
            len(self._by_sender),
            self._local,
            self._evicted,
            self._dropped_invalid,
            dict(self._rejected),
        )

    def add(self, tx: Transaction, *, local: bool = False) -> TxHash:
        """Accept ``tx`` and return its hash, or raise ``MempoolRejected`` with one of
        ``REJECT_REASONS``. A ``local`` transaction (submitted to this node, which promised
        to keep it) is never evicted for another."""
        try:
            return self._add(tx, local)
        except MempoolRejected as exc:
            self._rejected[exc.reason] += 1
            raise

    def _add(self, tx: Transaction, local: bool) -> TxHash:
        try:
            size = len(encode(tx))
        except (TypeError, OverflowError) as exc:
            raise MempoolRejected("invalid", str(exc)) from exc
        if size > transaction_bytes_max:
            raise MempoolRejected("too_large", f"{size} bytes > {transaction_bytes_max}")
        txh = tx_hash(tx)
        if txh in self._by_hash:
            raise MempoolRejected("duplicate", txh.hex())
        if self._committed is not None and self._committed(txh):
            raise MempoolRejected("committed", f"{txh.hex()} is already in the chain")
        try:
            tx.validate(self._state.chain_id)
        except InvalidTransaction as exc:
            raise MempoolRejected("invalid", str(exc)) from exc
        fee_min = self._state.params.fee_min
        if tx.fee < fee_min:
            raise MempoolRejected("fee_too_low", f"fee {tx.fee} is below the minimum {fee_min}")
        account = self._state.account(tx.signer)
        if account.balance < tx.fee:
            raise MempoolRejected(
                "unfunded", f"the sender's balance {account.balance} cannot pay the fee {tx.fee}"
            )
        if tx.nonce < account.nonce:
            raise MempoolRejected("stale_nonce", f"{tx.nonce} < account nonce {account.nonce}")
        if tx.nonce > account.nonce + nonce_gap_max:
            raise MempoolRejected(
                "nonce_gap", f"{tx.nonce} is more than {nonce_gap_max} past {account.nonce}"
            )
        pending = self._by_sender.get(tx.signer, {})
        if tx.nonce in pending:
            raise MempoolRejected("nonce_taken", f"nonce {tx.nonce} is already pending")
        if len(pending) >= self._sender_max:
            raise MempoolRejected(
                "sender_full", f"the sender has {len(pending)} pending transactions"
            )
        try:
            self._check_state(tx, txh)
        except InvalidTransaction as exc:
            raise MempoolRejected("rejected", str(exc)) from exc
        if not self._has_room(1, size):
            victims = self._victims(tx, size)
            if victims is None:
                lowest = self._lowest_evictable_fee(tx.signer)
                detail = f"{len(self._by_hash)} transactions, {self._bytes} B"
                if lowest is not None:
                    detail += f"; the fee must exceed {lowest}"
                raise MempoolRejected("full", detail)
            for victim in victims:
                self._remove(victim)
                self._remember_dropped(victim.tx_hash, f"evicted by a higher fee ({tx.fee})")
                self._evicted += 1
        entry = _Entry(tx, txh, size, next(self._seq), local)
        self._by_hash[txh] = entry
        chain = self._by_sender.setdefault(tx.signer, {})
        chain[tx.nonce] = entry
        self._bytes += size
        self._local += local
        self._dropped.pop(txh, None)
        if tx.nonce == max(chain):
            heapq.heappush(self._tails, (tx.fee, -entry.seq, txh))
        return txh

    def _has_room(self, count: int, size: int) -> bool:
        return (
            len(self._by_hash) + count <= self._transactions_max
            and self._bytes + size <= self._bytes_max
        )

    def _is_tail(self, entry: _Entry, removed: set[TxHash]) -> bool:
        chain = self._by_sender[entry.tx.signer]
        later = [n for n, e in chain.items() if n > entry.tx.nonce and e.tx_hash not in removed]
        return not later

    def _victims(self, tx: Transaction, size: int) -> list[_Entry] | None:
        """The entries to evict so ``tx`` fits (each a remote tail of another sender with a
        fee strictly below ``tx``'s), or None when no such set exists; the heap is left as
        it was apart from stale records dropped."""
        chosen: list[_Entry] = []
        chosen_hashes: set[TxHash] = set()
        kept: list[tuple[int, int, TxHash]] = []
        freed_bytes = 0
        while self._tails and not (
            len(self._by_hash) - len(chosen) + 1 <= self._transactions_max
            and self._bytes - freed_bytes + size <= self._bytes_max
        ):
            record = heapq.heappop(self._tails)
            fee, _, txh = record
            entry = self._by_hash.get(txh)
            if entry is None or txh in chosen_hashes or not self._is_tail(entry, chosen_hashes):
                continue  # stale record
            kept.append(record)
            if fee >= tx.fee:
                break  # every other candidate pays at least as much
            if entry.local or entry.tx.signer == tx.signer:
                continue
            chosen.append(entry)
            chosen_hashes.add(txh)
            freed_bytes += entry.size
            before = self._by_sender[entry.tx.signer].get(entry.tx.nonce - 1)
            if before is not None:
                kept.append((before.tx.fee, -before.seq, before.tx_hash))
                heapq.heappush(self._tails, kept[-1])
        fits = (
            len(self._by_hash) - len(chosen) + 1 <= self._transactions_max
            and self._bytes - freed_bytes + size <= self._bytes_max
        )
        for record in kept:
            heapq.heappush(self._tails, record)
        return chosen if fits else None

    def _lowest_evictable_fee(self, sender: Address) -> int | None:
        for fee, _, txh in heapq.nsmallest(64, self._tails):
            entry = self._by_hash.get(txh)
            if entry is not None and not entry.local and entry.tx.signer != sender:
                return fee
        return None

    def _remember_dropped(self, txh: TxHash, reason: str) -> None:
        self._dropped[txh] = reason
        self._dropped.move_to_end(txh)
        while len(self._dropped) > dropped_remembered_max:
            self._dropped.popitem(last=False)

    def _check_state(self, tx: Transaction, txh: TxHash) -> None:
        # Against the committed state alone (nonce aside): whether earlier pending
        # transactions leave enough is decided by reap's simulation.
        _transition(
            _Overlay(self._state),
            tx,
            txh,
            height=self._state.height + 1,
            time_ms=self._state.time_ms,
            check_nonce=False,
        )

    def reap(
        self, max_txs: int, max_bytes: int, *, time_ms: int | None = None
    ) -> list[Transaction]:
        """Up to ``max_txs`` transactions (``max_bytes`` encoded) for a block at ``time_ms``
        (default: just after the state's), highest fee first (oldest first among equal fees),
        each sender in nonce order, each one checked to apply on top of those before it."""
        block_time = self._state.time_ms + 1 if time_ms is None else time_ms
        height = self._state.height + 1
        view = _Overlay(self._state)
        heap: list[tuple[int, int, Address, int]] = []
        for sender, pending in self._by_sender.items():
            nonce = self._state.account(sender).nonce
            first = pending.get(nonce)
            if first is not None:
                heap.append((-first.tx.fee, first.seq, sender, nonce))
        heapq.heapify(heap)
        chosen: list[Transaction] = []
        used_bytes = 0
        while heap and len(chosen) < max_txs:
            _, _, sender, nonce = heapq.heappop(heap)
            entry = self._by_sender[sender][nonce]
            if used_bytes + entry.size > max_bytes:
                continue
            try:
                accounts, trades = _transition(
                    view, entry.tx, entry.tx_hash, height=height, time_ms=block_time
                )
            except InvalidTransaction:
                continue  # this sender's later nonces cannot apply either
            view.accounts.update(accounts)
            view.trades.update(trades)
            chosen.append(entry.tx)
            used_bytes += entry.size
            following = self._by_sender[sender].get(nonce + 1)
            if following is not None:
                heapq.heappush(heap, (-following.tx.fee, following.seq, sender, nonce + 1))
        return chosen

    def update(self, block: Block, state: LedgerState) -> None:
        """Move to ``state`` (the state after ``block`` committed): drop the block's
        transactions and every pending one that can no longer apply (remembered, counted)."""
        assert state.height == block.height, "update with the state after the block"
        self._state = state
        for tx in block.transactions:
            entry = self._by_hash.get(tx_hash(tx))
            if entry is not None:
                self._remove(entry)
        for entry in list(self._by_hash.values()):
            if entry.tx.nonce < state.account(entry.tx.signer).nonce:
                self._drop(entry, "replaced: another transaction used its nonce")
                continue
            try:
                self._check_state(entry.tx, entry.tx_hash)
            except InvalidTransaction as exc:
                self._drop(entry, f"no longer valid: {exc}")

    def _drop(self, entry: _Entry, reason: str) -> None:
        self._remove(entry)
        self._remember_dropped(entry.tx_hash, reason)
        self._dropped_invalid += 1

    def _remove(self, entry: _Entry) -> None:
        del self._by_hash[entry.tx_hash]
        pending = self._by_sender[entry.tx.signer]
        was_tail = entry.tx.nonce == max(pending)
        del pending[entry.tx.nonce]
        if not pending:
            del self._by_sender[entry.tx.signer]
        elif was_tail:
            tail = pending[max(pending)]
            heapq.heappush(self._tails, (tail.tx.fee, -tail.seq, tail.tx_hash))
        self._bytes -= entry.size
        self._local -= entry.local
        if len(self._tails) > 4 * len(self._by_hash) + 1024:
            self._rebuild_tails()

    def _rebuild_tails(self) -> None:
        self._tails = [
            (tail.tx.fee, -tail.seq, tail.tx_hash)
            for chain in self._by_sender.values()
            for tail in (chain[max(chain)],)
        ]
        heapq.heapify(self._tails)
