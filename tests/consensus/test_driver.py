"""The trio driver on a simulated network under MockClock: input checks, pacing, sync, restarts."""

from __future__ import annotations

import dataclasses
import json
import random
from typing import TYPE_CHECKING

import pytest
import trio

from consensus import (
    ConfigError,
    ConsensusConfig,
    ConsensusDriver,
    Envelope,
    MessageKind,
    PeerId,
    Proposal,
    Step,
    SyncBlock,
    SyncResponse,
    ValidatorSet,
    Vote,
    VoteType,
    Wal,
    WalRecord,
    commit_from_votes,
    sign_message,
)
from consensus.testing import (
    SimApp,
    SimBlock,
    SimCluster,
    SimDisk,
    SimNetwork,
    SimTransport,
    make_genesis,
    seeded_key,
)
from ledger import digest, encode

if TYPE_CHECKING:
    from pathlib import Path

    from trio.testing import MockClock

CHAIN = "test-chain"


def envelope(message: Proposal | Vote) -> bytes:
    kind = MessageKind.PROPOSAL if isinstance(message, Proposal) else MessageKind.VOTE
    return encode(Envelope(kind, encode(message)))


async def test_bad_input_is_dropped_and_counted_per_sender(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = SimCluster(nursery, tmp_path)
        await cluster.start()
        keys = cluster.keys
        target = cluster.nodes[0]
        assert target.driver is not None
        vset = target.driver.validators
        good = sign_message(Vote(VoteType.PREVOTE, 1, 0, digest(b"x")), keys[1], CHAIN)
        non_proposer = next(k for k in keys if k.address != vset.proposer(1, 0))
        proposer = next(k for k in keys if k.address == vset.proposer(1, 0))
        proposer_r1 = next(k for k in keys if k.address == vset.proposer(1, 1))
        third = vset.proposer(1, 2)
        other = encode(SimBlock(1, b"", 5, non_proposer.address, ()))
        # Re-proposed in round 1 with pol_round 0: its block was first proposed in round 0, so
        # it must name round 0's proposer, not round 2's.
        stranger = encode(SimBlock(1, b"", 5, third, ()))
        bad = {
            "garbage": b"\x93not msgpack at all",
            "garbage body": encode(Envelope(MessageKind.VOTE, b"\xc1")),
            "unknown validator": envelope(
                sign_message(Vote(VoteType.PREVOTE, 1, 0, b""), seeded_key(7, 7), CHAIN)
            ),
            "bad signature": envelope(dataclasses.replace(good, signature=b"\1" * 64)),
            "other chain": envelope(
                sign_message(Vote(VoteType.PREVOTE, 1, 0, b""), keys[1], "other-chain")
            ),
            "height 0": envelope(sign_message(Vote(VoteType.PREVOTE, 0, 0, b""), keys[1], CHAIN)),
            "short hash": envelope(
                sign_message(Vote(VoteType.PREVOTE, 1, 0, b"abc"), keys[1], CHAIN)
            ),
            "not the proposer": envelope(
                sign_message(Proposal(1, 0, -1, digest(b"b"), b"b"), non_proposer, CHAIN)
            ),
            "non-canonical": envelope(good) + b"\x00",
            "block names another proposer": envelope(
                sign_message(Proposal(1, 0, -1, digest(other), other), proposer, CHAIN)
            ),
            "re-proposal names no earlier proposer": envelope(
                sign_message(Proposal(1, 1, 0, digest(stranger), stranger), proposer_r1, CHAIN)
            ),
        }
        inbox = cluster.network.inboxes[target.peer_id]
        for data in bad.values():
            inbox.send_nowait((PeerId("mallory"), data))
        inbox.send_nowait((PeerId("carol"), envelope(good)))
        with trio.fail_after(10):
            # Polling a counter under the mock clock, with a deadline.
            while target.driver.stats.messages_received < len(bad) + 1:  # noqa: ASYNC110
                await trio.sleep(0.01)
        stats = target.driver.stats
        assert stats.bad_by_peer == {PeerId("mallory"): len(bad)}, (
            f"each of {list(bad)} must be dropped and counted against mallory, "
            f"and carol's good vote against no one: {stats.bad_by_peer}"
        )
        # The node is unharmed: the cluster still commits.
        cluster.add_tx()
        await cluster.wait_height(1)
        nursery.cancel_scope.cancel()


async def test_idle_network_makes_no_blocks_and_sends_nothing(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = SimCluster(nursery, tmp_path)
        await cluster.start()
        await trio.sleep(30)  # simulated: 30 s with nothing to do
        assert [n.app.height for n in cluster.nodes] == [0, 0, 0, 0], "no empty blocks"
        assert cluster.network.stats.sent == 0, "an idle network gossips nothing"
        cluster.add_tx()
        await cluster.wait_height(1)
        await trio.sleep(30)
        heights = [n.app.height for n in cluster.nodes]
        assert heights == [1, 1, 1, 1], f"one transaction makes one block, got {heights}"
        statuses = [n.driver.status() for n in cluster.nodes if n.driver is not None]
        assert all(s.step == Step.NEW_HEIGHT and s.height == 2 for s in statuses), statuses
        nursery.cancel_scope.cancel()


async def test_empty_block_interval_keeps_a_heartbeat(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    config = dataclasses.replace(ConsensusConfig.for_tests(), empty_block_interval_ms=2000)
    async with trio.open_nursery() as nursery:
        cluster = SimCluster(nursery, tmp_path, config=config)
        await cluster.start()
        await trio.sleep(21)
        heights = {n.app.height for n in cluster.nodes}
        assert min(heights) >= 5, f"one block per ~2 s expected over 21 s, got {heights}"
        assert max(heights) <= 11, f"no faster than the interval, got {heights}"
        nursery.cancel_scope.cancel()


async def test_follower_verifies_and_catches_up_by_block_sync(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    config = dataclasses.replace(ConsensusConfig.for_tests(), sync_blocks_max=2)
    async with trio.open_nursery() as nursery:
        cluster = SimCluster(nursery, tmp_path, followers=1, config=config)
        validators, follower = cluster.nodes[:4], cluster.nodes[4]
        await cluster.start(validators)
        for height in range(1, 7):
            cluster.add_tx()
            await cluster.wait_height(height, validators)
        await cluster.start([follower])
        assert follower.driver is not None
        saw_catching_up = False
        with trio.fail_after(60):
            while follower.app.height < 6 or follower.driver.status().catching_up:
                saw_catching_up |= follower.driver.status().catching_up
                await trio.sleep(0.01)
        assert saw_catching_up, "a follower 6 blocks behind must report catching_up"
        assert follower.disk.hashes == validators[0].disk.hashes, "follower chain must match"
        assert follower.driver.stats.blocks_synced == 6
        assert not follower.driver.status().is_validator
        # Live blocks reach the follower too.
        cluster.add_tx()
        await cluster.wait_height(7)
        nursery.cancel_scope.cancel()


async def test_restarted_validator_never_signs_a_second_vote_for_a_logged_step(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = SimCluster(nursery, tmp_path)
        cluster.network.log = []
        vset = cluster.nodes[0].validators
        node = next(n for n in cluster.nodes if n.key and n.key.address != vset.proposer(1, 0))
        assert node.key is not None
        # The WAL of a validator that prevoted some block X in round 0, then crashed.
        logged = sign_message(Vote(VoteType.PREVOTE, 1, 0, digest(b"X")), node.key, CHAIN)
        with Wal.open(node.wal_path)[0] as wal:
            wal.append(WalRecord(1, envelope(logged), b""))
        await cluster.start()
        cluster.add_tx()  # the proposer proposes a real block Y != X in round 0
        await cluster.wait_height(1)
        mine = [
            m
            for m in cluster.network.log
            if isinstance(m, Vote)
            and m.signer == node.key.address
            and (m.height, m.round, m.vote_type) == (1, 0, VoteType.PREVOTE)
        ]
        assert all(m == logged for m in mine), (
            f"after a restart the validator must stick to its logged prevote, sent {mine}"
        )
        assert all(n.disk.hashes[0] != digest(b"X") for n in cluster.nodes)
        nursery.cancel_scope.cancel()


async def test_single_validator_chain(autojump_clock: MockClock, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        cluster = SimCluster(nursery, tmp_path, validators=1)
        await cluster.start()
        driver = cluster.nodes[0].driver
        assert driver is not None
        for height in range(1, 4):
            cluster.add_tx()
            await driver.wait_committed(height)
        status = driver.status()
        assert (status.last_committed_height, status.is_validator) == (3, True), status
        assert not status.catching_up
        as_json = status.as_json()
        assert json.loads(json.dumps(as_json)) == as_json, "status must be plain JSON"
        assert as_json["height"] == 4
        assert as_json["validators"] == [{"address": cluster.keys[0].address.hex(), "power": 1}]
        nursery.cancel_scope.cancel()


class Impostor:
    """A peer that answers block-sync requests with whatever the test hands it."""

    def __init__(self, response: SyncResponse) -> None:
        self.response = response
        self.requests = 0

    async def handle_request(self, peer: PeerId, data: bytes) -> bytes:
        self.requests += 1
        return encode(self.response)


async def test_follower_rejects_blocks_without_a_valid_commit(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = SimCluster(nursery, tmp_path, followers=1)
        follower = cluster.nodes[4]
        keys = cluster.keys
        block = encode(SimBlock(1, b"", 5, keys[0].address, (b"forged",)))
        votes = [
            sign_message(Vote(VoteType.PRECOMMIT, 1, 0, digest(block)), k, CHAIN) for k in keys
        ]
        weak = commit_from_votes(1, 0, digest(block), votes[:2])  # 2 of 4: not > 2/3
        strong_other = commit_from_votes(
            1,
            0,
            digest(b"other"),
            [
                sign_message(Vote(VoteType.PRECOMMIT, 1, 0, digest(b"other")), k, CHAIN)
                for k in keys
            ],
        )
        cases = {
            "too little power": SyncBlock(1, block, weak),
            "commit for another block": SyncBlock(1, block, strong_other),
        }
        # The follower's only peer is the impostor.
        cluster.network.peer_ids = [follower.peer_id, PeerId("mallory")]
        for name, synced in cases.items():
            impostor = Impostor(SyncResponse(head_height=1, blocks=(synced,)))
            cluster.network.drivers[PeerId("mallory")] = impostor
            if follower.driver is None:
                await cluster.start([follower])
            assert follower.driver is not None
            before = follower.driver.stats.bad_by_peer.get(PeerId("mallory"), 0)
            with trio.fail_after(60):
                while follower.driver.stats.bad_by_peer.get(PeerId("mallory"), 0) == before:  # noqa: ASYNC110
                    await trio.sleep(0.1)
            assert follower.app.height == 0, f"{name}: the follower must not apply the block"
            status = follower.driver.status()
            assert not status.catching_up, "a head claimed without its commit is not believed"
            assert follower.driver.stats.sync_unproven_heads > 0
        nursery.cancel_scope.cancel()


async def test_even_partition_halts_then_heals(autojump_clock: MockClock, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        cluster = SimCluster(nursery, tmp_path)
        await cluster.start()
        cluster.add_tx()
        await cluster.wait_height(1)
        names = [n.peer_id for n in cluster.nodes]
        cluster.network.groups = [frozenset(names[:2]), frozenset(names[2:])]
        cluster.add_tx()
        await trio.sleep(20)
        heights = [n.app.height for n in cluster.nodes]
        assert heights == [1, 1, 1, 1], f"2 of 4 is no quorum: nothing may commit, got {heights}"
        # (Rounds need 2/3 of some vote to time out, so each half waits in round 0, re-sending.)
        cluster.network.groups = None
        await cluster.wait_height(2, timeout_s=60)
        nursery.cancel_scope.cancel()


async def test_one_crashed_validator_of_four_does_not_stop_the_chain(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = SimCluster(nursery, tmp_path)
        await cluster.start()
        down = cluster.nodes[3]
        down.crash()
        live = cluster.nodes[:3]
        for height in range(1, 6):
            cluster.add_tx()
            await cluster.wait_height(height, live, timeout_s=60)
        assert down.app.height == 0
        await cluster.start([down])
        await cluster.wait_height(5, [down], timeout_s=60)
        assert down.disk.hashes == live[0].disk.hashes, "the restarted node must sync the chain"
        cluster.add_tx()
        await cluster.wait_height(6, timeout_s=60)
        nursery.cancel_scope.cancel()


async def test_equivocation_reaches_the_app_as_evidence(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = SimCluster(nursery, tmp_path)
        await cluster.start()
        target = cluster.nodes[0]
        assert target.driver is not None
        liar = cluster.keys[2]
        inbox = cluster.network.inboxes[target.peer_id]
        for block_hash in (digest(b"x"), digest(b"y")):
            vote = sign_message(Vote(VoteType.PREVOTE, 1, 0, block_hash), liar, CHAIN)
            inbox.send_nowait((PeerId("v2"), envelope(vote)))
        with trio.fail_after(10):
            while not target.driver.pending_evidence():  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert target.driver.status().pending_evidence == 1
        (evidence,) = target.driver.take_evidence()
        assert evidence.vote_a.signer == evidence.vote_b.signer == liar.address
        assert {evidence.vote_a.block_hash, evidence.vote_b.block_hash} == {
            digest(b"x"),
            digest(b"y"),
        }
        assert target.driver.pending_evidence() == (), "take_evidence hands over and forgets"
        assert target.driver.stats.bad_by_peer == {}, "equivocation is evidence, not bad input"
        nursery.cancel_scope.cancel()


def test_a_validator_needs_a_wal(tmp_path: Path) -> None:
    keys, genesis = make_genesis(4)
    with pytest.raises(ConfigError, match="wal_path"):
        ConsensusDriver(
            genesis=genesis,
            config=ConsensusConfig.for_tests(),
            app=SimApp("v0", SimDisk(), ValidatorSet(genesis.validators), genesis.chain_id),
            transport=SimTransport(SimNetwork(random.Random(0)), PeerId("v0")),
            key=keys[0],
        )
