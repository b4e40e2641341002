"""Peer records over gossip: how nodes of one chain learn of each other in one hop.

Each node publishes, on its chain's ``peers`` topic, a record of where it listens: a msgpack
``[1, [multiaddr, ...]]`` inside the ordinary signed envelope, so the record can only speak
for its signer (the envelope's key is the peer id) and one record has one encoding. Every
node that receives it may dial it at once: a newcomer is known to the whole network within
one gossip propagation, with no lookup streams at all (libp2p's pubsub peer discovery, as
``@libp2p/pubsub-peer-discovery`` does it in js-libp2p).

Why (docs/p2p.md, issue 14): at 34 nodes Kademlia walks were two thirds of the CPU spent
between the last node starting and the full mesh (72 CPU s against 25 with every peer known
up front), each walk being ~20 FIND_NODE streams with multistream negotiation on both sides,
and the connections those lookups open on their own raced the dial loop's tie-break. A
record is one small message per node that every node reads once.

Attack table (the codec's part; rates and bans are the topic's, ``Mesh``'s part):

- A record naming someone else's peer id: a record has no id field, it is its signer's.
- A victim's addresses (dial amplification): at most ``record_addrs_max`` tcp addresses per
  record; each node dials a peer through its backoff, and Noise fails on the wrong key.
- Oversized or malformed records: ``decode_record`` rejects them, and the forwarder is
  scored as for any invalid message.
- A flood of records under sybil keys: the topic's per-peer token bucket; the candidate
  table is bounded (``known_peers_max``).
- A replayed old record: the envelope's age check (``gossip_message_age_max_ms``).
"""

from __future__ import annotations

import msgpack
import multiaddr

from p2p.exceptions import EnvelopeError

PEERS_PURPOSE = "peers"
RECORD_TYPE_TAG = "peer-record/1"
record_version = 1
record_addrs_max = 8
record_addr_chars_max = 128
record_bytes_max = 2048


def encode_record(addrs: list[str]) -> bytes:
    """A record of our listen addresses (without ``/p2p/``), at most ``record_addrs_max``."""
    packed: bytes = msgpack.packb(
        [record_version, [str(a) for a in addrs[:record_addrs_max]]], use_bin_type=True
    )
    return packed


def decode_record(payload: bytes) -> list[multiaddr.Multiaddr]:
    """The dialable TCP addresses of a record; raise ``EnvelopeError`` if it is malformed."""
    if len(payload) > record_bytes_max:
        raise EnvelopeError(f"peer record is {len(payload)} bytes, limit {record_bytes_max}")
    try:
        items = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise EnvelopeError(f"peer record is not msgpack: {exc}") from None
    if not isinstance(items, list) or len(items) != 2 or items[0] != record_version:
        raise EnvelopeError("peer record must be [1, [addr, ...]]")
    texts = items[1]
    if not isinstance(texts, list) or not 1 <= len(texts) <= record_addrs_max:
        raise EnvelopeError(f"peer record needs 1..{record_addrs_max} addresses")
    addrs: list[multiaddr.Multiaddr] = []
    for text in texts:
        if not isinstance(text, str) or len(text) > record_addr_chars_max:
            raise EnvelopeError("peer record address must be a short string")
        try:
            addr = multiaddr.Multiaddr(text)
        except ValueError as exc:  # multiaddr's ParseError family
            raise EnvelopeError(f"peer record address {text!r} does not parse: {exc}") from None
        text = str(addr)
        if "/p2p/" in text or "/tcp/" not in text or "/ip4/0.0.0.0/" in text:
            raise EnvelopeError(f"peer record address {text!r} is not a dialable tcp address")
        addrs.append(addr)
    return addrs
