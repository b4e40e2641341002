"""The ledger: canonical types and codec, signing, the pure state transition, storage, mempool.

Where things live:
- ``_codec``: the one canonical msgpack encoding (``encode``, ``decode``, ``hash_of``).
- ``_keys``: Ed25519 keys, addresses and domain-separated signatures.
- ``exceptions``: ``LedgerError`` and its subclasses.

The ledger imports nothing else of gpumesh; every other package may import it.
"""

from ledger._codec import decode, digest, encode, hash_of, unpack
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
from ledger.exceptions import DecodeError, LedgerError, SignatureError

__all__ = [
    "Address",
    "DecodeError",
    "LedgerError",
    "SignatureError",
    "SignedObject",
    "SigningKey",
    "decode",
    "digest",
    "encode",
    "hash_of",
    "sign_object",
    "signed_body",
    "signing_bytes",
    "unpack",
    "verify",
    "verify_object",
]
