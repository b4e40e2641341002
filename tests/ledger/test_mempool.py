"""The mempool: reasons for every refusal, nonce order, bounds, eviction after a block."""

from __future__ import annotations

import dataclasses

import pytest

import ledger
from ledger import testing as factory

ALICE, BOB, CAROL, PROPOSER = (factory.key_for(i, "mempool") for i in range(4))
GENESIS = factory.funded_genesis([ALICE, BOB, CAROL, PROPOSER], 1_000)


def rejected(pool: ledger.Mempool, tx: ledger.Transaction) -> str:
    with pytest.raises(ledger.MempoolRejected) as info:
        pool.add(tx)
    return info.value.reason


def test_refusals_carry_a_reason_and_leave_the_pool_unchanged() -> None:
    state = GENESIS.initial_state()
    pool = ledger.Mempool(state)
    good = factory.transfer(ALICE, 0, BOB.address, 10)
    pool.add(good)
    assert rejected(pool, good) == "duplicate"
    assert rejected(pool, factory.transfer(ALICE, 0, BOB.address, 11)) == "nonce_taken"
    assert rejected(pool, factory.transfer(ALICE, 500, BOB.address, 1)) == "nonce_gap"
    forged = dataclasses.replace(factory.transfer(BOB, 0, CAROL.address, 1), amount=2)
    assert rejected(pool, forged) == "invalid"
    other_chain = factory.transfer(BOB, 0, CAROL.address, 1, chain_id="elsewhere")
    assert rejected(pool, other_chain) == "invalid"
    assert rejected(pool, factory.transfer(BOB, 0, CAROL.address, 5_000)) == "rejected"
    assert rejected(pool, factory.refund(BOB, 0, factory.job_id_for(1))) == "rejected"
    assert len(pool) == 1, "only the good transaction is pending"


def test_reap_orders_each_sender_by_nonce_and_stops_at_overspend() -> None:
    pool = ledger.Mempool(GENESIS.initial_state())
    # Added out of order; the third overspends once the first two applied.
    pool.add(factory.transfer(ALICE, 1, BOB.address, 400))
    pool.add(factory.transfer(ALICE, 0, BOB.address, 400))
    pool.add(factory.transfer(ALICE, 2, BOB.address, 400))
    pool.add(factory.transfer(CAROL, 0, BOB.address, 1))
    reaped = pool.reap(100, 1 << 20)
    nonces = [(tx.signer, tx.nonce) for tx in reaped]
    assert nonces == [(ALICE.address, 0), (ALICE.address, 1), (CAROL.address, 0)], nonces
    assert len(pool.reap(1, 1 << 20)) == 1, "max_txs is respected"
    assert pool.reap(100, 10) == [], "max_bytes is respected"


def test_update_evicts_committed_and_stale_transactions() -> None:
    state = GENESIS.initial_state()
    pool = ledger.Mempool(state)
    mine = factory.transfer(ALICE, 0, BOB.address, 1)
    pool.add(mine)
    pool.add(factory.transfer(ALICE, 1, BOB.address, 1))
    # Bob's transfer is committed through another node's pool, then Bob's own stale copy goes.
    bobs = factory.transfer(BOB, 0, CAROL.address, 990)
    pool.add(factory.transfer(BOB, 1, CAROL.address, 20))
    state, block, _ = factory.commit_next(None, state, [mine, bobs], PROPOSER.address)
    pool.update(block, state)
    pending = sorted((tx.signer, tx.nonce) for tx in pool)
    assert pending == [(ALICE.address, 1)], f"Bob's nonce-1 transfer now overspends: {pending}"
    assert rejected(pool, mine) == "stale_nonce"


def test_the_pool_is_bounded() -> None:
    pool = ledger.Mempool(GENESIS.initial_state(), transactions_max=2)
    pool.add(factory.transfer(ALICE, 0, BOB.address, 1))
    pool.add(factory.transfer(ALICE, 1, BOB.address, 1))
    assert rejected(pool, factory.transfer(BOB, 0, ALICE.address, 1)) == "full"
    assert pool.statistics().transactions == 2, pool.statistics()
