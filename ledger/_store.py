"""The block store: one implementation over a key-value backend, LevelDB or memory.

Committing a block is one write batch with ``sync=True``: the block, its certificate, every
transaction record, every account and trade the block changed, the receipts it settled and the
new head all land together. LevelDB applies a batch atomically through its log, so after a crash
the store holds the state before the block or after it, never a mix.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

import plyvel

from ledger import _schema as schema
from ledger._codec import decode, encode
from ledger._keys import Address
from ledger._state import BlockResults, LedgerState
from ledger.abc import KeyValueAPI, StoreAPI
from ledger.exceptions import DecodeError, StoreError
from ledger.types import (
    Account,
    Block,
    BlockHash,
    Commit,
    JobId,
    Receipt,
    Trade,
    TradeStatus,
    Transaction,
    TxHash,
    block_bytes_max,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from ledger._genesis import Genesis


@dataclasses.dataclass(frozen=True, slots=True)
class StoreMeta:
    chain_id: str
    genesis_hash: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Head:
    height: int
    block_hash: BlockHash
    time_ms: int
    state_root: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class TxRecord:
    """A committed transaction: where it is and whether it succeeded (``error`` says why not)."""

    tx: Transaction
    height: int
    index: int
    ok: bool
    error: str


@dataclasses.dataclass(frozen=True, slots=True)
class ReceiptRecord:
    receipt: Receipt
    tx_hash: TxHash
    height: int


class MemoryKeyValue(KeyValueAPI):
    """The in-memory twin of LevelDB: same contract, nothing durable."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._closed = False

    def get(self, key: bytes) -> bytes | None:
        assert not self._closed, "store used after close"
        return self._data.get(key)

    def write_batch(self, puts: Iterable[tuple[bytes, bytes]], deletes: Iterable[bytes]) -> None:
        assert not self._closed, "store used after close"
        # Build the whole change first so a failure half way leaves the data untouched.
        staged = dict(puts)
        doomed = list(deletes)
        for key in doomed:
            self._data.pop(key, None)
        self._data.update(staged)

    def iterate_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        assert not self._closed, "store used after close"
        for key in sorted(k for k in self._data if k.startswith(prefix)):
            yield key, self._data[key]

    def close(self) -> None:
        self._closed = True


class LevelDBKeyValue(KeyValueAPI):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            self._db = plyvel.DB(os.fspath(path), create_if_missing=True)
        except plyvel.Error as exc:
            raise StoreError(f"cannot open the ledger store at {path}: {exc}") from exc

    def get(self, key: bytes) -> bytes | None:
        value: bytes | None = self._db.get(key)
        return value

    def write_batch(self, puts: Iterable[tuple[bytes, bytes]], deletes: Iterable[bytes]) -> None:
        # transaction=True: plyvel discards the batch if building it raises half way.
        with self._db.write_batch(sync=True, transaction=True) as batch:
            for key in deletes:
                batch.delete(key)
            for key, value in puts:
                batch.put(key, value)

    def iterate_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        with self._db.iterator(prefix=prefix) as iterator:
            yield from iterator

    def close(self) -> None:
        self._db.close()


