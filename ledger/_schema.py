"""Every key the ledger store writes, in one place.

One byte of prefix names the table; fixed-width big-endian heights keep blocks in order.

=========================  ==========================================================
key                        value
=========================  ==========================================================
``M``                      ``StoreMeta``: chain id and genesis hash (checked on open)
``H``                      ``Head``: height, hash, time and state root of the last block
``b`` + height (8 bytes)   ``Block``
``c`` + height (8 bytes)   ``Commit`` (the certificate consensus produced)
``h`` + block hash         height (8 bytes)
``x`` + tx hash            ``TxRecord``: the transaction, where it is, and its result
``a`` + address            ``Account``
``t`` + job id             ``Trade`` (kept after it closes, for the read API)
``r`` + job id             ``ReceiptRecord``: the receipt that settled the trade
=========================  ==========================================================
"""

from __future__ import annotations

META = b"M"
HEAD = b"H"
BLOCK_PREFIX = b"b"
COMMIT_PREFIX = b"c"
BLOCK_HASH_PREFIX = b"h"
TX_PREFIX = b"x"
ACCOUNT_PREFIX = b"a"
TRADE_PREFIX = b"t"
RECEIPT_PREFIX = b"r"

height_bytes = 8


def encode_height(height: int) -> bytes:
    return height.to_bytes(height_bytes, "big")


def decode_height(data: bytes) -> int:
    assert len(data) == height_bytes, "a stored height is 8 bytes"
    return int.from_bytes(data, "big")


def block_key(height: int) -> bytes:
    return BLOCK_PREFIX + encode_height(height)


def commit_key(height: int) -> bytes:
    return COMMIT_PREFIX + encode_height(height)


def block_hash_key(block_hash: bytes) -> bytes:
    return BLOCK_HASH_PREFIX + block_hash


def tx_key(tx_hash: bytes) -> bytes:
    return TX_PREFIX + tx_hash


def account_key(address: bytes) -> bytes:
    return ACCOUNT_PREFIX + address


def trade_key(job_id: bytes) -> bytes:
    return TRADE_PREFIX + job_id


def receipt_key(job_id: bytes) -> bytes:
    return RECEIPT_PREFIX + job_id
