"""Measured hot spots in py-libp2p 0.8.1 gossip, cached without changing what they check.

Profiling 3 in-process nodes (docs/p2p.md) showed two per-RPC costs that repeat the same work
for every message:

- ``env_to_send_in_RPC(host)`` rebuilds the host's address set (``host.get_addrs()``) on every
  outgoing RPC just to see whether its cached signed peer record is still current: ~0.5 ms
  per send. We reuse the answer per host for ``local_record_ttl_s``.
- ``maybe_consume_signed_record`` verifies the sender's signed peer record (an Ed25519 check
  and a peerstore update) on every incoming RPC, though a peer attaches the same bytes each
  time: ~0.3 ms per receive. We remember records that verified, per (peer, record bytes), for
  ``remote_record_ttl_s``; anything new or different is still verified.

Both wrap the module-level names that ``libp2p.pubsub.pubsub`` and ``.gossipsub`` call.
"""

from __future__ import annotations

import collections
import time
import weakref
from typing import Any

import libp2p.pubsub.gossipsub as gossipsub_module
import libp2p.pubsub.pubsub as pubsub_module

local_record_ttl_s = 5.0
remote_record_ttl_s = 60.0
remote_records_cached_max = 4_096

_original_env = pubsub_module.env_to_send_in_RPC
_original_consume = pubsub_module.maybe_consume_signed_record
_local: weakref.WeakKeyDictionary[Any, tuple[float, tuple[bytes, bool]]] = (
    weakref.WeakKeyDictionary()
)
_remote: collections.OrderedDict[tuple[bytes, bytes], float] = collections.OrderedDict()


def _cached_env_to_send_in_rpc(host: Any) -> tuple[bytes, bool]:
    now = time.monotonic()
    cached = _local.get(host)
    if cached is not None and cached[0] > now:
        return cached[1]
    result: tuple[bytes, bool] = _original_env(host)
    _local[host] = (now + local_record_ttl_s, (result[0], False))
    return result


def _cached_maybe_consume(msg: Any, host: Any, peer_id: Any) -> bool:
    if not msg.HasField("senderRecord"):
        return True
    key = (peer_id.to_bytes(), msg.senderRecord)
    now = time.monotonic()
    verified_at = _remote.get(key)
    if verified_at is not None and now - verified_at < remote_record_ttl_s:
        return True
    ok: bool = _original_consume(msg, host, peer_id)
    if ok:
        _remote[key] = now
        _remote.move_to_end(key)
        while len(_remote) > remote_records_cached_max:
            _remote.popitem(last=False)
    return ok


def apply() -> None:
    """Install the caches (idempotent)."""
    for module in (pubsub_module, gossipsub_module):
        if hasattr(module, "env_to_send_in_RPC"):
            module.env_to_send_in_RPC = _cached_env_to_send_in_rpc
        if hasattr(module, "maybe_consume_signed_record"):
            module.maybe_consume_signed_record = _cached_maybe_consume
