"""Per-peer token buckets and decaying ban scores (pure: the time is passed in)."""

from __future__ import annotations

import pytest

from p2p import P2PConfig
from p2p._limits import BanScores, TokenBucket, reason_weights
from p2p.exceptions import ConfigError


def test_token_bucket_allows_burst_then_rate() -> None:
    # Binary-exact times (multiples of 1/8 s), so the refill arithmetic is exact.
    bucket = TokenBucket(rate_per_s=8.0, burst=5, now_s=100.0)
    taken = [bucket.take(100.0) for _ in range(8)]
    assert taken == [True] * 5 + [False] * 3, f"a burst of 5 then refusals: {taken}"
    assert bucket.take(100.125), "1/8 s at 8/s refills one token"
    assert not bucket.take(100.125), "and only one"
    ticks = [bucket.take(100.125 + i / 64) for i in range(1, 65)]
    assert sum(ticks) == 8, f"8/s sustained over the next second: {ticks}"
    assert sum(bucket.take(1_000.0) for _ in range(20)) == 5, "refill is capped at the burst"


def test_ban_score_adds_weights_and_halves_every_half_life() -> None:
    scores = BanScores(half_life_s=10.0, peers_max=4)
    assert scores.add("a", 4.0, now_s=0.0) == 4.0
    assert scores.score("a", 10.0) == pytest.approx(2.0), "halved after one half-life"
    assert scores.add("a", 1.0, now_s=20.0) == pytest.approx(2.0), "4 -> 1 after 20 s, + 1"
    assert scores.score("b", 0.0) == 0.0, "an unknown peer has a clean slate"
    assert scores.snapshot(1_000.0) == {}, "decayed scores are forgotten"


def test_ban_score_table_is_bounded() -> None:
    scores = BanScores(half_life_s=60.0, peers_max=3)
    for index in range(3):
        scores.add(f"p{index}", 5.0, now_s=0.0)
    scores.add("newcomer", 5.0, now_s=1.0)
    assert set(scores.snapshot(1.0)) == {"p0", "p1", "p2"}, "tracked peers are not pushed out"
    scores.add("newcomer", 5.0, now_s=10_000.0)
    assert set(scores.snapshot(10_000.0)) == {"newcomer"}, "decayed entries make room"


def test_every_rejection_reason_has_a_weight_and_forgeries_weigh_most() -> None:
    for reason in ("malformed", "bad_signature", "author_mismatch", "wrong_chain"):
        assert reason_weights[reason] == 1.0, reason
    assert reason_weights["validator_rejected"] == 1.0, "a validator REJECT counts fully"
    assert reason_weights["validator_ignored"] == 0.0, "IGNORE is nobody's fault"
    assert 0 < reason_weights["rate_limited"] < reason_weights["too_old"] < 1.0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("gossip_peer_rate_per_s", 0.0),
        ("gossip_peer_burst", 0),
        ("gossip_ban_score_max", 0.0),
        ("gossip_ban_score_half_life_s", -1.0),
        ("inbound_streams_per_peer_max", 65),
    ],
)
def test_limit_config_is_validated(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        P2PConfig.for_tests(**{key: value})
