"""Per-peer limits on gossip: token-bucket rate limits and a decaying ban score.

Both are pure (the caller passes the time in), so tests drive them without a clock.

- ``TokenBucket``: a peer may forward ``rate_per_s`` new messages per second on a topic, with
  bursts up to ``burst``; what exceeds it is dropped (not delivered, not forwarded) and counted.
- ``BanScores``: every rejected message adds its reason's weight to the forwarding peer's
  score, which halves every ``half_life_s``. A peer whose score reaches the ban threshold is
  banned. The decay is what lets honest peers that sometimes disagree with us (clock skew,
  a transaction that became invalid in flight) stay, while a peer that keeps sending junk
  crosses the line within seconds.
"""

from __future__ import annotations

import math

score_floor = 0.01
"""Scores below this are forgotten (the peer is back to a clean slate)."""

reason_weights: dict[str, float] = {
    # Protocol faults an honest peer never forwards: it validates before forwarding.
    "malformed": 1.0,
    "bad_signature": 1.0,
    "author_mismatch": 1.0,
    "wrong_chain": 1.0,
    "signed_fields": 1.0,
    # A subscriber validator's verdict that the message is invalid (REJECT, or False).
    "validator_rejected": 1.0,
    # Honest peers may differ in size limits and clocks: these count, but little.
    "oversized": 0.1,
    "too_old": 0.1,
    "from_future": 0.1,
    # A burst above the per-peer rate: dropped; only a sustained flood adds up to a ban
    # (at half-life 60 s and threshold 20, about 12 drops/s for a minute).
    "rate_limited": 0.02,
    # Not the peer's fault: our own validator raised, or it chose IGNORE (e.g. stale).
    "validator_error": 0.0,
    "validator_ignored": 0.0,
}


class TokenBucket:
    """``rate_per_s`` tokens per second, at most ``burst`` saved up; one token per message."""

    __slots__ = ("burst", "rate_per_s", "tokens", "updated_s")

    def __init__(self, rate_per_s: float, burst: float, now_s: float) -> None:
        assert rate_per_s > 0 and burst >= 1, (rate_per_s, burst)
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = burst
        self.updated_s = now_s

    def take(self, now_s: float) -> bool:
        """Spend one token if there is one; False means the message is over the limit."""
        elapsed = now_s - self.updated_s
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate_per_s)
            self.updated_s = now_s
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class BanScores:
    """Decaying misbehaviour scores per peer, bounded to ``peers_max`` entries."""

    __slots__ = ("_decay_per_s", "_scores", "peers_max")

    def __init__(self, half_life_s: float, peers_max: int) -> None:
        assert half_life_s > 0 and peers_max >= 1
        self._decay_per_s = math.log(2) / half_life_s
        self._scores: dict[str, tuple[float, float]] = {}
        self.peers_max = peers_max

    def _decayed(self, entry: tuple[float, float], now_s: float) -> float:
        score, at_s = entry
        return score * math.exp(-self._decay_per_s * max(0.0, now_s - at_s))

    def add(self, peer: str, weight: float, now_s: float) -> float:
        """Add ``weight`` to ``peer``'s score; return the new score."""
        entry = self._scores.get(peer)
        score = weight if entry is None else self._decayed(entry, now_s) + weight
        if entry is None and len(self._scores) >= self.peers_max:
            self._evict(now_s)
            if len(self._scores) >= self.peers_max:
                # Every tracked peer still has a real score: the newcomer is not tracked
                # (an attacker minting peer ids cannot push the others out).
                return score
        if score >= score_floor:
            self._scores[peer] = (score, now_s)
        return score

    def score(self, peer: str, now_s: float) -> float:
        entry = self._scores.get(peer)
        return 0.0 if entry is None else self._decayed(entry, now_s)

    def forget(self, peer: str) -> None:
        self._scores.pop(peer, None)

    def snapshot(self, now_s: float) -> dict[str, float]:
        """Current scores of every peer above the floor, rounded for display."""
        self._evict(now_s)
        return {p: round(self._decayed(e, now_s), 3) for p, e in self._scores.items()}

    def _evict(self, now_s: float) -> None:
        for peer in [p for p, e in self._scores.items() if self._decayed(e, now_s) < score_floor]:
            del self._scores[peer]
