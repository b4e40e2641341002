"""``P2PConfig``: every knob of the mesh in one frozen, validated object."""

from __future__ import annotations

import dataclasses

from p2p.exceptions import ConfigError

MESHSUB_1_1 = "/meshsub/1.1.0"
MESHSUB_1_2 = "/meshsub/1.2.0"
MESHSUB_1_0 = "/meshsub/1.0.0"


@dataclasses.dataclass(frozen=True, slots=True)
class P2PConfig:
    """Per-node p2p settings (chain-wide ones live in genesis, not here)."""

    listen_host: str = "127.0.0.1"
    """A concrete IP: listening on 0.0.0.0 would advertise an undialable address."""
    listen_port: int = 0
    bootstrap: tuple[str, ...] = ()
    """Multiaddrs with ``/p2p/<peer id>``; retried with capped exponential backoff forever."""
    mdns: bool = True
    dht: bool = True
    peers_max: int = 64
    known_peers_max: int = 512
    """Dial candidates remembered (bootstrap peers are never evicted)."""
    dial_interval_ms: int = 1_000
    dial_timeout_ms: int = 15_000
    """go-libp2p's dial timeout. 5 s was too short on a starved CPU: 34 node processes at
    load ~35 timed out 3,498 of 3,986 dials, each timeout throwing away a half-done Noise
    handshake on both sides and closing connections the other side had finished (958)."""
    dials_in_flight_max: int = 8
    dial_tiebreak_ms: int = 1_500
    """A peer learned from the DHT or mDNS whose id is below ours is dialed only after this
    long, to give it time to dial us first: both dialing at once opens two connections
    (each a Noise handshake, identify and pubsub hello on both ends) and closes one.
    0 dials at once. Bootstrap peers are always dialed at once."""
    backoff_initial_ms: int = 500
    backoff_max_ms: int = 30_000
    dht_walk_interval_ms: int = 60_000
    """The longest a node goes without a lookup walk once walks stop finding new peers and
    no new peer connects."""
    dht_walk_first_ms: int = 10_000
    """With ``peer_records``: the first walk, this long after the first peer connects."""
    dht_walk_interval_max_ms: int = 600_000
    """With ``peer_records``: dry walks back off from ``dht_walk_interval_ms`` to this (or to
    ``dht_walk_interval_ms`` when that is longer)."""
    peer_records: bool = True
    """Publish our listen addresses on the chain's ``peers`` topic and dial the peers whose
    records arrive (``p2p/_records.py``). Walks then only back records up: without them a
    node walks whenever a new peer connects, and at 34 nodes the walks were two thirds of
    the CPU of forming the full mesh (docs/p2p.md)."""
    peer_record_tiebreak_ms: int = 15_000
    """The ``dial_tiebreak_ms`` of a peer learned from its record, when it must have had ours
    (a peer whose record is newer than our last one has not seen ours: we dial it at once)."""
    peer_record_repeat_ms: int = 5_000
    """The second record follows the first this soon (the first meets unformed meshes)."""
    peer_record_interval_ms: int = 300_000
    """How often a node publishes its record again after the first, at its first peer."""
    peer_record_rate_per_s: float = 10.0
    peer_record_burst: int = 512
    """One peer may forward this many records at once (a whole network starting together)."""
    dht_walk_fast_interval_ms: int = 1_000
    """The walk interval while walks find new peers; after ``n`` dry walks in a row a node
    waits for a new peer to connect, at most this times ``2**n`` (capped at
    ``dht_walk_interval_ms``), then this long."""

    gossip_degree: int = 4
    gossip_degree_low: int = 3
    gossip_degree_high: int = 6
    """Mesh degree. Every extra mesh peer is one more duplicate to read and drop per message:
    12 node processes at 5 msg/s went from p50 5 s / 64% delivered (6/4/12, meshes of 11) to
    p50 0.23 s / 100% (4/3/6) on the same loaded box; 3/2/4 lost messages (docs/p2p.md)."""
    gossip_degree_lazy: int = 3
    """Peers outside the mesh each heartbeat sends IHAVE gossip to, per topic (D_lazy). IHAVE
    is insurance: at 34 nodes and 5 msg/s a third of all frames, IWANT 0.01/s. With 3 (go's 6
    halved), a node whose whole mesh censors still hears of each message from a given
    honest peer with probability ~3/28 per heartbeat, for 3 heartbeats: missed by all of
    ~28 peers ~1e-4. 34 nodes at 5 msg/s: 3.59 -> 3.07 ms CPU per message per node, one
    sitting (docs/p2p.md part 7)."""
    gossip_heartbeat_ms: int = 1_000
    gossip_window: int = 3
    gossip_history: int = 5
    gossip_fanout_ttl_s: int = 60
    gossip_prune_backoff_s: int = 60
    gossip_protocols: tuple[str, ...] = (MESHSUB_1_1, MESHSUB_1_0)
    """meshsub 1.2 (IDONTWANT) is left out by default: measured to cost throughput here."""
    gossip_strict_signing: bool = False
    """False (ours): the StrictNoSign wire format, no ``from``/``seqno``/``signature``/``key``
    (our envelope is signed; ids are content hashes), which stock StrictNoSign peers such as
    js-libp2p's read. True: py-libp2p's StrictSign, kept for the benchmark's raw mode."""
    libp2p_hot_path_caches: bool = True
    """Cache py-libp2p's per-RPC signed-peer-record work (see ``p2p/_tuning.py``)."""
    gossip_message_bytes_max: int = 1024 * 1024
    gossip_clock_skew_ms: int = 30_000
    gossip_message_age_max_ms: int = 60_000
    gossip_seen_ttl_s: int = 120
    """Kept longer than any message stays acceptable (age max + skew), so a message that
    libp2p replays to a (re)connecting peer is either still remembered as seen or rejected
    as too old: a subscriber never gets the same message twice."""
    gossip_ban_score_max: float = 20.0
    """A peer whose ban score reaches this is blacklisted and disconnected. Every rejected
    message adds its reason's weight (``p2p._limits.reason_weights``: 1 for a forgery or a
    validator's REJECT, 0.1 for clock or size disagreements, 0.02 per rate-limited message)."""
    gossip_ban_score_half_life_s: float = 60.0
    """Ban scores halve this often, so rare honest disagreements never add up to a ban."""
    gossip_peer_rate_per_s: float = 300.0
    """New messages per second one peer may forward on one topic (a token bucket); beyond it
    they are dropped and counted (``rate_limited``). An honest peer forwards the whole
    network's traffic on a topic, so this bounds a topic's network-wide rate; a subscriber
    may set its own per topic (``Mesh.subscribe(peer_rate_per_s=...)``)."""
    gossip_peer_burst: int = 600
    """The token bucket's depth: a burst one peer may forward at once on one topic."""
    gossip_publish_rate_max_per_s: float = 100.0
    """Publishes beyond this wait: libp2p's 32-deep per-peer queues drop silently when flooded."""
    subscription_queue_max: int = 1_024
    peer_events_queue_max: int = 256

    request_bytes_max: int = 1024 * 1024
    response_bytes_max: int = 16 * 1024 * 1024
    request_timeout_s_default: float = 10.0
    inbound_streams_max: int = 64
    inbound_streams_per_peer_max: int = 8
    """Concurrent inbound request streams one peer may hold; more are reset and counted."""

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"[p2p] {key}: {why} (got {getattr(self, key)!r})")

        need(self.listen_host not in ("0.0.0.0", "::", ""), "listen_host", "must be concrete")
        need(0 <= self.listen_port <= 65535, "listen_port", "must be 0..65535")
        for addr in self.bootstrap:
            need("/p2p/" in addr, "bootstrap", "every entry needs /p2p/<peer id>")
        need(self.peers_max >= 1, "peers_max", "must be >= 1")
        need(self.known_peers_max >= self.peers_max, "known_peers_max", "must be >= peers_max")
        need(self.dials_in_flight_max >= 1, "dials_in_flight_max", "must be >= 1")
        need(self.dial_tiebreak_ms >= 0, "dial_tiebreak_ms", "must be >= 0")
        need(self.dht_walk_first_ms >= 0, "dht_walk_first_ms", "must be >= 0")
        need(self.peer_record_tiebreak_ms >= 0, "peer_record_tiebreak_ms", "must be >= 0")
        need(self.peer_record_repeat_ms >= 0, "peer_record_repeat_ms", "must be >= 0")
        need(self.peer_record_interval_ms >= 1_000, "peer_record_interval_ms", "must be >= 1 s")
        need(self.peer_record_rate_per_s > 0, "peer_record_rate_per_s", "must be > 0")
        need(self.peer_record_burst >= 1, "peer_record_burst", "must be >= 1")
        need(
            0 < self.backoff_initial_ms <= self.backoff_max_ms,
            "backoff_initial_ms",
            "must be > 0 and <= backoff_max_ms",
        )
        need(
            0 < self.gossip_degree_low <= self.gossip_degree <= self.gossip_degree_high,
            "gossip_degree",
            "need 0 < degree_low <= degree <= degree_high",
        )
        need(self.gossip_heartbeat_ms >= 100, "gossip_heartbeat_ms", "must be >= 100")
        need(self.gossip_degree_lazy >= 0, "gossip_degree_lazy", "must be >= 0")
        need(bool(self.gossip_protocols), "gossip_protocols", "must not be empty")
        need(self.gossip_message_bytes_max >= 1024, "gossip_message_bytes_max", "must be >= 1 KiB")
        need(
            self.gossip_seen_ttl_s * 1000
            > self.gossip_message_age_max_ms + self.gossip_clock_skew_ms,
            "gossip_seen_ttl_s",
            "must exceed gossip_message_age_max_ms + gossip_clock_skew_ms (no duplicates)",
        )
        need(self.gossip_publish_rate_max_per_s > 0, "gossip_publish_rate_max_per_s", "must be > 0")
        need(self.subscription_queue_max >= 1, "subscription_queue_max", "must be >= 1")
        need(self.request_bytes_max >= 1, "request_bytes_max", "must be >= 1")
        need(self.response_bytes_max >= 1, "response_bytes_max", "must be >= 1")
        need(self.inbound_streams_max >= 1, "inbound_streams_max", "must be >= 1")
        need(
            1 <= self.inbound_streams_per_peer_max <= self.inbound_streams_max,
            "inbound_streams_per_peer_max",
            "must be 1..inbound_streams_max",
        )
        need(self.gossip_ban_score_max > 0, "gossip_ban_score_max", "must be > 0")
        need(self.gossip_ban_score_half_life_s > 0, "gossip_ban_score_half_life_s", "must be > 0")
        need(self.gossip_peer_rate_per_s > 0, "gossip_peer_rate_per_s", "must be > 0")
        need(self.gossip_peer_burst >= 1, "gossip_peer_burst", "must be >= 1")

    @classmethod
    def default(cls) -> P2PConfig:
        return cls(listen_port=7700)

    @classmethod
    def for_tests(cls, **overrides: object) -> P2PConfig:
        """Loopback, ephemeral port, no mDNS, fast timers: for in-process test meshes."""
        values: dict[str, object] = {
            "listen_port": 0,
            "mdns": False,
            "dht": True,
            "dial_interval_ms": 200,
            "dial_tiebreak_ms": 300,
            "backoff_initial_ms": 200,
            "backoff_max_ms": 2_000,
            "dht_walk_interval_ms": 5_000,
            "dht_walk_fast_interval_ms": 300,
            "dht_walk_first_ms": 1_000,
            "peer_record_tiebreak_ms": 1_000,
            "dht_walk_interval_max_ms": 20_000,
            "gossip_heartbeat_ms": 200,
            "request_timeout_s_default": 5.0,
        }
        values.update(overrides)
        return dataclasses.replace(cls(), **values)  # type: ignore[arg-type]
