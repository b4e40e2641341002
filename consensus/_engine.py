"""The Tendermint state machine (Buchman, Kwon, Milosevic 2018, Algorithm 1) as a pure object.

Events go in (``on_proposal``, ``on_vote``, ``on_timeout``, ``on_block_validated``,
``on_block_value``, ``start_round``), a list of actions comes out (cast a proposal or vote,
schedule a timeout, ask the app for or about a block, decide). No I/O, no clock, no randomness:
the driver signs, logs, sends and sleeps. Comments cite the paper's line numbers.

The engine trusts its caller to have checked signatures, validator membership and the proposer
of each proposal (the driver does, before anything reaches here); it still bounds everything it
stores per height.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from consensus._commit import commit_from_votes
from consensus.types import NIL, Commit, Evidence, Proposal, Step, Vote, VoteType
from ledger import encode

if TYPE_CHECKING:
    from collections.abc import Sequence

    from consensus._validators import ValidatorSet
    from consensus.config import ConsensusConfig

conflicting_votes_max = 8
"""Distinct block hashes counted per validator per (round, vote type): bounds what one
equivocator can make us store; past it, its further conflicting votes are only evidence."""
rule_iterations_max = 10_000
"""Rules fired per event; each firing advances the step or round, so this is never reached."""


@dataclasses.dataclass(frozen=True, slots=True)
class CastProposal:
    height: int
    round: int
    pol_round: int
    block_hash: bytes
    block: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class CastVote:
    vote_type: VoteType
    height: int
    round: int
    block_hash: bytes
    block: bytes
    """The block a non-nil precommit locks on, logged to the WAL to restore the lock; else b""."""


@dataclasses.dataclass(frozen=True, slots=True)
class ScheduleTimeout:
    height: int
    round: int
    step: Step
    duration_ms: int


@dataclasses.dataclass(frozen=True, slots=True)
class RequestBlock:
    """This validator proposes in (height, round) and has no valid value: ask the app for one."""

    height: int
    round: int


@dataclasses.dataclass(frozen=True, slots=True)
class ValidateBlock:
    height: int
    block_hash: bytes
    block: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Decide:
    height: int
    round: int
    block_hash: bytes
    block: bytes
    commit: Commit


@dataclasses.dataclass(frozen=True, slots=True)
class ReportEvidence:
    evidence: Evidence


Action = (
    CastProposal
    | CastVote
    | ScheduleTimeout
    | RequestBlock
    | ValidateBlock
    | Decide
    | ReportEvidence
)


class _Tally:
    """One (round, vote type)'s votes.

    The "any" total counts each validator once (its first vote). Per block hash, though, every
    validator that signed a vote for that hash counts, even one that also signed another: an
    equivocator's vote for X is as real as its vote for Y, and ignoring it would let it hide a
    proof-of-lock from the nodes that heard its other vote first (a liveness attack the
    simulation found). This is still safe: two >2/3 quorums for different hashes overlap in
    >1/3 of the power, so some honest validator would have to have voted twice.
    """

    __slots__ = ("by_hash", "first", "hashes_of", "total", "voters")

    def __init__(self) -> None:
        self.first: dict[bytes, Vote] = {}
        self.voters: dict[bytes, dict[bytes, Vote]] = {}
        self.hashes_of: dict[bytes, int] = {}
        self.by_hash: dict[bytes, int] = {}
        self.total = 0


class Engine:
    """One validator's (or follower's, with ``address=None``) consensus state machine."""

    def __init__(
        self,
        *,
        validators: ValidatorSet,
        address: bytes | None,
        config: ConsensusConfig,
        height: int,
    ) -> None:
        self.validators = validators
        self.address = address if address is not None and address in validators else None
        self.config = config
        self.evidence: list[Evidence] = []
        self._reset(height)

    # --- state ------------------------------------------------------------------------------

    def _reset(self, height: int) -> None:
        self.height = height
        self.round = 0
        self.step = Step.NEW_HEIGHT
        self.locked_hash: bytes | None = None
        self.locked_round = -1
        self.valid_hash: bytes | None = None
        self.valid_round = -1
        self.decided: Decide | None = None
        self._proposals: dict[int, Proposal] = {}
        self._blocks: dict[bytes, bytes] = {}
        self._validity: dict[bytes, bool] = {}
        self._validation_asked: set[bytes] = set()
        self._tallies: dict[tuple[int, VoteType], _Tally] = {}
        self._round_senders: dict[int, dict[bytes, None]] = {}
        self._prevote_timeout_rounds: set[int] = set()
        self._precommit_timeout_rounds: set[int] = set()
        self._line36_rounds: set[int] = set()
        # Offences already reported this height (keys carry the height, so a reset is safe).
        self._evidence_keys: set[tuple[bytes, int, int, int]] = set()

    @property
    def is_validator(self) -> bool:
        return self.address is not None

    def block_of(self, block_hash: bytes) -> bytes | None:
        return self._blocks.get(block_hash)

    def pol_votes(self, round_: int, block_hash: bytes) -> list[Vote]:
        """The prevotes of ``round_`` for ``block_hash``: the proof-of-lock behind a proposal with
        that ``pol_round`` (peers that missed them cannot accept the proposal without them)."""
        tally = self._tally(round_, VoteType.PREVOTE)
        if tally is None:
            return []
        return list(tally.voters.get(block_hash, {}).values())

    def take_evidence(self) -> list[Evidence]:
        taken, self.evidence = self.evidence, []
        return taken

    def accepts_round(self, round_: int) -> bool:
        return 0 <= round_ <= self.round + self.config.rounds_ahead_max

    # --- events -----------------------------------------------------------------------------

    def start_height(self, height: int) -> list[Action]:
        """Enter ``height`` in NEW_HEIGHT; round 0 starts on ``start_round(0)`` or a message."""
        assert height > self.height or self.step == Step.NEW_HEIGHT, "heights only move forward"
        self._reset(height)
        return []

    def start_round(self, round_: int) -> list[Action]:
        """The driver's go for round 0 (after the commit pause and the empty-block policy)."""
        if self.step == Step.NEW_HEIGHT:
            actions = self._start_round(round_)
            self._process(actions)
            return actions
        return []

    def restore(self, own: Sequence[Proposal | Vote], blocks: dict[bytes, bytes]) -> list[Action]:
        """Resume this height from the WAL's record of our own signed messages.

        A non-nil precommit in round r means we locked that block in round r (line 36), so the
        lock and valid value come back; we re-enter the latest round we signed in, at the step
        our messages show, so we never go back and sign the same step differently.
        """
        assert self.step == Step.NEW_HEIGHT, "restore only before the height starts"
        mine = [m for m in own if m.height == self.height]
        if not mine or self.address is None:
            return []
        for m in mine:
            if isinstance(m, Vote) and m.vote_type == VoteType.PRECOMMIT and not m.is_nil:
                block = blocks.get(m.block_hash)
                if block is not None and m.round > self.locked_round:
                    self.locked_hash, self.locked_round = m.block_hash, m.round
                    self.valid_hash, self.valid_round = m.block_hash, m.round
                    self._blocks[m.block_hash] = block
        last_round = max(m.round for m in mine)
        actions = self._start_round(last_round)
        steps = [m.vote_type for m in mine if isinstance(m, Vote) and m.round == last_round]
        if VoteType.PRECOMMIT in steps:
            self.step = Step.PRECOMMIT
        elif VoteType.PREVOTE in steps:
            self.step = Step.PREVOTE
        # Our own messages count like anyone's; the driver re-sends them (peers may have missed
        # them while we were down).
        for m in mine:
            if isinstance(m, Proposal):
                actions += self._add_proposal(m)
            else:
                actions += self._add_vote(m)
        self._process(actions)
        return actions

    def on_proposal(self, proposal: Proposal) -> list[Action]:
        if proposal.height != self.height or not self.accepts_round(proposal.round):
            return []
        actions = self._add_proposal(proposal)
        if self.step == Step.NEW_HEIGHT:
            actions += self._start_round(0)
        self._process(actions)
        return actions

    def on_vote(self, vote: Vote) -> list[Action]:
        if vote.height != self.height or not self.accepts_round(vote.round):
            return []
        actions = self._add_vote(vote)
        if self.step == Step.NEW_HEIGHT:
            actions += self._start_round(0)
        self._process(actions)
        return actions

    def on_block_validated(self, height: int, block_hash: bytes, valid: bool) -> list[Action]:
        if height != self.height:
            return []
        self._validity[block_hash] = valid
        actions: list[Action] = []
        self._process(actions)
        return actions

    def on_block_value(
        self, height: int, round_: int, block_hash: bytes, block: bytes
    ) -> list[Action]:
        """The app's fresh block for our turn as proposer (the paper's getValue())."""
        actions: list[Action] = []
        if (
            height == self.height
            and round_ == self.round
            and self.step == Step.PROPOSE
            and self.address is not None
            and self.validators.proposer(height, round_) == self.address
            and round_ not in self._proposals
        ):
            actions.append(CastProposal(height, round_, -1, block_hash, block))
        return actions

    def on_timeout(self, height: int, round_: int, step: Step) -> list[Action]:
        actions: list[Action] = []
        if height != self.height or round_ != self.round or self.step == Step.COMMIT:
            return actions
        if step == Step.PROPOSE and self.step == Step.PROPOSE:  # line 57
            actions.append(self._vote(VoteType.PREVOTE, NIL))
            self.step = Step.PREVOTE
        elif step == Step.PREVOTE and self.step == Step.PREVOTE:  # line 61
            actions.append(self._vote(VoteType.PRECOMMIT, NIL))
            self.step = Step.PRECOMMIT
        elif step == Step.PRECOMMIT:  # line 65
            actions += self._start_round(round_ + 1)
        self._process(actions)
        return actions

    # --- internals --------------------------------------------------------------------------

    def _add_proposal(self, p: Proposal) -> list[Action]:
        actions: list[Action] = []
        if p.round in self._proposals:
            return actions  # a second proposal from the proposer: keep the first
        self._proposals[p.round] = p
        known = self._blocks.get(p.block_hash)
        if known is None or (known != p.block and self._validity.get(p.block_hash) is False):
            # A Byzantine proposer can pair a good block's hash with bad bytes; if those came
            # first, the hash must not stay "invalid" once the real bytes turn up.
            self._blocks[p.block_hash] = p.block
            self._validity.pop(p.block_hash, None)
            self._validation_asked.discard(p.block_hash)
        self._round_senders.setdefault(p.round, {})[p.signer] = None
        if p.block_hash not in self._validity and p.block_hash not in self._validation_asked:
            self._validation_asked.add(p.block_hash)
            actions.append(ValidateBlock(self.height, p.block_hash, p.block))
        return actions

    def _add_vote(self, v: Vote) -> list[Action]:
        actions: list[Action] = []
        tally = self._tallies.setdefault((v.round, v.vote_type), _Tally())
        voters = tally.voters.setdefault(v.block_hash, {})
        if v.signer in voters:
            return actions  # a duplicate
        power = self.validators.power_of(v.signer)
        first = tally.first.get(v.signer)
        if first is None:
            tally.first[v.signer] = v
            tally.total += power
            self._round_senders.setdefault(v.round, {})[v.signer] = None
        else:
            key = (v.signer, v.height, v.round, int(v.vote_type))
            if key not in self._evidence_keys and len(self.evidence) < self.config.evidence_max:
                self._evidence_keys.add(key)
                a, b = sorted((first, v), key=encode)
                ev = Evidence(a, b)
                self.evidence.append(ev)
                actions.append(ReportEvidence(ev))
            if tally.hashes_of.get(v.signer, 1) >= conflicting_votes_max:
                return actions
        tally.hashes_of[v.signer] = tally.hashes_of.get(v.signer, 0) + 1
        voters[v.signer] = v
        tally.by_hash[v.block_hash] = tally.by_hash.get(v.block_hash, 0) + power
        return actions

    def _tally(self, round_: int, vote_type: VoteType) -> _Tally | None:
        return self._tallies.get((round_, vote_type))

    def _two_thirds_for(self, round_: int, vote_type: VoteType, block_hash: bytes) -> bool:
        t = self._tally(round_, vote_type)
        return t is not None and self.validators.has_two_thirds(t.by_hash.get(block_hash, 0))

    def _two_thirds_any(self, round_: int, vote_type: VoteType) -> bool:
        t = self._tally(round_, vote_type)
        return t is not None and self.validators.has_two_thirds(t.total)

    def _vote(self, vote_type: VoteType, block_hash: bytes) -> CastVote:
        block = b""
        if vote_type == VoteType.PRECOMMIT and block_hash != NIL:
            block = self._blocks[block_hash]
        return CastVote(vote_type, self.height, self.round, block_hash, block)

    def _start_round(self, round_: int) -> list[Action]:  # line 11
        self.round = round_
        self.step = Step.PROPOSE
        actions: list[Action] = []
        if self.address is None:
            return actions
        if self.validators.proposer(self.height, round_) == self.address:
            if self.valid_hash is not None:  # line 15
                actions.append(
                    CastProposal(
                        self.height,
                        round_,
                        self.valid_round,
                        self.valid_hash,
                        self._blocks[self.valid_hash],
                    )
                )
            else:
                actions.append(RequestBlock(self.height, round_))
        # Unlike the paper, the proposer arms the timeout too: if the app is slow to produce a
        # block, or our own proposal never comes back, the round still moves on.
        actions.append(
            ScheduleTimeout(self.height, round_, Step.PROPOSE, self.config.timeout_propose(round_))
        )
        return actions

    def _process(self, actions: list[Action]) -> None:
        for _ in range(rule_iterations_max):
            if not self._fire_one(actions):
                return
        raise AssertionError("consensus rules kept firing without end")

    def _validity_of(self, block_hash: bytes, actions: list[Action]) -> bool | None:
        valid = self._validity.get(block_hash)
        if valid is None and block_hash not in self._validation_asked:
            block = self._blocks.get(block_hash)
            if block is not None:
                self._validation_asked.add(block_hash)
                actions.append(ValidateBlock(self.height, block_hash, block))
        return valid

    def _fire_one(self, actions: list[Action]) -> bool:
        """Fire the first applicable rule; True if one fired (state changed)."""
        if self.step in (Step.COMMIT, Step.NEW_HEIGHT):
            return False
        if self._try_decide(actions):  # line 49, any round
            return True
        # line 55: f+1 of the power already in a later round: skip to the latest such round.
        later = [
            r
            for r, senders in self._round_senders.items()
            if r > self.round
            and self.validators.has_one_third(sum(self.validators.power_of(a) for a in senders))
        ]
        if later:
            actions += self._start_round(max(later))
            return True
        r = self.round
        if self.address is not None:
            p = self._proposals.get(r)
            if p is not None and self.step == Step.PROPOSE:
                if p.pol_round == -1:  # line 22
                    valid = self._validity_of(p.block_hash, actions)
                    if valid is not None:
                        ok = valid and (self.locked_round == -1 or self.locked_hash == p.block_hash)
                        actions.append(self._vote(VoteType.PREVOTE, p.block_hash if ok else NIL))
                        self.step = Step.PREVOTE
                        return True
                elif 0 <= p.pol_round < r and self._two_thirds_for(
                    p.pol_round, VoteType.PREVOTE, p.block_hash
                ):  # line 28
                    valid = self._validity_of(p.block_hash, actions)
                    if valid is not None:
                        ok = valid and (
                            self.locked_round <= p.pol_round or self.locked_hash == p.block_hash
                        )
                        actions.append(self._vote(VoteType.PREVOTE, p.block_hash if ok else NIL))
                        self.step = Step.PREVOTE
                        return True
            if (
                self.step == Step.PREVOTE
                and r not in self._prevote_timeout_rounds
                and self._two_thirds_any(r, VoteType.PREVOTE)
            ):  # line 34
                self._prevote_timeout_rounds.add(r)
                actions.append(
                    ScheduleTimeout(self.height, r, Step.PREVOTE, self.config.timeout_prevote(r))
                )
                return True
        p = self._proposals.get(r)
        if (
            p is not None
            and self.step >= Step.PREVOTE
            and r not in self._line36_rounds
            and self._two_thirds_for(r, VoteType.PREVOTE, p.block_hash)
        ):  # line 36
            valid = self._validity_of(p.block_hash, actions)
            if valid:
                self._line36_rounds.add(r)
                if self.step == Step.PREVOTE and self.address is not None:
                    self.locked_hash, self.locked_round = p.block_hash, r
                    actions.append(self._vote(VoteType.PRECOMMIT, p.block_hash))
                    self.step = Step.PRECOMMIT
                self.valid_hash, self.valid_round = p.block_hash, r
                return True
        if (
            self.address is not None
            and self.step == Step.PREVOTE
            and self._two_thirds_for(r, VoteType.PREVOTE, NIL)
        ):  # line 44
            actions.append(self._vote(VoteType.PRECOMMIT, NIL))
            self.step = Step.PRECOMMIT
            return True
        if (
            self.address is not None
            and r not in self._precommit_timeout_rounds
            and self._two_thirds_any(r, VoteType.PRECOMMIT)
        ):  # line 47
            self._precommit_timeout_rounds.add(r)
            actions.append(
                ScheduleTimeout(self.height, r, Step.PRECOMMIT, self.config.timeout_precommit(r))
            )
            return True
        return False

    def _try_decide(self, actions: list[Action]) -> bool:
        for (round_, vote_type), tally in self._tallies.items():
            if vote_type != VoteType.PRECOMMIT or not self.validators.has_two_thirds(tally.total):
                continue
            for block_hash, power in tally.by_hash.items():
                if block_hash == NIL or not self.validators.has_two_thirds(power):
                    continue
                block = self._blocks.get(block_hash)
                if block is None:
                    continue  # 2/3 precommitted a block we never saw: block sync fetches it
                if not self._validity_of(block_hash, actions):
                    continue
                commit = commit_from_votes(
                    self.height, round_, block_hash, list(tally.voters[block_hash].values())
                )
                decide = Decide(self.height, round_, block_hash, block, commit)
                self.decided = decide
                self.step = Step.COMMIT
                actions.append(decide)
                return True
        return False
