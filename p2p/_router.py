"""GossipSub for the StrictNoSign wire format (the Ethereum consensus layer's).

Our messages carry no ``from``, ``seqno``, ``signature`` or ``key``: the signed envelope in
``data`` authenticates the origin, and the message id is the SHA-256 of ``data``, which is
also what js-libp2p's gossipsub computes under ``StrictNoSign``. py-libp2p 0.8.1 assumes
``from + seqno`` in two places that then break:

- ``MessageCache.put`` keys every message by ``from + seqno`` whatever the pubsub's id
  function: with both empty every message shares the key ``b""``, so only the first is kept
  and IHAVE/IWANT gossip is useless. (Even with ``from``/``seqno`` set, its IHAVE ids never
  match the content ids of the seen-cache, so every IHAVE was answered with an IWANT for a
  message the peer already had: a full duplicate per message per gossip peer.) Our cache
  keys by the pubsub's message id.
- ``_check_equivocation`` treats two messages with the same ``from + seqno`` and different
  data as equivocation and drops the second: with both empty, every message after the first.
  With content ids different data is simply a different message, so the check is dropped.

With ``fast_publish`` the forwarding path is also leaner than the stock one (measured, see
docs/p2p.md): the RPC carrying a message no longer attaches our signed peer record (a few
hundred bytes on every 256-byte message; identify already gave the peer our addresses and
the hello packet still carries it), the message is not sent back to its origin (without
``from`` the stock path cannot tell it; ``origin_of`` gives the envelope's signer, which
saved each origin D copies of its own message), IDONTWANT goes out only for messages of at least
``idontwant_message_bytes_min`` (for a small message the IDONTWANT frame costs what the
duplicate would), and the optimistic per-message queueing for peers that have not
subscribed yet (a loop over every peer per message) is left to the mcache replay that
py-libp2p already does when a peer subscribes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.mcache import CacheEntry, MessageCache
from libp2p.pubsub.pb import rpc_pb2

MessageIdFn = Callable[[rpc_pb2.Message], bytes]

idontwant_message_bytes_min = 1024
"""Below this an IDONTWANT (a frame to every mesh peer) costs about what it saves; js-libp2p's
gossipsub uses a threshold for the same reason (``idontwantMinDataSize``)."""


class ContentAddressedMessageCache(MessageCache):  # type: ignore[misc]  # libp2p is Any to mypy
    """py-libp2p's message cache, keyed by the pubsub's message id."""

    def __init__(self, window_size: int, history_size: int, id_of: MessageIdFn) -> None:
        super().__init__(window_size, history_size)
        self._id_of = id_of

    def put(self, msg: rpc_pb2.Message) -> None:
        mid = self._id_of(msg)
        if mid in self.msgs:
            return
        self.msgs[mid] = msg
        self.history[0].append(CacheEntry(mid, msg.topicIDs))


def _cache_score_gates(scorer: Any, ttl_s: float) -> None:
    """Remember the peer scorer's two gossip gates per (peer, topics) for ``ttl_s``.

    py-libp2p computes a peer's full score (every topic's counters, five behaviour
    penalties, IP colocation) twice per mesh peer for every message forwarded, and again
    for IHAVE/IWANT/GRAFT decisions: profiled at 12 nodes, about a fifth of the forwarding
    path. Scores decay once per heartbeat, so a gate answer is kept one heartbeat; a new
    penalty takes effect by the next one.
    """
    cache: dict[tuple[int, ID, tuple[str, ...]], bool] = {}
    expires_at = [0.0]

    def cached(kind: int, gate: Callable[[ID, list[str]], bool]) -> Callable[..., bool]:
        def answer(peer: ID, topics: list[str]) -> bool:
            now = time.monotonic()
            if now >= expires_at[0]:
                cache.clear()
                expires_at[0] = now + ttl_s
            key = (kind, peer, tuple(topics))
            verdict = cache.get(key)
            if verdict is None:
                verdict = cache[key] = gate(peer, topics)
            return verdict

        return answer

    scorer.allow_gossip = cached(0, scorer.allow_gossip)
    scorer.is_graylisted = cached(1, scorer.is_graylisted)


class StrictNoSignGossipSub(GossipSub):  # type: ignore[misc]  # libp2p is Any to mypy
    """GossipSub whose message cache and duplicate logic use content-addressed ids."""

    def __init__(
        self,
        *,
        id_of: MessageIdFn,
        origin_of: Callable[[rpc_pb2.Message], ID | None] | None = None,
        fast_publish: bool = False,
        degree_lazy: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._id_of = id_of
        self._origin_of = origin_of
        self._degree_lazy = degree_lazy
        self._fast_publish = fast_publish
        self.mcache = ContentAddressedMessageCache(
            kwargs["gossip_window"], kwargs["gossip_history"], id_of
        )
        if fast_publish and self.scorer is not None:
            _cache_score_gates(self.scorer, kwargs["heartbeat_interval"])

    def _check_equivocation(self, msg: rpc_pb2.Message) -> bool:
        return True

    def _get_adaptive_gossip_peers_count(self, topic: str, total_peers: int) -> int:
        # py-libp2p fixes D_lazy at max(6, 25% of the topic's other peers): with everyone
        # connected that is an IHAVE frame to 6-8 peers per topic per heartbeat, each read
        # and answered on the other side.
        if self._degree_lazy is None:
            count: int = super()._get_adaptive_gossip_peers_count(topic, total_peers)
            return count
        return self._degree_lazy

    async def publish(self, msg_forwarder: ID, pubsub_msg: rpc_pb2.Message) -> None:
        """Forward a message that pubsub validated (our own publishes included)."""
        if not self._fast_publish:
            await super().publish(msg_forwarder, pubsub_msg)
            return
        pubsub = self.pubsub
        assert pubsub is not None, "the router is attached before pubsub runs"
        self.mcache.put(pubsub_msg)
        msg_id = self._id_of(pubsub_msg)
        topics = pubsub_msg.topicIDs
        if len(pubsub_msg.data) >= idontwant_message_bytes_min:
            await self._emit_idontwant_for_message(msg_id, topics)
        rpc = rpc_pb2.RPC(publish=[pubsub_msg])
        origin = None if self._origin_of is None else self._origin_of(pubsub_msg)
        if origin is None:
            origin = ID(pubsub_msg.from_id)
        for peer_id in self._get_peers_to_send(
            topics, msg_forwarder=msg_forwarder, origin=origin, msg_id=msg_id
        ):
            if peer_id in pubsub.peers:
                self.send_rpc(peer_id, rpc)
        now_s = int(time.time())
        for topic in topics:
            self.time_since_last_publish[topic] = now_s
