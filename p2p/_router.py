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

import functools
import random
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from libp2p.peer.id import ID
from libp2p.pubsub import floodsub, gossipsub
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.mcache import CacheEntry, MessageCache
from libp2p.pubsub.pb import rpc_pb2

MessageIdFn = Callable[[rpc_pb2.Message], bytes]

opportunistic_graft_ticks = 60
"""Heartbeats between opportunistic grafting rounds (go-libp2p's ``OpportunisticGraftTicks``)."""

idontwant_message_bytes_min = 1024
"""Below this an IDONTWANT (a frame to every mesh peer) costs about what it saves; js-libp2p's
gossipsub uses a threshold for the same reason (``idontwantMinDataSize``)."""

_gossip_protocols = frozenset(
    {
        gossipsub.PROTOCOL_ID,
        gossipsub.PROTOCOL_ID_V11,
        gossipsub.PROTOCOL_ID_V12,
        gossipsub.PROTOCOL_ID_V13,
        gossipsub.PROTOCOL_ID_V14,
        gossipsub.PROTOCOL_ID_V20,
    }
)
"""The meshsub versions py-libp2p gossips to (a floodsub peer gets no IHAVE)."""


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
    penalties, IP colocation) twice per mesh peer for every message forwarded, once per
    copy received (``allow_publish``), and again for IHAVE/IWANT/GRAFT decisions: profiled
    at 12 nodes, about a fifth of the forwarding path. Scores decay once per heartbeat, so
    a gate answer is kept one heartbeat; a new penalty takes effect by the next one.
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
    scorer.allow_publish = cached(2, scorer.allow_publish)
    scorer.on_heartbeat = functools.partial(_decay_scores, scorer)


