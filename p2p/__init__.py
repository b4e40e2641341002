"""The p2p layer: a libp2p host, discovery, validated gossip and request/response.

Where things live:
- ``config``: ``P2PConfig``, every knob, with ``default()`` and ``for_tests()``.
- ``_mesh``: ``Mesh``, the one service the node daemon composes (host over TCP + Noise +
  Yamux, discovery by bootstrap / mDNS / Kademlia DHT, the peer table, gossip, statistics).
- ``_envelope``: the signed gossip envelope and its canonical msgpack codec.
- ``_reqresp``: request/response over streams with length-prefixed, size-capped frames.
- ``_identity``: the node's Ed25519 seed as a libp2p key pair and peer id.
- ``_stats``: the counters behind ``Mesh.statistics()``.
- ``_limits``: per-peer token-bucket rate limits and decaying ban scores.
- ``_router``: GossipSub for the StrictNoSign wire format (content-addressed message cache,
  lean forwarding); ``_tuning``: py-libp2p hot paths cached or replaced (yamux credit, signed
  peer records).
- ``types``: ``PeerId``, ``PeerInfo``, ``PeerSource``, ``GossipMessage``, ``PeerEvent``,
  ``Verdict`` (a validator's ACCEPT / IGNORE / REJECT).
- ``abc``: ``MeshAPI``; ``exceptions``: ``P2PError`` and its subclasses.
- ``testing``: start N in-process meshes on loopback (tests, scripts, benchmarks).

p2p imports nothing else of gpumesh: it deals in bytes, peer ids and its own envelopes.
"""

from p2p._envelope import Envelope, decode_envelope, encode_envelope, sign_envelope
from p2p._identity import peer_id_of
from p2p._mesh import Mesh, Validator, topic_name
from p2p._reqresp import Handler
from p2p.abc import MeshAPI
from p2p.config import MESHSUB_1_0, MESHSUB_1_1, MESHSUB_1_2, P2PConfig
from p2p.exceptions import (
    ConfigError,
    EnvelopeError,
    FrameTooLarge,
    GossipTooLarge,
    NotRunning,
    P2PError,
    PeerUnreachable,
    ProtocolUnsupported,
    RemoteError,
    RequestError,
    RequestTimeout,
    SignatureInvalid,
    StreamClosed,
)
from p2p.types import (
    GossipMessage,
    PeerEvent,
    PeerEventKind,
    PeerId,
    PeerInfo,
    PeerSource,
    Verdict,
)

__all__ = [
    "MESHSUB_1_0",
    "MESHSUB_1_1",
    "MESHSUB_1_2",
    "ConfigError",
    "Envelope",
    "EnvelopeError",
    "FrameTooLarge",
    "GossipMessage",
    "GossipTooLarge",
    "Handler",
    "Mesh",
    "MeshAPI",
    "NotRunning",
    "P2PConfig",
    "P2PError",
    "PeerEvent",
    "PeerEventKind",
    "PeerId",
    "PeerInfo",
    "PeerSource",
    "PeerUnreachable",
    "ProtocolUnsupported",
    "RemoteError",
    "RequestError",
    "RequestTimeout",
    "SignatureInvalid",
    "StreamClosed",
    "Validator",
    "Verdict",
    "decode_envelope",
    "encode_envelope",
    "peer_id_of",
    "sign_envelope",
    "topic_name",
]