class Store(StoreAPI):
    """The ledger store over any ``KeyValueAPI``; see ``LevelDBStore`` and ``MemoryStore``."""

    def __init__(self, kv: KeyValueAPI) -> None:
        self._kv = kv

    def _get(self, cls: type[object], key: bytes) -> object | None:
        data = self._kv.get(key)
        if data is None:
            return None
        try:
            return decode(cls, data, max_bytes=block_bytes_max)
        except DecodeError as exc:
            raise StoreError(f"corrupt store: key {key.hex()} does not decode: {exc}") from exc

    # -- writing ------------------------------------------------------------------------------

    def commit_block(
        self, block: Block, commit: Commit | None, new_state: LedgerState, results: BlockResults
    ) -> None:
        head = self.head()
        expected_height = 1 if head is None else head.height + 1
        if block.height != expected_height:
            raise StoreError(f"block {block.height} is not the next block ({expected_height})")
        if head is not None and block.prev_hash != head.block_hash:
            raise StoreError(f"block {block.height} does not extend the stored head")
        block_hash = block.hash()
        if new_state.height != block.height or new_state.block_hash != block_hash:
            raise StoreError("the state passed to commit_block is not the state after the block")
        if len(results.tx_results) != len(block.transactions):
            raise StoreError("one result per transaction is required")
        if commit is not None and (commit.height, commit.block_hash) != (block.height, block_hash):
            raise StoreError("the commit certificate is for a different block")
        height = block.height
        puts: list[tuple[bytes, bytes]] = []
        if head is None:
            meta = StoreMeta(new_state.chain_id, block.prev_hash)
            puts.append((schema.META, encode(meta)))
        puts.append((schema.block_key(height), encode(block)))
        if commit is not None:
            puts.append((schema.commit_key(height), encode(commit)))
        puts.append((schema.block_hash_key(block_hash), schema.encode_height(height)))
        for index, (tx, result) in enumerate(
            zip(block.transactions, results.tx_results, strict=True)
        ):
            record = TxRecord(tx, height, index, result.ok, result.error)
            puts.append((schema.tx_key(result.tx_hash), encode(record)))
            if result.ok and isinstance(tx, Receipt):
                receipt = ReceiptRecord(tx, result.tx_hash, height)
                puts.append((schema.receipt_key(tx.job_id), encode(receipt)))
        # The first block also writes every genesis account: the store holds the whole state.
        changed_accounts = new_state.accounts if head is None else results.accounts
        for address, account in changed_accounts.items():
            puts.append((schema.account_key(address), encode(account)))
        for job_id, trade in results.trades.items():
            puts.append((schema.trade_key(job_id), encode(trade)))
        head = Head(height, block_hash, block.time_ms, new_state.root)
        puts.append((schema.HEAD, encode(head)))
        # Trades pruned from the state stay in the store for the read API; nothing to delete.
        self._kv.write_batch(puts, ())

    # -- reading ------------------------------------------------------------------------------

    def load_state(self, genesis: Genesis) -> LedgerState:
        head = self.head()
        if head is None:
            return genesis.initial_state()
        meta = self._get(StoreMeta, schema.META)
        if not isinstance(meta, StoreMeta):
            raise StoreError("corrupt store: a head but no metadata")
        if (meta.chain_id, meta.genesis_hash) != (genesis.chain_id, genesis.hash()):
            raise StoreError(f"the store holds chain {meta.chain_id!r}, not this genesis")
        accounts: dict[Address, Account] = {}
        for key, value in self._kv.iterate_prefix(schema.ACCOUNT_PREFIX):
            accounts[Address(key[1:])] = decode(Account, value)
        trades: dict[JobId, Trade] = {}
        for key, value in self._kv.iterate_prefix(schema.TRADE_PREFIX):
            trade = decode(Trade, value)
            # The state keeps open trades, and closed ones until a block's time is past their
            # deadline (see ledger._state); a trade closed by the head block is still there.
            if (
                trade.status is TradeStatus.OPEN
                or trade.terms.deadline_ms + genesis.params.evidence_window_ms >= head.time_ms
                or trade.closed_height == head.height
            ):
                trades[JobId(key[1:])] = trade
        state = LedgerState(
            chain_id=genesis.chain_id,
            height=head.height,
            block_hash=head.block_hash,
            time_ms=head.time_ms,
            accounts=accounts,
            trades=trades,
            validators=genesis.validators,
            supply=genesis.supply(),
            params=genesis.params,
        )
        if state.root != head.state_root:
            raise StoreError(
                f"corrupt store: state root {state.root.hex()} != head's {head.state_root.hex()}"
            )
        return state

    def head(self) -> Head | None:
        head = self._get(Head, schema.HEAD)
        assert head is None or isinstance(head, Head)
        return head

    def block(self, height: int) -> Block | None:
        if not 0 < height < 2**64:
            return None
        block = self._get(Block, schema.block_key(height))
        assert block is None or isinstance(block, Block)
        return block

    def block_by_hash(self, block_hash: bytes) -> Block | None:
        data = self._kv.get(schema.block_hash_key(block_hash))
        return None if data is None else self.block(schema.decode_height(data))

    def commit(self, height: int) -> Commit | None:
        if not 0 < height < 2**64:
            return None
        commit = self._get(Commit, schema.commit_key(height))
        assert commit is None or isinstance(commit, Commit)
        return commit

    def transaction(self, tx_hash: bytes) -> TxRecord | None:
        record = self._get(TxRecord, schema.tx_key(tx_hash))
        assert record is None or isinstance(record, TxRecord)
        return record

    def receipt(self, job_id: bytes) -> ReceiptRecord | None:
        record = self._get(ReceiptRecord, schema.receipt_key(job_id))
        assert record is None or isinstance(record, ReceiptRecord)
        return record

    def trade(self, job_id: bytes) -> Trade | None:
        trade = self._get(Trade, schema.trade_key(job_id))
        assert trade is None or isinstance(trade, Trade)
        return trade

    def account(self, address: bytes) -> Account:
        account = self._get(Account, schema.account_key(address))
        assert account is None or isinstance(account, Account)
        return account or Account()

    def close(self) -> None:
        self._kv.close()


class LevelDBStore(Store):
    """The durable store: a LevelDB directory at ``path`` (created if missing)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(LevelDBKeyValue(path))


class MemoryStore(Store):
    """The in-memory twin of ``LevelDBStore`` for tests and simulations."""

    def __init__(self) -> None:
        super().__init__(MemoryKeyValue())
