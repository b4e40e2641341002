"""The ledger: canonical types and codec, signing, the pure state transition, storage, mempool.

Where things live:
- ``_codec``: the one canonical msgpack encoding (``encode``, ``decode``, ``hash_of``).
- ``_keys``: Ed25519 keys, addresses and domain-separated signatures.
- ``types``: transactions (``Transfer``, ``Agreement`` with provider-signed ``AgreementTerms``,
  ``Receipt``, ``Refund``, ``Cancel``, ``Stake``, ``Unbond``), ``ChainParams``, ``Account``,
  ``Trade``, ``Block``, ``Commit``.
- ``_state``: ``LedgerState``, the pure ``apply_block``, ``build_block`` and ``state_root``.
- ``_genesis``: ``Genesis`` (JSON in and out, the initial state).
- ``_schema``: every key the store writes; ``_store``: ``LevelDBStore`` and ``MemoryStore``.
- ``_mempool``: ``Mempool``.
- ``abc``: ``StoreAPI`` and ``KeyValueAPI``; ``exceptions``: ``LedgerError`` and subclasses.
- ``testing``: deterministic keys and transaction factories for tests and benchmarks.

The ledger imports nothing else of gpumesh; every other package may import it.
"""

from ledger._codec import decode, digest, encode, hash_of, unpack
from ledger._genesis import Genesis, GenesisAccount
from ledger._keys import (
    Address,
    SignedObject,
    SigningKey,
    sign_object,
    signed_body,
    signing_bytes,
    verify,
    verify_object,
)
from ledger._mempool import Mempool, MempoolStatistics
from ledger._state import (
    BlockResults,
    LedgerState,
    apply_block,
    build_block,
    check_transaction,
    state_root,
    tx_root,
)
from ledger._store import (
    Head,
    LevelDBStore,
    MemoryStore,
    ReceiptRecord,
    Store,
    TxRecord,
)
from ledger.abc import KeyValueAPI, StoreAPI
from ledger.exceptions import (
    DecodeError,
    InvalidBlock,
    InvalidGenesis,
    InvalidTransaction,
    LedgerError,
    MempoolRejected,
    SignatureError,
    StoreError,
)
from ledger.types import (
    Account,
    Agreement,
    AgreementTerms,
    Block,
    BlockHash,
    BlockHeader,
    Cancel,
    ChainParams,
    Commit,
    CommitSig,
    Height,
    JobId,
    Receipt,
    Refund,
    Stake,
    Trade,
    TradeStatus,
    Transaction,
    Transfer,
    TxHash,
    TxKind,
    TxResult,
    Unbond,
    Validator,
    tx_hash,
)

__all__ = [
    "Account",
    "Address",
    "Agreement",
    "AgreementTerms",
    "Block",
    "BlockHash",
    "BlockHeader",
    "BlockResults",
    "Cancel",
    "ChainParams",
    "Commit",
    "CommitSig",
    "DecodeError",
    "Genesis",
    "GenesisAccount",
    "Head",
    "Height",
    "InvalidBlock",
    "InvalidGenesis",
    "InvalidTransaction",
    "JobId",
    "KeyValueAPI",
    "LedgerError",
    "LedgerState",
    "LevelDBStore",
    "MemoryStore",
    "Mempool",
    "MempoolRejected",
    "MempoolStatistics",
    "Receipt",
    "ReceiptRecord",
    "Refund",
    "SignatureError",
    "SignedObject",
    "SigningKey",
    "Stake",
    "Store",
    "StoreAPI",
    "StoreError",
    "Trade",
    "TradeStatus",
    "Transaction",
    "Transfer",
    "TxHash",
    "TxKind",
    "TxRecord",
    "TxResult",
    "Unbond",
    "Validator",
    "apply_block",
    "build_block",
    "check_transaction",
    "decode",
    "digest",
    "encode",
    "hash_of",
    "sign_object",
    "signed_body",
    "signing_bytes",
    "state_root",
    "tx_hash",
    "tx_root",
    "unpack",
    "verify",
    "verify_object",
]
