"""The signed gossip envelope and its canonical msgpack encoding.

p2p may not import ``ledger``, so it carries its own minimal codec: an envelope is a msgpack
array of its six field values in declaration order, and decoding rejects any input that does
not re-encode to exactly the same bytes. One envelope therefore has one encoding, and its
SHA-256 is a stable message id (duplicates dedupe by content).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from p2p.exceptions import EnvelopeError, SignatureInvalid

GOSSIP_DOMAIN = "gpumesh-gossip/1"
public_key_bytes = 32
signature_bytes = 64
type_tag_chars_max = 64
chain_id_chars_max = 64
envelope_overhead_bytes_max = 256
"""Upper bound of an envelope's bytes beyond its payload (keys, tags, msgpack headers)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Envelope:
    """What travels in a gossipsub message's data: a payload signed by its sender's node key."""

    chain_id: str
    type_tag: str
    payload: bytes
    sender: bytes
    timestamp_ms: int
    signature: bytes


def signing_bytes(chain_id: str, type_tag: str, payload: bytes, timestamp_ms: int) -> bytes:
    """What the envelope signature covers; the domain keeps it apart from ledger signatures."""
    packed: bytes = msgpack.packb(
        [GOSSIP_DOMAIN, chain_id, type_tag, payload, timestamp_ms], use_bin_type=True
    )
    return packed


def encode_envelope(envelope: Envelope) -> bytes:
    packed: bytes = msgpack.packb(
        [
            envelope.chain_id,
            envelope.type_tag,
            envelope.payload,
            envelope.sender,
            envelope.timestamp_ms,
            envelope.signature,
        ],
        use_bin_type=True,
    )
    return packed


def message_id(data: bytes) -> bytes:
    """The gossipsub message id: SHA-256 of the envelope bytes (content addressed)."""
    return hashlib.sha256(data).digest()


def sign_envelope(
    key: Ed25519PrivateKey, chain_id: str, type_tag: str, payload: bytes, timestamp_ms: int
) -> Envelope:
    sender = key.public_key().public_bytes_raw()
    signature = key.sign(signing_bytes(chain_id, type_tag, payload, timestamp_ms))
    return Envelope(chain_id, type_tag, payload, sender, timestamp_ms, signature)


def _field(value: Any, kind: type, name: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise EnvelopeError(f"envelope.{name}: expected {kind.__name__}")
    return value


def decode_envelope(data: bytes, *, bytes_max: int) -> Envelope:
    """Parse and type-check ``data``; raise ``EnvelopeError`` unless it is canonical."""
    if len(data) > bytes_max:
        raise EnvelopeError(f"envelope is {len(data)} bytes, limit {bytes_max}")
    try:
        items = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise EnvelopeError(f"envelope is not msgpack: {exc}") from None
    if not isinstance(items, list) or len(items) != 6:
        raise EnvelopeError("envelope must be an array of 6 fields")
    envelope = Envelope(
        chain_id=_field(items[0], str, "chain_id"),
        type_tag=_field(items[1], str, "type_tag"),
        payload=_field(items[2], bytes, "payload"),
        sender=_field(items[3], bytes, "sender"),
        timestamp_ms=_field(items[4], int, "timestamp_ms"),
        signature=_field(items[5], bytes, "signature"),
    )
    if len(envelope.chain_id) > chain_id_chars_max or len(envelope.type_tag) > type_tag_chars_max:
        raise EnvelopeError("envelope chain id or type tag too long")
    if len(envelope.sender) != public_key_bytes:
        raise EnvelopeError("envelope.sender must be a 32-byte Ed25519 key")
    if len(envelope.signature) != signature_bytes:
        raise SignatureInvalid("envelope.signature must be 64 bytes")
    if not 0 <= envelope.timestamp_ms < 2**63:
        raise EnvelopeError("envelope.timestamp_ms out of range")
    if encode_envelope(envelope) != data:
        raise EnvelopeError("envelope is not canonically encoded")
    return envelope


def verify_envelope(envelope: Envelope) -> None:
    """Raise ``SignatureInvalid`` unless the sender signed this envelope."""
    try:
        public = Ed25519PublicKey.from_public_bytes(envelope.sender)
        public.verify(
            envelope.signature,
            signing_bytes(
                envelope.chain_id, envelope.type_tag, envelope.payload, envelope.timestamp_ms
            ),
        )
    except (InvalidSignature, ValueError):
        raise SignatureInvalid("envelope signature does not verify") from None
