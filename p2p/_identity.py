"""The node key as libp2p sees it: one 32-byte Ed25519 seed gives the peer id and public key."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p.crypto.ed25519 import Ed25519PublicKey as Libp2pEd25519PublicKey
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from p2p.exceptions import ConfigError
from p2p.types import PeerId

if TYPE_CHECKING:
    from libp2p.crypto.keys import KeyPair

seed_bytes = 32


def key_pair_from_seed(seed: bytes) -> KeyPair:
    if len(seed) != seed_bytes:
        raise ConfigError(f"node seed must be {seed_bytes} bytes, got {len(seed)}")
    return create_new_key_pair(seed)


def private_key_from_seed(seed: bytes) -> Ed25519PrivateKey:
    if len(seed) != seed_bytes:
        raise ConfigError(f"node seed must be {seed_bytes} bytes, got {len(seed)}")
    return Ed25519PrivateKey.from_private_bytes(seed)


@functools.lru_cache(maxsize=4096)
def peer_id_bytes_of(public_key: bytes) -> bytes:
    """The binary libp2p peer id (identity multihash) of a raw Ed25519 public key."""
    result: bytes = ID.from_pubkey(Libp2pEd25519PublicKey.from_bytes(public_key)).to_bytes()
    return result


@functools.lru_cache(maxsize=4096)
def peer_id_of(public_key: bytes) -> PeerId:
    """The text peer id of a raw 32-byte Ed25519 public key (base58, cached: every message
    delivered names its sender by it)."""
    return PeerId(ID(peer_id_bytes_of(public_key)).to_base58())
