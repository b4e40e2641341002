"""The chain service in one process (one validator, a real mesh and LevelDB): its read API and
its bounded commit-event channel."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

import consensus
from ledger import testing as lt
from node import _chain
from node._chain import ChainService
from p2p import Mesh, P2PConfig

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
            txh = chain.submit(tx)
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
            chain.submit(tx2)
            second = await events.receive()
            assert second.height == 2
            assert chain.commit_events_dropped == 1, "the laggard's second event is dropped"
            assert laggard.receive_nowait().height == 1
            nursery.cancel_scope.cancel()
