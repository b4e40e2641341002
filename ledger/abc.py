"""The ledger's interfaces: the key-value backend and the block store's read/write API."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from ledger._genesis import Genesis
    from ledger._state import BlockResults, LedgerState
    from ledger._store import Head, ReceiptRecord, TxRecord
    from ledger.types import Account, Block, Commit, Trade


class KeyValueAPI(abc.ABC):
    """Bytes to bytes with one atomic, durable batch write."""

    @abc.abstractmethod
    def get(self, key: bytes) -> bytes | None: ...

    @abc.abstractmethod
    def write_batch(self, puts: Iterable[tuple[bytes, bytes]], deletes: Iterable[bytes]) -> None:
        """Apply every put and delete or none of them, durably (synced) before returning."""

    @abc.abstractmethod
    def iterate_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Every pair whose key starts with ``prefix``, in key order."""

    @abc.abstractmethod
    def close(self) -> None: ...


class StoreAPI(abc.ABC):
    """Committed blocks, their certificates and results, and the state they produced."""

    @abc.abstractmethod
    def commit_block(
        self, block: Block, commit: Commit | None, new_state: LedgerState, results: BlockResults
    ) -> None:
        """Persist ``block`` (the next after the head) and its effects in one synced batch."""

    @abc.abstractmethod
    def load_state(self, genesis: Genesis) -> LedgerState:
        """The state at the head (genesis's state on an empty store), checked against its root."""

    @abc.abstractmethod
    def head(self) -> Head | None: ...

    @abc.abstractmethod
    def block(self, height: int) -> Block | None: ...

    @abc.abstractmethod
    def block_by_hash(self, block_hash: bytes) -> Block | None: ...

    @abc.abstractmethod
    def commit(self, height: int) -> Commit | None: ...

    @abc.abstractmethod
    def transaction(self, tx_hash: bytes) -> TxRecord | None: ...

    @abc.abstractmethod
    def receipt(self, job_id: bytes) -> ReceiptRecord | None: ...

    @abc.abstractmethod
    def trade(self, job_id: bytes) -> Trade | None: ...

    @abc.abstractmethod
    def account(self, address: bytes) -> Account:
        """An address never seen is an empty account (all zeros)."""

    @abc.abstractmethod
    def close(self) -> None: ...
