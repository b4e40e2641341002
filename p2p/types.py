"""Wire and record types of the p2p layer: ids, peer records, gossip messages, peer events."""

from __future__ import annotations

import dataclasses
import enum
from typing import NewType

PeerId = NewType("PeerId", str)
"""A libp2p peer id in its base58 text form (``12D3KooW...`` for Ed25519 keys)."""


class PeerSource(enum.StrEnum):
    """How we first came to know a connected peer."""

    BOOTSTRAP = "bootstrap"
    MDNS = "mdns"
    DHT = "dht"
    GOSSIP = "gossip"
    """A peer record on the chain's ``peers`` topic (``p2p/_records.py``)."""
    INBOUND = "inbound"


@dataclasses.dataclass(frozen=True, slots=True)
class PeerInfo:
    """A connected peer as the mesh sees it."""

    peer_id: PeerId
    addrs: tuple[str, ...]
    source: PeerSource
    connected_since_ms: int


@dataclasses.dataclass(frozen=True, slots=True)
class GossipMessage:
    """A validated gossip message, as a subscriber receives it."""

    topic: str
    sender_public_key: bytes
    sender_peer_id: PeerId
    type_tag: str
    payload: bytes
    timestamp_ms: int
    message_id: bytes


class Verdict(enum.StrEnum):
    """A subscriber validator's answer (``True``/``False`` mean ACCEPT/REJECT).

    ACCEPT: deliver and forward. REJECT: invalid; not forwarded, and it counts toward the
    forwarding peer's ban score. IGNORE: not forwarded and not delivered, but not the peer's
    fault (a stale or already-known item, one that depends on our local state): no score.
    """

    ACCEPT = "accept"
    IGNORE = "ignore"
    REJECT = "reject"


class PeerEventKind(enum.StrEnum):
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"


@dataclasses.dataclass(frozen=True, slots=True)
class PeerEvent:
    """A peer connected or disconnected (for subscriptions such as the RPC ``net_peers``)."""

    kind: PeerEventKind
    peer_id: PeerId
    source: PeerSource | None
    at_ms: int
