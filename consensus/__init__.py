"""Tendermint-style BFT consensus: a pure engine, its trio driver, the WAL and block sync.

Where things live:
- ``_engine``: the state machine of the Tendermint paper's Algorithm 1 (events in, actions out).
- ``_driver``: ``ConsensusDriver``, the trio service that runs the engine against the injected
  application, transport and clock; it verifies incoming messages, logs our own to the WAL
  before they leave, paces heights (no empty-block churn) and syncs blocks.
- ``_validators``: ``ValidatorSet`` (quorums, weighted proposer rotation).
- ``_commit``: ``verify_commit`` for followers and block sync.
- ``_wal``: the fsynced write-ahead log of our own signed messages.
- ``abc``: ``ApplicationAPI``, ``TransportAPI``, ``ClockAPI`` (the seams the node wires).
- ``types``: wire and certificate types; ``config``: ``ConsensusConfig``.
- ``testing``: the deterministic network simulation and a small in-memory application.

Consensus imports only ``ledger`` (codec and signatures) of gpumesh.
"""

from consensus._clock import TrioClock
from consensus._commit import commit_from_votes, precommit_of, verify_commit
from consensus._driver import ConsensusDriver, DriverStatistics
from consensus._engine import (
    Action,
    CastProposal,
    CastVote,
    Decide,
    Engine,
    ReportEvidence,
    RequestBlock,
    ScheduleTimeout,
    ValidateBlock,
)
from consensus._signing import sign_message, verify_message
from consensus._validators import ValidatorSet
from consensus._wal import Wal, WalRecord
from consensus.abc import ApplicationAPI, ClockAPI, TransportAPI
from consensus.config import ConsensusConfig
from consensus.exceptions import (
    ConfigError,
    ConsensusError,
    DoubleSignRefused,
    InvalidBlock,
    InvalidCommit,
    InvalidMessage,
    TransportError,
    WalError,
)
from consensus.types import (
    NIL,
    BlockHash,
    Commit,
    CommitSig,
    ConsensusStatus,
    Envelope,
    Evidence,
    Genesis,
    Height,
    MessageKind,
    PeerId,
    Proposal,
    Round,
    Step,
    SyncBlock,
    SyncRequest,
    SyncResponse,
    Validator,
    Vote,
    VoteType,
)

__all__ = [
    "NIL",
    "Action",
    "ApplicationAPI",
    "BlockHash",
    "CastProposal",
    "CastVote",
    "ClockAPI",
    "Commit",
    "CommitSig",
    "ConfigError",
    "ConsensusConfig",
    "ConsensusDriver",
    "ConsensusError",
    "ConsensusStatus",
    "Decide",
    "DoubleSignRefused",
    "DriverStatistics",
    "Engine",
    "Envelope",
    "Evidence",
    "Genesis",
    "Height",
    "InvalidBlock",
    "InvalidCommit",
    "InvalidMessage",
    "MessageKind",
    "PeerId",
    "Proposal",
    "ReportEvidence",
    "RequestBlock",
    "Round",
    "ScheduleTimeout",
    "Step",
    "SyncBlock",
    "SyncRequest",
    "SyncResponse",
    "TransportAPI",
    "TransportError",
    "TrioClock",
    "ValidateBlock",
    "Validator",
    "ValidatorSet",
    "Vote",
    "VoteType",
    "Wal",
    "WalError",
    "WalRecord",
    "commit_from_votes",
    "precommit_of",
    "sign_message",
    "verify_commit",
    "verify_message",
]
