"""The journal of this node's own pending transactions (what ``chain_sendTx`` acknowledged).

An acknowledgement is a promise: a transaction is appended and fsynced here before the node
says it has it, and after a restart the node puts every journaled transaction back into its
mempool and gossips it again (the way geth journals local transactions). The journal is
rewritten without what the chain committed or made stale.

Format: records ``[len u32 BE][crc32 u32 BE][canonical transaction]``. Reading stops at the
first short or corrupt record and cuts the file there: a torn append was never acknowledged.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import TYPE_CHECKING

import ledger
from ledger import DecodeError, Transaction
from ledger.types import transaction_bytes_max

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from pathlib import Path

_HEADER = struct.Struct(">II")


class TxJournal:
    """An append-only, fsynced file of transactions. Blocking calls: run them in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records = 0
        """Records in the file (live or not): the chain service rewrites when it grows."""

    def load(self) -> list[Transaction]:
        """Every intact record, in order; a torn or corrupt tail is cut off."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        txs: list[Transaction] = []
        offset = 0
        while offset + _HEADER.size <= len(data):
            size, crc = _HEADER.unpack_from(data, offset)
            body = data[offset + _HEADER.size : offset + _HEADER.size + size]
            if size > transaction_bytes_max or len(body) != size or zlib.crc32(body) != crc:
                break
            try:
                txs.append(ledger.decode(Transaction, body, max_bytes=transaction_bytes_max))  # type: ignore[arg-type]
            except DecodeError:
                break
            offset += _HEADER.size + size
        if offset != len(data):
            with self.path.open("r+b") as f:
                f.truncate(offset)
                os.fsync(f.fileno())
        self.records = len(txs)
        return txs

    def append(self, txs: Sequence[Transaction]) -> None:
        """Append and fsync: on return the transactions survive a crash."""
        data = b"".join(_record(tx) for tx in txs)
        with self.path.open("ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.records += len(txs)

    def rewrite(self, txs: Iterable[Transaction]) -> None:
        """Replace the journal with ``txs`` atomically (temp file, fsync, rename, fsync dir)."""
        kept = list(txs)
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            f.write(b"".join(_record(tx) for tx in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self.records = len(kept)


def _record(tx: Transaction) -> bytes:
    body = ledger.encode(tx)
    return _HEADER.pack(len(body), zlib.crc32(body)) + body
