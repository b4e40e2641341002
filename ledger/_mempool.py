"""The mempool: transactions waiting for a block, bounded, in per-sender nonce order.

``add`` runs the stateless checks (signature included) and the stateful ones against the last
committed state, allowing a nonce up to ``nonce_gap_max`` ahead of the account's. ``reap`` hands
a proposer transactions that apply cleanly in order on top of that state (it simulates them, so
a sender's pending transactions that together overspend are cut where the money runs out).
``update`` takes the newly committed state and evicts what the block made stale.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from typing import TYPE_CHECKING

from ledger._codec import encode
from ledger._state import LedgerState, _Overlay, _transition
from ledger.exceptions import InvalidTransaction, MempoolRejected
from ledger.types import Block, Transaction, TxHash, transaction_bytes_max, tx_hash

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ledger._keys import Address

mempool_transactions_max = 20_000
mempool_bytes_max = 32 * 1024 * 1024
nonce_gap_max = 64
"""How far past the account's nonce a pending transaction may be."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Entry:
    tx: Transaction
    tx_hash: TxHash
    size: int
    seq: int


@dataclasses.dataclass(frozen=True, slots=True)
class MempoolStatistics:
    transactions: int
    bytes: int
    senders: int


class Mempool:
    def __init__(
        self,
        state: LedgerState,
        *,
        transactions_max: int = mempool_transactions_max,
        bytes_max: int = mempool_bytes_max,
    ) -> None:
        self._state = state
        self._transactions_max = transactions_max
        self._bytes_max = bytes_max
        self._by_hash: dict[TxHash, _Entry] = {}
        self._by_sender: dict[Address, dict[int, _Entry]] = {}
        self._bytes = 0
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._by_hash)

    def __contains__(self, tx_hash: object) -> bool:
        return tx_hash in self._by_hash

    def __iter__(self) -> Iterator[Transaction]:
        return iter([e.tx for e in self._by_hash.values()])

    def get(self, tx_hash: bytes) -> Transaction | None:
        entry = self._by_hash.get(TxHash(tx_hash))
        return None if entry is None else entry.tx

    def next_nonce(self, sender: bytes) -> int:
        """The account's nonce, moved past every pending nonce of ``sender`` that follows it."""
        nonce = self._state.account(sender).nonce
        pending = self._by_sender.get(sender, {})  # type: ignore[call-overload]
        while nonce in pending:
            nonce += 1
        return nonce

    def statistics(self) -> MempoolStatistics:
        return MempoolStatistics(len(self._by_hash), self._bytes, len(self._by_sender))

    def add(self, tx: Transaction) -> TxHash:
        """Accept ``tx`` and return its hash, or raise ``MempoolRejected`` with the reason:
        ``too_large``, ``duplicate``, ``invalid``, ``stale_nonce``, ``nonce_gap``,
        ``nonce_taken``, ``rejected`` (a stateful check failed) or ``full``."""
        try:
            size = len(encode(tx))
        except (TypeError, OverflowError) as exc:
            raise MempoolRejected("invalid", str(exc)) from exc
        if size > transaction_bytes_max:
            raise MempoolRejected("too_large", f"{size} bytes > {transaction_bytes_max}")
        txh = tx_hash(tx)
        if txh in self._by_hash:
            raise MempoolRejected("duplicate", txh.hex())
        try:
            tx.validate(self._state.chain_id)
        except InvalidTransaction as exc:
            raise MempoolRejected("invalid", str(exc)) from exc
        account_nonce = self._state.account(tx.signer).nonce
        if tx.nonce < account_nonce:
            raise MempoolRejected("stale_nonce", f"{tx.nonce} < account nonce {account_nonce}")
        if tx.nonce > account_nonce + nonce_gap_max:
            raise MempoolRejected(
                "nonce_gap", f"{tx.nonce} is more than {nonce_gap_max} past {account_nonce}"
            )
        pending = self._by_sender.get(tx.signer, {})
        if tx.nonce in pending:
            raise MempoolRejected("nonce_taken", f"nonce {tx.nonce} is already pending")
        try:
            self._check_state(tx, txh)
        except InvalidTransaction as exc:
            raise MempoolRejected("rejected", str(exc)) from exc
        if len(self._by_hash) >= self._transactions_max or self._bytes + size > self._bytes_max:
            raise MempoolRejected("full", f"{len(self._by_hash)} transactions, {self._bytes} B")
        entry = _Entry(tx, txh, size, next(self._seq))
        self._by_hash[txh] = entry
        self._by_sender.setdefault(tx.signer, {})[tx.nonce] = entry
        self._bytes += size
        return txh

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
        (default: just after the state's), oldest senders first, each sender in nonce order,
        each one checked to apply on top of those before it."""
        block_time = self._state.time_ms + 1 if time_ms is None else time_ms
        height = self._state.height + 1
        view = _Overlay(self._state)
        heap: list[tuple[int, Address, int]] = []
        for sender, pending in self._by_sender.items():
            nonce = self._state.account(sender).nonce
            first = pending.get(nonce)
            if first is not None:
                heap.append((first.seq, sender, nonce))
        heapq.heapify(heap)
        chosen: list[Transaction] = []
        used_bytes = 0
        while heap and len(chosen) < max_txs:
            _, sender, nonce = heapq.heappop(heap)
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
                heapq.heappush(heap, (following.seq, sender, nonce + 1))
        return chosen

    def update(self, block: Block, state: LedgerState) -> None:
        """Move to ``state`` (the state after ``block`` committed): drop the block's
        transactions and every pending one that can no longer apply."""
        assert state.height == block.height, "update with the state after the block"
        self._state = state
        for tx in block.transactions:
            entry = self._by_hash.get(tx_hash(tx))
            if entry is not None:
                self._remove(entry)
        for entry in list(self._by_hash.values()):
            if entry.tx.nonce < state.account(entry.tx.signer).nonce:
                self._remove(entry)
                continue
            try:
                self._check_state(entry.tx, entry.tx_hash)
            except InvalidTransaction:
                self._remove(entry)

    def _remove(self, entry: _Entry) -> None:
        del self._by_hash[entry.tx_hash]
        pending = self._by_sender[entry.tx.signer]
        del pending[entry.tx.nonce]
        if not pending:
            del self._by_sender[entry.tx.signer]
        self._bytes -= entry.size
