"""Property: whatever arrives, in any order, the engine never casts two votes for one step."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from consensus import (
    NIL,
    Action,
    CastProposal,
    CastVote,
    ConsensusConfig,
    Decide,
    Engine,
    Proposal,
    Step,
    ValidateBlock,
    ValidatorSet,
    Vote,
    VoteType,
    sign_message,
    verify_commit,
)
from consensus.testing import make_genesis
from ledger import digest

CHAIN = "test-chain"
KEYS, GENESIS = make_genesis(4, chain_id=CHAIN)
VSET = ValidatorSet(GENESIS.validators)
BLOCKS = [b"block-a", b"block-b", b"block-c"]
ROUNDS = 4

proposals = st.tuples(
    st.just("proposal"),
    st.integers(0, ROUNDS - 1),
    st.integers(0, len(BLOCKS) - 1),
    st.integers(-1, ROUNDS - 2),
)
votes = st.tuples(
    st.just("vote"),
    st.integers(0, 3),
    st.sampled_from(VoteType),
    st.integers(0, ROUNDS - 1),
    st.integers(-1, len(BLOCKS) - 1),
)
timeouts = st.tuples(
    st.just("timeout"),
    st.integers(0, ROUNDS - 1),
    st.sampled_from([Step.PROPOSE, Step.PREVOTE, Step.PRECOMMIT]),
)
validations = st.tuples(st.just("valid"), st.integers(0, len(BLOCKS) - 1), st.booleans())
events = st.lists(st.one_of(proposals, votes, timeouts, validations), max_size=60)


@settings(max_examples=150, deadline=None)
@given(me=st.integers(0, 3), script=events)
def test_engine_never_casts_twice_for_one_step(me: int, script: list[tuple[object, ...]]) -> None:
    key = KEYS[me]
    engine = Engine(
        validators=VSET, address=key.address, config=ConsensusConfig.for_tests(), height=1
    )
    cast: dict[tuple[int, int], bytes] = {}
    decided: list[Decide] = []

    def run(actions: list[Action]) -> None:
        queue = list(actions)
        for _ in range(10_000):
            if not queue:
                return
            a = queue.pop(0)
            if isinstance(a, CastVote):
                slot = (a.round, int(a.vote_type))
                assert slot not in cast, f"cast twice for round {a.round} {a.vote_type.name}"
                cast[slot] = a.block_hash
                vote = sign_message(Vote(a.vote_type, 1, a.round, a.block_hash), key, CHAIN)
                queue += engine.on_vote(vote)
            elif isinstance(a, CastProposal):
                slot = (a.round, 0)
                assert slot not in cast, f"proposed twice in round {a.round}"
                cast[slot] = a.block_hash
                p = Proposal(1, a.round, a.pol_round, a.block_hash, a.block)
                queue += engine.on_proposal(sign_message(p, key, CHAIN))
            elif isinstance(a, Decide):
                decided.append(a)
            elif isinstance(a, ValidateBlock):
                pass  # answered (or not) by the script's "valid" events

    run(engine.start_round(0))
    for event in script:
        if event[0] == "proposal":
            _, round_, block_i, pol = event
            if pol >= round_:
                continue  # the driver drops these before the engine sees them
            proposer = next(k for k in KEYS if k.address == VSET.proposer(1, round_))
            if proposer is key:
                continue  # our own proposals come only from our own casts
            block = BLOCKS[block_i]
            p = Proposal(1, round_, pol, digest(block), block)
            run(engine.on_proposal(sign_message(p, proposer, CHAIN)))
        elif event[0] == "vote":
            _, who, vote_type, round_, block_i = event
            if KEYS[who] is key:
                continue
            block_hash = NIL if block_i < 0 else digest(BLOCKS[block_i])
            vote = sign_message(Vote(vote_type, 1, round_, block_hash), KEYS[who], CHAIN)
            run(engine.on_vote(vote))
        elif event[0] == "timeout":
            run(engine.on_timeout(1, event[1], event[2]))
        else:
            run(engine.on_block_validated(1, digest(BLOCKS[event[1]]), event[2]))
    assert len(decided) <= 1, "a height is decided once"
    for d in decided:
        verify_commit(d.commit, VSET, CHAIN)
        assert digest(d.block) == d.block_hash
