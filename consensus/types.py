"""Consensus wire and certificate types: proposals, votes, commits, evidence, sync messages.

Every type is a frozen dataclass encoded with the ledger's one canonical codec. ``Proposal`` and
``Vote`` are signed with ``ledger.sign_object`` under their own type tags. A precommit carries no
field beyond (height, round, block_hash, validator), so its signature can be checked again from a
``Commit`` that keeps only ``CommitSig(validator, signature)``.

``CommitSig``, ``Commit`` and ``Validator`` are the ledger's own types, re-exported: a commit
consensus builds is exactly what the ledger stores.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import ClassVar, NewType

# Re-exported: the ledger owns the certificate and validator types.
from ledger import Commit as Commit  # noqa: TC001
from ledger import CommitSig as CommitSig
from ledger import Validator as Validator  # noqa: TC001

Height = NewType("Height", int)
Round = NewType("Round", int)
BlockHash = NewType("BlockHash", bytes)
PeerId = NewType("PeerId", str)
"""A transport-level peer identity (the libp2p peer id string in production)."""

NIL: BlockHash = BlockHash(b"")
"""The block hash of a vote for nothing ("nil" in the Tendermint paper)."""

hash_bytes = 32
signature_bytes = 64
address_bytes = 32


class VoteType(enum.IntEnum):
    PREVOTE = 1
    PRECOMMIT = 2


class Step(enum.IntEnum):
    """Where a validator is within a height; ordered, so ``step >= PREVOTE`` reads as the paper."""

    NEW_HEIGHT = 0
    PROPOSE = 1
    PREVOTE = 2
    PRECOMMIT = 3
    COMMIT = 4


@dataclasses.dataclass(frozen=True, slots=True)
class Proposal:
    """The round's proposer offers ``block``; ``pol_round`` is the paper's validRound (-1: none)."""

    TYPE_TAG: ClassVar[str] = "consensus/proposal/1"

    height: int
    round: int
    pol_round: int
    block_hash: bytes
    block: bytes
    signer: bytes = b""
    signature: bytes = b""


@dataclasses.dataclass(frozen=True, slots=True)
class Vote:
    """A prevote or precommit; ``block_hash`` is empty for a nil vote."""

    TYPE_TAG: ClassVar[str] = "consensus/vote/1"

    vote_type: VoteType
    height: int
    round: int
    block_hash: bytes
    signer: bytes = b""
    signature: bytes = b""

    @property
    def is_nil(self) -> bool:
        return self.block_hash == NIL


@dataclasses.dataclass(frozen=True, slots=True)
class Evidence:
    """Two votes one validator signed for one height/round/type with different block hashes.

    ``vote_a`` sorts before ``vote_b`` by canonical bytes, so one offence has one encoding.
    """

    vote_a: Vote
    vote_b: Vote


class MessageKind(enum.IntEnum):
    PROPOSAL = 1
    VOTE = 2


@dataclasses.dataclass(frozen=True, slots=True)
class Envelope:
    """What goes on the consensus gossip topic: a kind and the canonical bytes of the message."""

    kind: MessageKind
    body: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class SyncRequest:
    """Ask a peer for up to ``count`` committed blocks starting at ``from_height``."""

    from_height: int
    count: int


@dataclasses.dataclass(frozen=True, slots=True)
class SyncBlock:
    height: int
    block: bytes
    commit: Commit


@dataclasses.dataclass(frozen=True, slots=True)
class SyncResponse:
    """Blocks in height order and the responder's head height (how far there is to go), with
    the commit that proves the head: a height is believed only with a commit for it."""

    head_height: int
    blocks: tuple[SyncBlock, ...]
    head_commit: Commit | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Genesis:
    """The chain-wide consensus parameters: chain id and the validator set (fixed for now)."""

    chain_id: str
    validators: tuple[Validator, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class ConsensusStatus:
    """A snapshot for the ``consensus_status`` RPC method."""

    height: int
    """The height being decided (last committed + 1)."""
    round: int
    step: Step
    last_committed_height: int
    validators: tuple[Validator, ...]
    is_validator: bool
    catching_up: bool
    best_known_height: int
    pending_evidence: int

    def as_json(self) -> dict[str, object]:
        """The ``consensus_status`` RPC result: plain JSON values, addresses in hex."""
        return {
            "height": self.height,
            "round": self.round,
            "step": self.step.name.lower(),
            "last_committed_height": self.last_committed_height,
            "validators": [{"address": v.address.hex(), "power": v.power} for v in self.validators],
            "is_validator": self.is_validator,
            "catching_up": self.catching_up,
            "best_known_height": self.best_known_height,
            "pending_evidence": self.pending_evidence,
        }
