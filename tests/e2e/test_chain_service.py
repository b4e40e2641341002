"""The chain service in one process (one validator, a real mesh and LevelDB): its read API and
its bounded commit-event channel."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio

import consensus
import ledger
from ledger import testing as lt
from node import _chain
from node._chain import ChainService
from node._tx_journal import TxJournal
from p2p import GossipMessage, Mesh, P2PConfig, PeerId, Verdict

chain_wait_s = 30.0


async def test_read_api_and_commit_events(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_chain, "commit_events_buffered_max", 1)
    alice, bob = lt.key_for(1), lt.key_for(2)
    genesis = lt.funded_genesis([alice, bob], 1_000_000)
    mesh = Mesh(alice.seed, genesis.chain_id, P2PConfig.for_tests(dht=False))
    chain = ChainService(
        genesis=genesis,
        data_dir=tmp_path,
        key=alice,
        mesh=mesh,
        config=consensus.ConsensusConfig.for_tests(),
    )
    with trio.fail_after(chain_wait_s):
        async with trio.open_nursery() as nursery:
            await nursery.start(mesh.run)
            await nursery.start(chain.run)
            assert chain.ready
            assert chain.head() == (0, genesis.genesis_time_ms)
            assert chain.head_record() is None
            events = chain.subscribe_commits()
            laggard = chain.subscribe_commits()  # never read: must lose events, not stall
            gone = chain.subscribe_commits()
            await gone.aclose()

            tx = lt.transfer(bob, chain.next_nonce(bob.address), alice.address, 5, fee=1)
            txh = await chain.submit(tx)
            assert chain.tx_status(txh).state == "pending"
            assert chain.next_nonce(bob.address) == 1, "a pending tx counts toward next_nonce"
            event = await events.receive()
            assert event.height == 1
            assert [r.tx_hash for r in event.tx_results] == [txh]
            assert event.block_hash == event.block.hash()
            status = chain.tx_status(txh)
            assert (status.state, status.height, status.ok) == ("committed", 1, True), status
            assert chain.head() == (1, event.time_ms)
            head = chain.head_record()
            assert head is not None and head.block_hash == event.block_hash
            assert chain.account(bob.address).nonce == 1
            assert chain.block(1) == event.block
            assert chain.block_commit(1) is not None
            assert chain.tx_status(b"\0" * 32).state == "unknown"

            tx2 = lt.transfer(bob, chain.next_nonce(bob.address), alice.address, 5, fee=1)
            await chain.submit(tx2)
            second = await events.receive()
            assert second.height == 2
            assert chain.commit_events_dropped == 1, "the laggard's second event is dropped"
            assert laggard.receive_nowait().height == 1
            nursery.cancel_scope.cancel()


def start_chain(
    genesis: ledger.Genesis, key: ledger.SigningKey, data_dir: Path
) -> tuple[Mesh, ChainService]:
    mesh = Mesh(key.seed, genesis.chain_id, P2PConfig.for_tests(dht=False))
    chain = ChainService(
        genesis=genesis,
        data_dir=data_dir,
        key=key,
        mesh=mesh,
        config=consensus.ConsensusConfig.for_tests(),
    )
    return mesh, chain


async def test_acknowledged_transactions_survive_a_restart(tmp_path: Path) -> None:
    alice, bob = lt.key_for(1), lt.key_for(2)
    # Two validators, only one running: nothing commits, so the transactions stay pending.
    genesis = dataclasses.replace(
        lt.funded_genesis([alice, bob], 1_000_000),
        validators=(ledger.Validator(alice.address, 1), ledger.Validator(bob.address, 1)),
    )
    sent = []
    with trio.fail_after(chain_wait_s):
        mesh, chain = start_chain(genesis, alice, tmp_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(mesh.run)
            await nursery.start(chain.run)
            for _ in range(3):
                tx = lt.transfer(bob, chain.next_nonce(bob.address), alice.address, 5, fee=1)
                sent.append(await chain.submit(tx))
            nursery.cancel_scope.cancel()
        mesh, chain = start_chain(genesis, alice, tmp_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(mesh.run)
            await nursery.start(chain.run)
            assert chain.journal_restored == 3
            assert [chain.tx_status(h).state for h in sent] == ["pending"] * 3
            assert chain.next_nonce(bob.address) == 3, "restored transactions hold their nonces"
            nursery.cancel_scope.cancel()


def test_the_journal_cuts_a_torn_tail(tmp_path: Path) -> None:
    alice = lt.key_for(1)
    journal = TxJournal(tmp_path / "j")
    txs = [lt.transfer(alice, n, alice.address, 1, fee=1) for n in range(3)]
    journal.append(txs[:2])
    journal.append(txs[2:])
    size = journal.path.stat().st_size
    with journal.path.open("ab") as f:
        f.write(b"\x00\x00\x01\x00torn")
    assert TxJournal(journal.path).load() == txs
    assert journal.path.stat().st_size == size, "the torn record is cut off"
    data = bytearray(journal.path.read_bytes())
    data[-1] ^= 0xFF  # corrupt the last record
    journal.path.write_bytes(bytes(data))
    assert TxJournal(journal.path).load() == txs[:2]
    journal.rewrite(txs[1:2])
    assert TxJournal(journal.path).load() == txs[1:2]


def gossip(type_tag: str, payload: bytes, peer: str = "12D3KooWPeer") -> GossipMessage:
    return GossipMessage("t", b"", PeerId(peer), type_tag, payload, 0, b"")


async def test_gossip_validators_reject_junk_and_bound_body_fetches(tmp_path: Path) -> None:
    alice, bob, mallory = lt.key_for(1), lt.key_for(2), lt.key_for(3)
    genesis = dataclasses.replace(
        lt.funded_genesis([alice, bob], 1_000_000),
        validators=(ledger.Validator(alice.address, 1), ledger.Validator(bob.address, 1)),
        params=ledger.ChainParams(fee_min=2),
    )
    with trio.fail_after(chain_wait_s):
        mesh, chain = start_chain(genesis, alice, tmp_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(mesh.run)
            await nursery.start(chain.run)

            def txs(*batch: ledger.Transaction) -> Verdict:
                payload = ledger.encode(_chain.TxBatch(tuple(batch)))
                return chain._validate_txs(gossip(_chain.TXS_TYPE_TAG, payload))

            good = lt.transfer(bob, 0, alice.address, 1, fee=2)
            assert txs(good) == Verdict.ACCEPT
            assert chain.tx_status(ledger.tx_hash(good)).state == "pending"
            assert txs(good) == Verdict.ACCEPT, "a duplicate is no fault"
            assert txs(lt.transfer(bob, 1, alice.address, 1, fee=1)) == Verdict.REJECT
            forged = dataclasses.replace(lt.transfer(bob, 1, alice.address, 1, fee=2), amount=9)
            assert txs(forged) == Verdict.REJECT, "a bad signature"
            unfunded = lt.transfer(mallory, 0, alice.address, 0, fee=2)
            assert txs(unfunded) == Verdict.ACCEPT, "unfunded here may be funded elsewhere"
            assert chain.tx_status(ledger.tx_hash(unfunded)).state == "unknown"
            junk = chain._validate_txs(gossip(_chain.TXS_TYPE_TAG, b"\x93junk"))
            assert junk == Verdict.REJECT
            assert chain.gossip_rejected == 3

            def cons(data: bytes, tag: str = _chain.CONSENSUS_TYPE_TAG) -> Verdict:
                return chain._validate_consensus(gossip(tag, data))

            vote = consensus.Vote(consensus.VoteType.PREVOTE, 1, 0, b"\x01" * 32)
            envelope = consensus.Envelope(
                consensus.MessageKind.VOTE,
                ledger.encode(consensus.sign_message(vote, bob, genesis.chain_id)),
            )
            assert cons(ledger.encode(envelope)) == Verdict.ACCEPT
            outsider = consensus.Envelope(
                consensus.MessageKind.VOTE,
                ledger.encode(consensus.sign_message(vote, mallory, genesis.chain_id)),
            )
            assert cons(ledger.encode(outsider)) == Verdict.REJECT, "not a validator"
            assert cons(b"\x00garbage") == Verdict.REJECT
            ref = _chain.BodyRef(b"\x02" * 32, _chain.body_bytes_max + 1)
            assert cons(ledger.encode(ref), _chain.CONSENSUS_REF_TYPE_TAG) == Verdict.REJECT

            for i in range(_chain.body_fetches_per_peer_max + 2):
                ref = _chain.BodyRef(bytes([i]) * 32, 1000)
                chain.transport.deliver_ref(
                    gossip(_chain.CONSENSUS_REF_TYPE_TAG, ledger.encode(ref))
                )
            assert chain.transport.fetches_dropped == 2, "one peer's waiting fetches are capped"
            nursery.cancel_scope.cancel()


def test_block_proposer_reads_the_header_only_and_refuses_junk() -> None:
    alice = lt.key_for(1)
    state = lt.funded_genesis([alice], 1_000).initial_state()
    _, block, _ = lt.commit_next(
        None, state, [lt.transfer(alice, 0, alice.address, 1, fee=1)], alice.address
    )
    app = _chain.LedgerApp.__new__(_chain.LedgerApp)  # block_proposer needs no state
    assert app.block_proposer(ledger.encode(block)) == alice.address
    for junk in (
        b"",
        b"\xc1",
        b"\x93\x01\x02\x03",
        ledger.encode(block)[:20],
        b"\x98" + b"\xc0" * 8,
    ):
        with pytest.raises(consensus.InvalidBlock):
            app.block_proposer(junk)