def _decay_scores(scorer: Any, dt_seconds: float = 1.0) -> None:
    """``PeerScorer.on_heartbeat``'s decay, the same arithmetic with fewer lookups.

    The stock version looks every (peer, topic) counter up twice by peer id (a Python-level
    ``__hash__``) in each of ten tables every heartbeat: at 34 nodes ~40% of a heartbeat.
    Here nested tables are walked by value and flat ones rebuilt in one pass.
    """
    params = scorer.params
    for table, decay in (
        (scorer.time_in_mesh, params.p1_time_in_mesh.decay),
        (scorer.first_message_deliveries, params.p2_first_message_deliveries.decay),
        (scorer.mesh_message_deliveries, params.p3_mesh_message_deliveries.decay),
        (scorer.invalid_messages, params.p4_invalid_messages.decay),
    ):
        for counters in table.values():
            for topic, value in counters.items():
                counters[topic] = value * decay
    for name, decay in (
        ("behavior_penalty", params.p5_behavior_penalty_decay),
        ("app_specific_scores", params.p6_appl_slack_decay),
        ("graft_flood_penalties", params.p5_behavior_penalty_decay),
        ("iwant_spam_penalties", params.p5_behavior_penalty_decay),
        ("ihave_spam_penalties", params.p5_behavior_penalty_decay),
        ("equivocation_penalties", params.p5_behavior_penalty_decay),
    ):
        table = getattr(scorer, name)
        table.update([(peer, value * decay) for peer, value in table.items()])


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
        self._ticks = 0
        self.flood_topics: set[str] = set()
        """Topics whose messages we originate go to every peer of the topic, not only the
        mesh (gossipsub v1.1's flood publishing, for our own messages on these topics): a
        peer record must reach the peers of a newcomer whose mesh has not formed yet."""
        self.mcache = ContentAddressedMessageCache(
            kwargs["gossip_window"], kwargs["gossip_history"], id_of
        )
        if fast_publish and self.scorer is not None:
            _cache_score_gates(self.scorer, kwargs["heartbeat_interval"])

    def _check_equivocation(self, msg: rpc_pb2.Message) -> bool:
        return True

    def mesh_heartbeat(self) -> Any:
        self._ticks += 1
        return super().mesh_heartbeat()

    def _perform_opportunistic_grafting(self, topic: str, peers_to_graft: Any) -> int:
        # py-libp2p runs this every heartbeat for every topic (scoring every peer of the
        # topic and checking each one's backoff); the gossipsub v1.1 spec and go-libp2p do
        # it once per opportunistic_graft_ticks heartbeats. At 34 idle nodes it and the
        # mesh-quality pass below were half of a heartbeat, and the heartbeat a third of an
        # idle node's CPU.
        if not self._fast_publish or self._ticks % opportunistic_graft_ticks == 0:
            grafted: int = super()._perform_opportunistic_grafting(topic, peers_to_graft)
            return grafted
        return 0

    async def _maintain_mesh_quality(self, topic: str) -> None:
        # py-libp2p's own addition (swap the worst-scored mesh peer for a better one), run
        # on the same schedule as opportunistic grafting.
        if not self._fast_publish or self._ticks % opportunistic_graft_ticks == 0:
            await super()._maintain_mesh_quality(topic)

    def gossip_heartbeat(self) -> defaultdict[ID, dict[str, list[bytes]]]:
        """Choose each topic's IHAVE peers as the gossipsub v1.1 spec and go-libp2p do.

        py-libp2p leaves out every peer in GRAFT backoff for the topic, which is every peer
        we PRUNEd in the last minute (an oversubscribed mesh prunes several a heartbeat): a
        node whose mesh censors was then gossiped to by nobody who had just pruned it, and
        a test with one honest path (``test_ihave_gossip_repairs_a_mesh_whose_only_peer_
        censors``) lost messages. Backoff governs GRAFT only. Here the peers are those of
        the topic outside its mesh (or fanout) speaking gossipsub, above the score's gossip
        threshold (which py-libp2p did not check for IHAVE), ``gossip_degree_lazy`` of them
        at random.
        """
        pubsub = self.pubsub
        assert pubsub is not None, "the router is attached before pubsub runs"
        scorer = self.scorer
        peers_to_gossip: defaultdict[ID, dict[str, list[bytes]]] = defaultdict(dict)
        topics = list(self.mesh.items())
        topics += [(t, peers) for t, peers in self.fanout.items() if t not in self.mesh]
        for topic, current in topics:
            in_topic = pubsub.peer_topics.get(topic)
            if not in_topic:
                continue
            msg_ids = self.mcache.window(topic)
            if not msg_ids:
                continue
            pool = [
                peer
                for peer in in_topic
                if peer not in current
                and self.peer_protocol.get(peer) in _gossip_protocols
                and (scorer is None or scorer.allow_gossip(peer, [topic]))
            ]
            count = self._get_adaptive_gossip_peers_count(topic, len(in_topic) - len(current))
            chosen = pool if count >= len(pool) else random.sample(pool, max(count, 0))
            for peer in chosen:
                peers_to_gossip[peer][topic] = list(msg_ids)
        return peers_to_gossip

    def _get_adaptive_gossip_peers_count(self, topic: str, total_peers: int) -> int:
        # py-libp2p fixes D_lazy at max(6, 25% of the topic's other peers): with everyone
        # connected that is an IHAVE frame to 6-8 peers per topic per heartbeat, each read
        # and answered on the other side.
        if self._degree_lazy is None:
            count: int = super()._get_adaptive_gossip_peers_count(topic, total_peers)
            return count
        return self._degree_lazy

    def _forward_targets(self, topics: Any, forwarder: ID, origin: ID, msg_id: bytes) -> set[ID]:
        """``_get_peers_to_send`` for subscribed topics, without its per-message scans.

        The stock version builds a set of floodsub peers out of every peer of the topic for
        each message (a floodsub peer can only exist when we offer floodsub); same peers out:
        direct peers and the topic's mesh through the score gates, less the forwarder, the
        origin and peers that sent IDONTWANT for it. A topic we only publish to (fanout)
        takes the stock path.
        """
        pubsub = self.pubsub
        assert pubsub is not None, "the router is attached before pubsub runs"
        send_to: set[ID] = set()
        scorer = self.scorer
        for topic in topics:
            if topic not in pubsub.peer_topics:
                continue
            mesh = self.mesh.get(topic)
            if mesh is None or floodsub.PROTOCOL_ID in self.protocols:
                return set(
                    self._get_peers_to_send(
                        topics, msg_forwarder=forwarder, origin=origin, msg_id=msg_id
                    )
                )
            send_to.update(self.direct_peers)
            if topic in self.flood_topics and forwarder == pubsub.my_id:
                mesh = pubsub.peer_topics[topic]
            if scorer is None:
                send_to.update(mesh)
            else:
                send_to.update(
                    p
                    for p in mesh
                    if scorer.allow_gossip(p, [topic]) and not scorer.is_graylisted(p, [topic])
                )
        send_to.discard(forwarder)
        send_to.discard(origin)
        dont_send = self.dont_send_message_ids
        if dont_send:
            send_to = {p for p in send_to if msg_id not in dont_send.get(p, ())}
        return send_to

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
        for peer_id in self._forward_targets(topics, msg_forwarder, origin, msg_id):
            if peer_id in pubsub.peers:
                self.send_rpc(peer_id, rpc)
        now_s = int(time.time())
        for topic in topics:
            self.time_since_last_publish[topic] = now_s
