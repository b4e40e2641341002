"""The pure engine against the rules of the Tendermint paper's Algorithm 1."""

from __future__ import annotations

from consensus import (
    NIL,
    Action,
    CastProposal,
    CastVote,
    ConsensusConfig,
    Decide,
    Engine,
    Proposal,
    ReportEvidence,
    RequestBlock,
    ScheduleTimeout,
    Step,
    ValidateBlock,
    ValidatorSet,
    Vote,
    VoteType,
    sign_message,
    verify_commit,
    verify_message,
)
from consensus.testing import make_genesis
from ledger import SigningKey, digest

CHAIN = "test-chain"
CONFIG = ConsensusConfig.for_tests()


class Harness:
    """One engine (validator ``me``) plus the other validators' keys to sign what they send."""

    def __init__(self, n: int = 4, *, me: int | None = None, height: int = 1) -> None:
        self.keys, genesis = make_genesis(n, chain_id=CHAIN)
        self.vset = ValidatorSet(genesis.validators)
        self.by_address = {k.address: k for k in self.keys}
        proposer = self.vset.proposer(height, 0)
        # By default be a validator that is not round 0's proposer.
        self.me = (
            me
            if me is not None
            else next(i for i, k in enumerate(self.keys) if k.address != proposer)
        )
        self.key = self.keys[self.me]
        self.engine = Engine(
            validators=self.vset, address=self.key.address, config=CONFIG, height=height
        )
        self.height = height

    def others(self) -> list[SigningKey]:
        return [k for k in self.keys if k is not self.key]

    def proposer_key(self, round_: int) -> SigningKey:
        return self.by_address[self.vset.proposer(self.height, round_)]

    def proposal(self, round_: int, block: bytes, pol_round: int = -1) -> Proposal:
        p = Proposal(self.height, round_, pol_round, digest(block), block)
        return sign_message(p, self.proposer_key(round_), CHAIN)

    def vote(self, key: SigningKey, vote_type: VoteType, round_: int, block_hash: bytes) -> Vote:
        return sign_message(Vote(vote_type, self.height, round_, block_hash), key, CHAIN)

    def feed_own(self, actions: list[Action]) -> list[Action]:
        """Act as the driver for our own casts: sign them and feed them back; answer validation."""
        out: list[Action] = []
        queue = list(actions)
        while queue:
            a = queue.pop(0)
            out.append(a)
            if isinstance(a, CastVote):
                queue += self.engine.on_vote(
                    self.vote(self.key, a.vote_type, a.round, a.block_hash)
                )
            elif isinstance(a, ValidateBlock):
                queue += self.engine.on_block_validated(a.height, a.block_hash, True)
        return out


def casts(actions: list[Action], vote_type: VoteType) -> list[CastVote]:
    return [a for a in actions if isinstance(a, CastVote) and a.vote_type == vote_type]


def test_happy_path_decides_with_a_verifiable_commit() -> None:
    h = Harness()
    acts = h.feed_own(h.engine.start_round(0))
    assert any(isinstance(a, ScheduleTimeout) and a.step == Step.PROPOSE for a in acts), acts
    block = b"block-1"
    acts = h.feed_own(h.engine.on_proposal(h.proposal(0, block)))
    prevotes = casts(acts, VoteType.PREVOTE)
    assert [p.block_hash for p in prevotes] == [digest(block)], f"expected a prevote: {acts}"
    acts = []
    for k in h.others()[:2]:
        acts += h.feed_own(h.engine.on_vote(h.vote(k, VoteType.PREVOTE, 0, digest(block))))
    assert [p.block_hash for p in casts(acts, VoteType.PRECOMMIT)] == [digest(block)], acts
    assert h.engine.locked_round == 0, "a precommit for a block locks it"
    for k in h.others()[:2]:
        acts += h.feed_own(h.engine.on_vote(h.vote(k, VoteType.PRECOMMIT, 0, digest(block))))
    decided = [a for a in acts if isinstance(a, Decide)]
    assert len(decided) == 1, f"3 of 4 precommits must decide: {acts}"
    assert decided[0].block == block
    verify_commit(decided[0].commit, h.vset, CHAIN)
    assert h.engine.step == Step.COMMIT


def test_invalid_block_gets_a_nil_prevote() -> None:
    h = Harness()
    h.engine.start_round(0)
    acts = h.engine.on_proposal(h.proposal(0, b"bad"))
    assert any(isinstance(a, ValidateBlock) for a in acts), "a proposal must be validated"
    acts = h.engine.on_block_validated(1, digest(b"bad"), False)
    assert [v.block_hash for v in casts(acts, VoteType.PREVOTE)] == [NIL], acts


