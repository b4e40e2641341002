"""Per-node consensus configuration (timeouts, block cadence, bounds)."""

from __future__ import annotations

import dataclasses

from consensus.exceptions import ConfigError


@dataclasses.dataclass(frozen=True, slots=True)
class ConsensusConfig:
    """Per-node consensus settings; chain-wide ones (validators, chain id) live in ``Genesis``.

    Each round-``r`` timeout is ``base + r * delta``, capped at ``timeout_max_ms``, so rounds
    slow down until the network's real delay fits inside them (the paper's partial synchrony).
    """

    timeout_propose_ms: int = 3000
    timeout_propose_delta_ms: int = 500
    timeout_prevote_ms: int = 1000
    timeout_prevote_delta_ms: int = 500
    timeout_precommit_ms: int = 1000
    timeout_precommit_delta_ms: int = 500
    timeout_max_ms: int = 60_000
    timeout_commit_ms: int = 1000
    """Pause after a commit before round 0 of the next height (lets stragglers' votes land)."""
    create_empty_blocks: bool = False
    """False: start a height only when the app has transactions (or a peer already started)."""
    empty_block_interval_ms: int = 0
    """With ``create_empty_blocks=False``, still make a block at least this often; 0 = never."""
    idle_poll_ms: int = 200
    """How often an idle validator asks the app whether transactions are waiting."""
    rebroadcast_interval_ms: int = 2000
    """How often a stuck validator re-sends its own messages of the current round (lost gossip)."""
    sync_interval_ms: int = 2000
    """How often a follower, or a validator stuck at one height, asks a peer for newer blocks."""
    sync_blocks_max: int = 32
    """Most blocks one sync response carries."""
    sync_response_bytes_max: int = 16 * 1024 * 1024
    message_bytes_max: int = 9 * 1024 * 1024
    """Largest consensus gossip message accepted (a proposal carries a whole block)."""
    rounds_ahead_max: int = 64
    """Messages more than this many rounds ahead are dropped: bounds memory per height."""
    future_messages_max: int = 1024
    """Messages for the next height kept until this node gets there."""
    evidence_max: int = 256
    wal_fsync: bool = True

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 0:
                raise ConfigError(f"[consensus] {field.name} must be >= 0, got {value}")
        for name in ("timeout_propose_ms", "timeout_prevote_ms", "timeout_precommit_ms"):
            if getattr(self, name) == 0:
                raise ConfigError(f"[consensus] {name} must be > 0")
        for name in ("idle_poll_ms", "rebroadcast_interval_ms", "sync_interval_ms"):
            if getattr(self, name) == 0:
                raise ConfigError(f"[consensus] {name} must be > 0")
        if self.sync_blocks_max == 0:
            raise ConfigError("[consensus] sync_blocks_max must be > 0")

    @classmethod
    def default(cls) -> ConsensusConfig:
        return cls()

    @classmethod
    def for_tests(cls) -> ConsensusConfig:
        """Short timeouts for simulated or loopback networks."""
        return cls(
            timeout_propose_ms=400,
            timeout_propose_delta_ms=100,
            timeout_prevote_ms=200,
            timeout_prevote_delta_ms=100,
            timeout_precommit_ms=200,
            timeout_precommit_delta_ms=100,
            timeout_max_ms=5000,
            timeout_commit_ms=50,
            idle_poll_ms=50,
            rebroadcast_interval_ms=500,
            sync_interval_ms=500,
        )

    def timeout_propose(self, round_: int) -> int:
        return min(
            self.timeout_propose_ms + round_ * self.timeout_propose_delta_ms, self.timeout_max_ms
        )

    def timeout_prevote(self, round_: int) -> int:
        return min(
            self.timeout_prevote_ms + round_ * self.timeout_prevote_delta_ms, self.timeout_max_ms
        )

    def timeout_precommit(self, round_: int) -> int:
        return min(
            self.timeout_precommit_ms + round_ * self.timeout_precommit_delta_ms,
            self.timeout_max_ms,
        )
