"""Commit certificates: rebuilding precommits from a commit and checking >2/3 signed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from consensus._signing import verify_message
from consensus.exceptions import InvalidCommit
from consensus.types import NIL, Commit, CommitSig, Vote, VoteType

if TYPE_CHECKING:
    from consensus._validators import ValidatorSet


def precommit_of(commit: Commit, sig: CommitSig) -> Vote:
    """The precommit ``sig`` stands for: everything else is implied by the commit."""
    return Vote(
        VoteType.PRECOMMIT,
        commit.height,
        commit.round,
        commit.block_hash,
        sig.validator,
        sig.signature,
    )


def commit_from_votes(height: int, round_: int, block_hash: bytes, votes: list[Vote]) -> Commit:
    """Build a commit from precommits for one block, in validator-address order."""
    sigs = sorted(
        (CommitSig(v.signer, v.signature) for v in votes if v.block_hash == block_hash),
        key=lambda s: s.validator,
    )
    return Commit(height, round_, block_hash, tuple(sigs))


def verify_commit(commit: Commit, validators: ValidatorSet, chain_id: str) -> None:
    """Raise ``InvalidCommit`` unless >2/3 of ``validators``' power precommitted the block.

    Rejects nil commits, unknown or duplicate signers and any bad signature (one bad signature
    fails the commit: an honest node never builds such a commit, so it is a forgery).
    """
    if commit.block_hash == NIL:
        raise InvalidCommit("commit for a nil block")
    if commit.height < 1 or commit.round < 0:
        raise InvalidCommit(f"commit at height {commit.height} round {commit.round}")
    seen: set[bytes] = set()
    power = 0
    for sig in commit.signatures:
        if sig.validator in seen:
            raise InvalidCommit(f"duplicate signature by {sig.validator.hex()}")
        seen.add(sig.validator)
        if sig.validator not in validators:
            raise InvalidCommit(f"signature by unknown validator {sig.validator.hex()}")
        if not verify_message(precommit_of(commit, sig), chain_id):
            raise InvalidCommit(f"bad signature by {sig.validator.hex()}")
        power += validators.power_of(sig.validator)
    if not validators.has_two_thirds(power):
        raise InvalidCommit(
            f"commit has {power} of {validators.total_power} voting power, needs more than 2/3"
        )