def lock_on(h: Harness, block: bytes, round_: int = 0) -> None:
    h.feed_own(h.engine.start_round(0) if round_ == 0 else [])
    h.feed_own(h.engine.on_proposal(h.proposal(round_, block)))
    for k in h.others()[:2]:
        h.feed_own(h.engine.on_vote(h.vote(k, VoteType.PREVOTE, round_, digest(block))))
    assert h.engine.locked_hash == digest(block), "setup: engine should be locked"


def test_locked_validator_prevotes_nil_for_another_block_without_pol() -> None:
    h = Harness()
    lock_on(h, b"B")
    # Precommits for nil from the others: round 0 ends by timeout.
    acts: list[Action] = []
    for k in h.others():
        acts += h.feed_own(h.engine.on_vote(h.vote(k, VoteType.PRECOMMIT, 0, NIL)))
    assert any(isinstance(a, ScheduleTimeout) and a.step == Step.PRECOMMIT for a in acts), acts
    acts = h.feed_own(h.engine.on_timeout(1, 0, Step.PRECOMMIT))
    assert h.engine.round == 1, "precommit timeout moves to the next round"
    assert h.vset.proposer(1, 1) != h.key.address, "setup: round 1 is someone else's"
    acts = h.feed_own(h.engine.on_proposal(h.proposal(1, b"C")))
    assert [v.block_hash for v in casts(acts, VoteType.PREVOTE)] == [NIL], (
        f"locked on B, a new block C without proof-of-lock must get a nil prevote: {acts}"
    )


def test_pol_in_a_later_round_unlocks() -> None:
    h = Harness()
    lock_on(h, b"B")
    # Round 1: everyone else prevotes C (we never saw a proposal), then round 2 proposes C
    # with pol_round 1: lockedRound 0 <= 1, so we prevote C (paper line 28).
    h.feed_own(h.engine.on_timeout(1, 0, Step.PRECOMMIT))
    assert h.engine.round == 1
    for k in h.others():
        h.feed_own(h.engine.on_vote(h.vote(k, VoteType.PREVOTE, 1, digest(b"C"))))
    h.feed_own(h.engine.on_timeout(1, 1, Step.PRECOMMIT))
    h.feed_own(h.engine.on_timeout(1, 1, Step.PROPOSE))
    h.feed_own(h.engine.on_timeout(1, 1, Step.PREVOTE))
    h.feed_own(h.engine.on_timeout(1, 1, Step.PRECOMMIT))
    assert h.engine.round == 2, f"round should be 2, is {h.engine.round}"
    assert h.vset.proposer(1, 2) != h.key.address, "setup: round 2 is someone else's"
    acts = h.feed_own(h.engine.on_proposal(h.proposal(2, b"C", pol_round=1)))
    assert [v.block_hash for v in casts(acts, VoteType.PREVOTE)] == [digest(b"C")], (
        f"a proof-of-lock from round 1 > locked round 0 must unlock: {acts}"
    )


def test_round_skip_on_one_third_of_power_in_a_later_round() -> None:
    h = Harness()
    h.engine.start_round(0)
    others = h.others()
    h.engine.on_vote(h.vote(others[0], VoteType.PREVOTE, 5, NIL))
    assert h.engine.round == 0, "one validator of four (< 1/3) must not move us"
    acts = h.engine.on_vote(h.vote(others[1], VoteType.PRECOMMIT, 5, NIL))
    assert h.engine.round == 5, "two of four (> 1/3) in round 5 must skip us there"
    timeouts = [a for a in acts if isinstance(a, ScheduleTimeout)]
    assert timeouts, f"entering round 5 arms its propose timeout: {acts}"
    assert timeouts[0].duration_ms == CONFIG.timeout_propose(5) > CONFIG.timeout_propose(0), (
        "round timeouts must grow with the round"
    )


def test_equivocation_is_kept_as_evidence() -> None:
    h = Harness()
    h.engine.start_round(0)
    bad = h.others()[0]
    h.engine.on_vote(h.vote(bad, VoteType.PREVOTE, 0, digest(b"X")))
    acts = h.engine.on_vote(h.vote(bad, VoteType.PREVOTE, 0, digest(b"Y")))
    reports = [a for a in acts if isinstance(a, ReportEvidence)]
    assert len(reports) == 1, f"two different prevotes must be reported: {acts}"
    ev = reports[0].evidence
    assert ev.vote_a.signer == ev.vote_b.signer == bad.address
    assert ev.vote_a.block_hash != ev.vote_b.block_hash
    assert verify_message(ev.vote_a, CHAIN), "evidence votes must carry valid signatures"
    assert verify_message(ev.vote_b, CHAIN), "evidence votes must carry valid signatures"
    again = h.engine.on_vote(h.vote(bad, VoteType.PREVOTE, 0, digest(b"Y")))
    assert not again, "a repeated vote is a duplicate, not new evidence"
    assert len(h.engine.take_evidence()) == 1


