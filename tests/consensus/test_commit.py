"""Commit certificates, wire-type encodings and config validation."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consensus import (
    Commit,
    CommitSig,
    ConfigError,
    ConsensusConfig,
    Envelope,
    Evidence,
    InvalidCommit,
    MessageKind,
    Proposal,
    SyncBlock,
    SyncRequest,
    SyncResponse,
    ValidatorSet,
    Vote,
    VoteType,
    commit_from_votes,
    precommit_of,
    sign_message,
    verify_commit,
    verify_message,
)
from consensus.testing import make_genesis
from ledger import decode, digest, encode

CHAIN = "test-chain"
BLOCK = digest(b"block")


def precommits(keys: list, block_hash: bytes = BLOCK, round_: int = 0) -> list[Vote]:
    return [sign_message(Vote(VoteType.PRECOMMIT, 3, round_, block_hash), k, CHAIN) for k in keys]


def test_commit_of_two_thirds_verifies_and_rebuilds_each_precommit() -> None:
    keys, genesis = make_genesis(4, chain_id=CHAIN)
    vset = ValidatorSet(genesis.validators)
    votes = precommits(keys[:3])
    commit = commit_from_votes(3, 0, BLOCK, votes)
    verify_commit(commit, vset, CHAIN)
    assert [s.validator for s in commit.signatures] == sorted(k.address for k in keys[:3])
    for sig in commit.signatures:
        rebuilt = precommit_of(commit, sig)
        assert verify_message(rebuilt, CHAIN), "a precommit must be rebuildable from a CommitSig"
        assert rebuilt in votes


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c, k: dataclasses.replace(c, signatures=c.signatures[:2]), id="1/2"),
        pytest.param(
            lambda c, k: dataclasses.replace(c, signatures=(*c.signatures, c.signatures[0])),
            id="duplicate",
        ),
        pytest.param(
            lambda c, k: dataclasses.replace(
                c, signatures=(*c.signatures[:2], CommitSig(k.address, c.signatures[2].signature))
            ),
            id="unknown-validator",
        ),
        pytest.param(
            lambda c, k: dataclasses.replace(
                c, signatures=(*c.signatures[:2], CommitSig(c.signatures[2].validator, b"\0" * 64))
            ),
            id="bad-signature",
        ),
        pytest.param(lambda c, k: dataclasses.replace(c, round=1), id="wrong-round"),
        pytest.param(lambda c, k: dataclasses.replace(c, block_hash=b""), id="nil"),
    ],
)
def test_bad_commits_are_rejected(mutate) -> None:  # type: ignore[no-untyped-def]
    keys, genesis = make_genesis(4, chain_id=CHAIN)
    vset = ValidatorSet(genesis.validators)
    commit = commit_from_votes(3, 0, BLOCK, precommits(keys[:3]))
    outsider = make_genesis(5, seed=99)[0][4]
    with pytest.raises(InvalidCommit):
        verify_commit(mutate(commit, outsider), vset, CHAIN)


def test_commit_for_another_chain_is_rejected() -> None:
    keys, genesis = make_genesis(4, chain_id=CHAIN)
    commit = commit_from_votes(3, 0, BLOCK, precommits(keys))
    with pytest.raises(InvalidCommit):
        verify_commit(commit, ValidatorSet(genesis.validators), "other-chain")


def test_commit_power_is_weighted() -> None:
    keys, genesis = make_genesis(4, powers=[10, 1, 1, 1], chain_id=CHAIN)
    vset = ValidatorSet(genesis.validators)
    verify_commit(commit_from_votes(3, 0, BLOCK, precommits(keys[:1])), vset, CHAIN)
    with pytest.raises(InvalidCommit):
        verify_commit(commit_from_votes(3, 0, BLOCK, precommits(keys[1:])), vset, CHAIN)


hashes = st.one_of(st.just(b""), st.binary(min_size=32, max_size=32))
u32 = st.integers(min_value=0, max_value=2**32)
votes = st.builds(
    Vote,
    st.sampled_from(VoteType),
    u32,
    u32,
    hashes,
    st.binary(max_size=32),
    st.binary(max_size=64),
)
commits = st.builds(
    Commit,
    u32,
    u32,
    hashes,
    st.lists(st.builds(CommitSig, st.binary(max_size=32), st.binary(max_size=64)), max_size=4).map(
        tuple
    ),
)
values = st.one_of(
    votes,
    st.builds(
        Proposal,
        u32,
        u32,
        st.integers(min_value=-1, max_value=100),
        hashes,
        st.binary(max_size=64),
        st.binary(max_size=32),
        st.binary(max_size=64),
    ),
    commits,
    st.builds(Evidence, votes, votes),
    st.builds(Envelope, st.sampled_from(MessageKind), st.binary(max_size=64)),
    st.builds(SyncRequest, u32, u32),
    st.builds(
        SyncResponse,
        u32,
        st.lists(st.builds(SyncBlock, u32, st.binary(max_size=32), commits), max_size=3).map(tuple),
    ),
)


@given(values)
def test_wire_types_round_trip_canonically(value: object) -> None:
    data = encode(value)
    assert decode(type(value), data) == value
    assert encode(decode(type(value), data)) == data


def test_config_is_validated_and_names_the_key() -> None:
    assert ConsensusConfig.default().create_empty_blocks is False
    assert (
        ConsensusConfig.for_tests().timeout_propose_ms
        < ConsensusConfig.default().timeout_propose_ms
    )
    with pytest.raises(ConfigError, match="timeout_prevote_ms"):
        ConsensusConfig(timeout_prevote_ms=0)
    with pytest.raises(ConfigError, match="sync_interval_ms"):
        ConsensusConfig(sync_interval_ms=-5)
