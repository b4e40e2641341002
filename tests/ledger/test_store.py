"""One conformance suite for the store, run against LevelDB and the in-memory twin."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import plyvel
import pytest

import ledger
from ledger import testing as factory

REQUESTER, PROVIDER, PROPOSER = (factory.key_for(i, "store") for i in range(3))
GENESIS = factory.funded_genesis([REQUESTER, PROVIDER, PROPOSER], 50_000)
JOB = factory.job_id_for("store")


@pytest.fixture(params=["leveldb", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ledger.Store]:
    opened: ledger.Store = (
        ledger.LevelDBStore(tmp_path / "ledger")
        if request.param == "leveldb"
        else ledger.MemoryStore()
    )
    yield opened
    opened.close()


def commit(
    store: ledger.Store, state: ledger.LedgerState, *txs: ledger.Transaction
) -> tuple[ledger.LedgerState, ledger.Block, ledger.BlockResults]:
    block = factory.next_block(state, txs, PROPOSER.address)
    new_state, results = ledger.apply_block(state, block)
    certificate = ledger.Commit(
        block.height, 0, block.hash(), (ledger.CommitSig(PROPOSER.address, b"s" * 64),)
    )
    store.commit_block(block, certificate, new_state, results)
    return new_state, block, results


def test_empty_store_reads_as_genesis(store: ledger.Store) -> None:
    assert store.head() is None, "an empty store has no head"
    assert store.block(1) is None and store.block_by_hash(b"\0" * 32) is None, "no blocks"
    assert store.account(REQUESTER.address) == ledger.Account(), "unknown account is empty"
    loaded = store.load_state(GENESIS)
    assert loaded.root == GENESIS.initial_state().root, "empty store should load genesis"


def test_committed_blocks_are_readable_by_every_key(store: ledger.Store) -> None:
    state = GENESIS.initial_state()
    agreement = factory.agreement(
        REQUESTER,
        PROVIDER,
        0,
        JOB,
        price_per_gpu_second=3,
        gpus=1,
        max_cost=900,
        deadline_ms=state.time_ms + 60_000,
    )
    bad = factory.transfer(REQUESTER, 7, PROVIDER.address, 1)
    state, block1, _ = commit(store, state, agreement, bad)
    receipt = factory.receipt(PROVIDER, 0, JOB, requester=REQUESTER, wall_ms=100_000, fee=1)
    state, block2, _ = commit(store, state, receipt)

    head = store.head()
    assert head == ledger.Head(2, block2.hash(), block2.time_ms, state.root), head
    assert store.block(1) == block1 and store.block(2) == block2, "block by height"
    assert store.block_by_hash(block1.hash()) == block1, "block by hash"
    stored_commit = store.commit(2)
    assert stored_commit is not None and stored_commit.block_hash == block2.hash(), "commit"
    record = store.transaction(ledger.tx_hash(agreement))
    assert record is not None and (record.height, record.index, record.ok) == (1, 0, True)
    assert record.tx == agreement, "the stored transaction is the one committed"
    failed = store.transaction(ledger.tx_hash(bad))
    assert failed is not None and not failed.ok and "out of order" in failed.error, failed
    stored_receipt = store.receipt(JOB)
    assert stored_receipt is not None and stored_receipt.receipt == receipt, stored_receipt
    trade = store.trade(JOB)
    assert trade is not None and trade.status is ledger.TradeStatus.SETTLED, trade
    assert trade.paid == 300, "3 per GPU-second for 100 s"
    provider = store.account(PROVIDER.address)
    assert provider == ledger.Account(50_000 + 300 - 1, 0, 1, 300, completed=1), provider
    assert store.load_state(GENESIS).root == state.root, "reloaded state differs"


def test_refused_commits_write_nothing(store: ledger.Store) -> None:
    state = GENESIS.initial_state()
    state, block1, results1 = commit(
        store, state, factory.transfer(REQUESTER, 0, PROVIDER.address, 5)
    )
    head = store.head()
    block = factory.next_block(state, [], PROPOSER.address)
    new_state, results = ledger.apply_block(state, block)
    with pytest.raises(ledger.StoreError, match="not the next block"):
        store.commit_block(block1, None, state, results1)
    with pytest.raises(ledger.StoreError, match="not the state after"):
        store.commit_block(block, None, state, results)
    wrong = ledger.Commit(block.height, 0, b"\0" * 32, ())
    with pytest.raises(ledger.StoreError, match="different block"):
        store.commit_block(block, wrong, new_state, results)
    orphan = dataclasses.replace(block, prev_hash=b"\1" * 32)
    with pytest.raises(ledger.StoreError, match="does not extend"):
        store.commit_block(orphan, None, new_state, results)
    assert store.head() == head, "a refused commit moved the head"
    assert store.block(2) is None, "a refused commit wrote a block"


def test_loading_with_another_genesis_is_refused(store: ledger.Store) -> None:
    commit(store, GENESIS.initial_state())
    other = dataclasses.replace(GENESIS, chain_id="other-chain")
    with pytest.raises(ledger.StoreError, match="holds chain"):
        store.load_state(other)


def test_leveldb_store_survives_reopening(tmp_path: Path) -> None:
    store = ledger.LevelDBStore(tmp_path / "db")
    state, block, _ = commit(
        store, GENESIS.initial_state(), factory.transfer(REQUESTER, 0, PROVIDER.address, 5)
    )
    store.close()
    reopened = ledger.LevelDBStore(tmp_path / "db")
    try:
        assert reopened.block(1) == block, "block lost on reopen"
        assert reopened.load_state(GENESIS).root == state.root, "state lost on reopen"
    finally:
        reopened.close()


def test_corrupt_bytes_in_the_store_are_a_clear_error(tmp_path: Path) -> None:
    store = ledger.LevelDBStore(tmp_path / "db")
    commit(store, GENESIS.initial_state())
    store.close()
    raw = plyvel.DB(str(tmp_path / "db"))
    raw.put(b"H", b"\xc1garbage")  # what a bad disk or a foreign writer could leave
    raw.close()
    reopened = ledger.LevelDBStore(tmp_path / "db")
    try:
        with pytest.raises(ledger.StoreError, match="corrupt store"):
            reopened.head()
        with pytest.raises(ledger.StoreError, match="corrupt store"):
            reopened.load_state(GENESIS)
    finally:
        reopened.close()


def test_invalid_transactions_in_a_committed_block_write_only_their_charge(
    store: ledger.Store,
) -> None:
    state = GENESIS.initial_state()
    negative = ledger.sign_object(
        ledger.Transfer(nonce=0, fee=0, recipient=PROVIDER.address, amount=-5),
        REQUESTER,
        GENESIS.chain_id,
    )
    forged = dataclasses.replace(factory.transfer(REQUESTER, 0, PROVIDER.address, 5), amount=50)
    overspend = factory.transfer(REQUESTER, 0, PROVIDER.address, 50_001)
    wrong_chain = factory.transfer(REQUESTER, 0, PROVIDER.address, 5, chain_id="elsewhere")
    bad = [negative, forged, overspend, wrong_chain]
    state, _, results = commit(store, state, *bad)
    errors = [r.error for r in results.tx_results]
    assert not any(r.ok for r in results.tx_results), errors
    assert "outside" in errors[0] and "signature" in errors[1], errors
    assert "balance" in errors[2] and "signature" in errors[3], errors
    # Only the overspend could be included: it used up nonce 0 (with a fee of 0).
    assert store.account(REQUESTER.address) == ledger.Account(50_000, 0, 1), "charge only"
    assert store.account(PROVIDER.address) == ledger.Account(50_000), "an invalid tx wrote"
    for tx, error in zip(bad, errors, strict=True):
        record = store.transaction(ledger.tx_hash(tx))
        assert record is not None and record.error == error, "the failure is on record"
