"""Counters behind ``Mesh.statistics()``: per-topic rates, rejections by reason and by peer."""

from __future__ import annotations

import collections

rate_window_s = 10
rejected_peers_tracked_max = 1_024


class RateMeter:
    """Events per second over the last ``rate_window_s`` whole seconds, plus a running total."""

    __slots__ = ("_buckets", "total")

    def __init__(self) -> None:
        self._buckets: collections.deque[tuple[int, int]] = collections.deque(
            maxlen=rate_window_s + 1
        )
        self.total = 0

    def add(self, now_s: float, count: int = 1) -> None:
        second = int(now_s)
        self.total += count
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1] = (second, self._buckets[-1][1] + count)
        else:
            self._buckets.append((second, count))

    def per_second(self, now_s: float) -> float:
        since = int(now_s) - rate_window_s
        return sum(c for s, c in self._buckets if s >= since) / rate_window_s


class TopicCounters:
    __slots__ = ("delivered", "dropped_queue_full", "incoming", "outgoing", "rate_limited")

    def __init__(self) -> None:
        self.incoming = RateMeter()
        self.outgoing = RateMeter()
        self.delivered = 0
        self.dropped_queue_full = 0
        self.rate_limited = 0


class Rejections:
    """Rejected gossip counted by reason and by the peer that sent it to us."""

    def __init__(self) -> None:
        self.by_reason: collections.Counter[str] = collections.Counter()
        self.by_peer: dict[str, collections.Counter[str]] = {}

    def add(self, peer: str, reason: str) -> None:
        self.by_reason[reason] += 1
        counter = self.by_peer.get(peer)
        if counter is None:
            if len(self.by_peer) >= rejected_peers_tracked_max:
                # Bounded: an attacker minting peer ids cannot grow this table.
                peer = "other"
                counter = self.by_peer.setdefault(peer, collections.Counter())
            else:
                counter = self.by_peer[peer] = collections.Counter()
        counter[reason] += 1

    def of_peer(self, peer: str) -> dict[str, int]:
        return dict(self.by_peer.get(peer, {}))
