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


def fee_genesis(fee_min: int) -> ledger.Genesis:
    return dataclasses.replace(GENESIS, params=ledger.ChainParams(fee_min=fee_min))


def transfer(key: ledger.SigningKey, nonce: int, fee: int, amount: int = 1) -> ledger.Transfer:
    return factory.transfer(key, nonce, PROPOSER.address, amount, fee=fee)


def test_fee_below_the_minimum_and_unfunded_senders_are_refused_with_the_reason() -> None:
    genesis = fee_genesis(5)
    pool = ledger.Mempool(genesis.initial_state())
    with pytest.raises(ledger.MempoolRejected, match="below the minimum 5") as info:
        pool.add(transfer(ALICE, 0, fee=4))
    assert info.value.reason == "fee_too_low"
    stranger = factory.key_for(99, "mempool")
    zero = factory.transfer(stranger, 0, ALICE.address, 0, fee=5)
    assert rejected(pool, zero) == "unfunded", "a fresh unfunded key cannot pay a fee"
    pool.add(transfer(ALICE, 0, fee=5))
    assert pool.statistics().rejected == {"fee_too_low": 1, "unfunded": 1}


def test_a_committed_hash_is_never_admitted_again() -> None:
    committed: set[bytes] = set()
    pool = ledger.Mempool(GENESIS.initial_state(), committed=committed.__contains__)
    tx = transfer(ALICE, 0, fee=1)
    committed.add(ledger.tx_hash(tx))
    assert rejected(pool, tx) == "committed"


def test_each_sender_is_capped() -> None:
    pool = ledger.Mempool(GENESIS.initial_state(), sender_max=3)
    for nonce in range(3):
        pool.add(transfer(ALICE, nonce, fee=1))
    assert rejected(pool, transfer(ALICE, 3, fee=1)) == "sender_full"
    pool.add(transfer(BOB, 0, fee=1))


def test_reap_takes_the_highest_fees_first_each_sender_in_nonce_order() -> None:
    pool = ledger.Mempool(GENESIS.initial_state())
    pool.add(transfer(ALICE, 0, fee=1))
    pool.add(transfer(ALICE, 1, fee=50))
    pool.add(transfer(BOB, 0, fee=10))
    pool.add(transfer(CAROL, 0, fee=20))
    order = [(tx.signer, tx.nonce) for tx in pool.reap(100, 1 << 20)]
    assert order == [
        (CAROL.address, 0),
        (BOB.address, 0),
        (ALICE.address, 0),
        (ALICE.address, 1),
    ], order
    assert [tx.signer for tx in pool.reap(1, 1 << 20)] == [CAROL.address]


def test_a_full_pool_evicts_the_lowest_fee_tail_for_a_higher_fee_and_says_so() -> None:
    pool = ledger.Mempool(GENESIS.initial_state(), transactions_max=3)
    low_head = transfer(ALICE, 0, fee=1)
    low_tail = transfer(ALICE, 1, fee=3)
    mid = transfer(BOB, 0, fee=2)
    for tx in (low_head, low_tail, mid):
        pool.add(tx)
    with pytest.raises(ledger.MempoolRejected, match="must exceed 2") as info:
        pool.add(transfer(CAROL, 0, fee=2))
    assert info.value.reason == "full", "an equal fee evicts nothing"
    # Alice's nonce 0 pays least but ends no chain: evicting it would strand nonce 1.
    pool.add(transfer(CAROL, 0, fee=4))
    assert ledger.tx_hash(mid) not in pool
    assert pool.dropped(ledger.tx_hash(mid)) == "evicted by a higher fee (4)"
    pool.add(transfer(PROPOSER, 0, fee=5))
    assert ledger.tx_hash(low_tail) not in pool, "then Alice's tail (fee 3)"
    assert ledger.tx_hash(low_head) in pool
    assert pool.statistics().evicted == 2
    assert pool.next_nonce(ALICE.address) == 1, "the evicted nonce is free again"
    pool.add(low_tail_again := transfer(ALICE, 1, fee=9))
    assert pool.dropped(ledger.tx_hash(low_tail_again)) is None
    assert len(pool) == 3


def test_local_transactions_are_never_evicted() -> None:
    pool = ledger.Mempool(GENESIS.initial_state(), transactions_max=2)
    pool.add(transfer(ALICE, 0, fee=1), local=True)
    pool.add(transfer(BOB, 0, fee=1))
    pool.add(transfer(CAROL, 0, fee=2), local=True)
    assert pool.statistics().local == 2
    assert rejected(pool, transfer(PROPOSER, 0, fee=100)) == "full"
    assert pool.statistics().evicted == 1


def test_update_remembers_why_it_dropped_a_pending_transaction() -> None:
    state = GENESIS.initial_state()
    pool = ledger.Mempool(state)
    elsewhere = factory.transfer(BOB, 0, CAROL.address, 990)
    mine = factory.transfer(BOB, 0, CAROL.address, 5)
    after = factory.transfer(BOB, 1, CAROL.address, 20)
    pool.add(mine)
    pool.add(after)
    state, block, _ = factory.commit_next(None, state, [elsewhere], PROPOSER.address)
    pool.update(block, state)
    assert len(pool) == 0
    replaced = pool.dropped(ledger.tx_hash(mine))
    assert replaced is not None and replaced.startswith("replaced"), replaced
    invalid = pool.dropped(ledger.tx_hash(after))
    assert invalid is not None and invalid.startswith("no longer valid"), invalid
    assert pool.statistics().dropped_invalid == 2