def test_locked_proposer_reproposes_its_valid_value_with_its_pol_round() -> None:
    h = Harness()
    lock_on(h, b"B")
    # Skip to the first later round where we propose (f+1 precommits there move us).
    mine = next(r for r in range(1, 20) if h.vset.proposer(1, r) == h.key.address)
    acts: list[Action] = []
    for k in h.others()[:2]:
        acts += h.feed_own(h.engine.on_vote(h.vote(k, VoteType.PRECOMMIT, mine, NIL)))
    assert h.engine.round == mine
    props = [a for a in acts if isinstance(a, CastProposal)]
    assert [(p.block_hash, p.pol_round) for p in props] == [(digest(b"B"), 0)], (
        f"a proposer with a valid value re-proposes it with pol_round = valid round: {acts}"
    )
    assert not [a for a in acts if isinstance(a, RequestBlock)], "no fresh block when locked"


def test_proposer_asks_the_app_for_a_block() -> None:
    h = Harness()
    proposer_index = h.keys.index(h.proposer_key(0))
    p = Harness(me=proposer_index)
    acts = p.engine.start_round(0)
    assert any(isinstance(a, RequestBlock) for a in acts), f"proposer must request a block: {acts}"
    acts = p.engine.on_block_value(1, 0, digest(b"v"), b"v")
    assert [a.block_hash for a in acts if isinstance(a, CastProposal)] == [digest(b"v")]


def test_follower_engine_decides_from_gossip_without_voting() -> None:
    keys, genesis = make_genesis(4, chain_id=CHAIN)
    vset = ValidatorSet(genesis.validators)
    engine = Engine(validators=vset, address=None, config=CONFIG, height=1)
    block = b"b"
    proposer = next(k for k in keys if k.address == vset.proposer(1, 0))
    acts = engine.on_proposal(
        sign_message(Proposal(1, 0, -1, digest(block), block), proposer, CHAIN)
    )
    acts += engine.on_block_validated(1, digest(block), True)
    for k in keys[:3]:
        acts += engine.on_vote(
            sign_message(Vote(VoteType.PRECOMMIT, 1, 0, digest(block)), k, CHAIN)
        )
    assert not [a for a in acts if isinstance(a, CastVote | CastProposal)], "followers never vote"
    assert [a.block for a in acts if isinstance(a, Decide)] == [block], acts


def test_restore_brings_back_the_lock_and_round() -> None:
    h = Harness()
    block = b"locked"
    own = [
        h.vote(h.key, VoteType.PREVOTE, 2, digest(block)),
        h.vote(h.key, VoteType.PRECOMMIT, 2, digest(block)),
    ]
    h.engine.restore(own, {digest(block): block})
    assert (h.engine.round, h.engine.step) == (2, Step.PRECOMMIT)
    assert (h.engine.locked_hash, h.engine.locked_round) == (digest(block), 2)


def test_weighted_proposer_rotation() -> None:
    _, genesis = make_genesis(3, powers=[1, 2, 3], chain_id=CHAIN)
    vset = ValidatorSet(genesis.validators)
    counts: dict[bytes, int] = {}
    for height in range(1, 601):
        proposer = vset.proposer(height, 0)
        counts[proposer] = counts.get(proposer, 0) + 1
    by_power = {v.power: counts[v.address] for v in vset.validators}
    assert by_power == {1: 100, 2: 200, 3: 300}, f"proposals must follow power: {by_power}"
    # Rounds rotate too, so a faulty proposer cannot hold a height.
    assert len({vset.proposer(7, r) for r in range(6)}) == 3


def test_bogus_bytes_for_a_hash_do_not_poison_the_real_block() -> None:
    h = Harness()
    h.engine.start_round(0)
    real = b"real block"
    # Round 0's proposer claims the real block's hash with other bytes: validation fails.
    bogus = sign_message(Proposal(1, 0, -1, digest(real), b"garbage"), h.proposer_key(0), CHAIN)
    acts = h.engine.on_proposal(bogus)
    assert [a.block for a in acts if isinstance(a, ValidateBlock)] == [b"garbage"]
    acts = h.engine.on_block_validated(1, digest(real), False)
    assert [v.block_hash for v in casts(acts, VoteType.PREVOTE)] == [NIL]
    # Round 1's proposer has the real bytes under the same hash: they get validated afresh.
    for k in h.others():
        h.engine.on_vote(h.vote(k, VoteType.PRECOMMIT, 0, NIL))
    h.feed_own(h.engine.on_timeout(1, 0, Step.PRECOMMIT))
    assert h.engine.round == 1
    assert h.vset.proposer(1, 1) != h.key.address, "setup: round 1 is someone else's"
    acts = h.engine.on_proposal(h.proposal(1, real))
    assert [a.block for a in acts if isinstance(a, ValidateBlock)] == [real], (
        f"the real bytes must be validated, not judged by the bogus ones: {acts}"
    )
