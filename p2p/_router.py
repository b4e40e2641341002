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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.mcache import CacheEntry, MessageCache

if TYPE_CHECKING:
    from libp2p.pubsub.pb import rpc_pb2

MessageIdFn = Callable[["rpc_pb2.Message"], bytes]


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


class StrictNoSignGossipSub(GossipSub):  # type: ignore[misc]  # libp2p is Any to mypy
    """GossipSub whose message cache and duplicate logic use content-addressed ids."""

    def __init__(self, *, id_of: MessageIdFn, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mcache = ContentAddressedMessageCache(
            kwargs["gossip_window"], kwargs["gossip_history"], id_of
        )

    def _check_equivocation(self, msg: rpc_pb2.Message) -> bool:
        return True
