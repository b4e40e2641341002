"""The state transition's rules, one at a time, through real blocks."""

from __future__ import annotations

import dataclasses

import pytest

import ledger
from ledger import testing as factory

REQUESTER, PROVIDER, THIRD, PROPOSER = (factory.key_for(i, "state") for i in range(4))
GENESIS = factory.funded_genesis([REQUESTER, PROVIDER, THIRD, PROPOSER], 100_000)
JOB = factory.job_id_for("state")
SUPPLY = 400_000


def run(
    state: ledger.LedgerState, *txs: ledger.Transaction, interval_ms: int = 1000
) -> tuple[ledger.LedgerState, list[ledger.TxResult]]:
    new_state, _, results = factory.commit_next(
        None, state, txs, PROPOSER.address, interval_ms=interval_ms
    )
    assert new_state.total_supply() == SUPPLY, "supply changed"
    return new_state, list(results.tx_results)


def open_trade(
    state: ledger.LedgerState, *, deadline_in_ms: int = 60_000, fee: int = 0
) -> ledger.LedgerState:
    agreement = factory.agreement(
        REQUESTER,
        PROVIDER,
        state.account(REQUESTER.address).nonce,
        JOB,
        price_per_gpu_second=10,
        gpus=2,
        max_cost=5_000,
        deadline_ms=state.time_ms + deadline_in_ms,
        fee=fee,
    )
    state, results = run(state, agreement)
    assert results[0].ok, results[0].error
    return state


def test_transfer_moves_money_and_pays_the_fee_to_the_proposer() -> None:
    state, results = run(
        GENESIS.initial_state(), factory.transfer(REQUESTER, 0, THIRD.address, 700, fee=3)
    )
    assert results[0].ok, results[0].error
    assert state.account(REQUESTER.address) == ledger.Account(99_297, 0, 1), "sender"
    assert state.account(THIRD.address).balance == 100_700, "recipient"
    assert state.account(PROPOSER.address).balance == 100_003, "proposer earns the fee"


def test_replayed_and_out_of_order_nonces_are_rejected() -> None:
    first = factory.transfer(REQUESTER, 0, THIRD.address, 1)
    state, results = run(GENESIS.initial_state(), first)
    assert results[0].ok, results[0].error
    state, results = run(state, first, factory.transfer(REQUESTER, 2, THIRD.address, 1))
    assert not results[0].ok and "already used" in results[0].error, results[0]
    assert not results[1].ok and "out of order" in results[1].error, results[1]
    assert state.account(REQUESTER.address).nonce == 1, "a failed tx must not move the nonce"


def test_a_failed_body_pays_its_fee_and_uses_up_its_nonce() -> None:
    genesis = GENESIS.initial_state()
    overspend = factory.transfer(REQUESTER, 0, THIRD.address, 100_000, fee=1)
    state, results = run(genesis, overspend)
    assert not results[0].ok and "balance" in results[0].error, results[0]
    assert state.account(REQUESTER.address) == ledger.Account(99_999, 0, 1), "fee and nonce"
    assert state.account(THIRD.address) == genesis.account(THIRD.address), "half applied"
    assert state.account(PROPOSER.address).balance == 100_001, "the proposer earns the fee"
    state, results = run(state, overspend)
    assert not results[0].ok and "already used" in results[0].error, "a failed tx replayed"
    with pytest.raises(ledger.InvalidTransaction, match="already used"):
        ledger.check_transaction(state, overspend, body=False)


def test_a_transaction_that_cannot_pay_its_fee_is_skipped_and_refused() -> None:
    params = ledger.ChainParams(fee_min=2)
    broke = factory.key_for(9, "state")
    genesis = factory.funded_genesis([REQUESTER, THIRD, broke], 100, params=params)
    state = genesis.initial_state()
    cheap = factory.transfer(REQUESTER, 0, THIRD.address, 1, fee=1)
    unpaid = factory.transfer(broke, 0, THIRD.address, 0, fee=101)
    failing = factory.transfer(THIRD, 0, REQUESTER.address, 100, fee=2)
    for tx, message in [(cheap, "below the minimum fee 2"), (unpaid, "cannot pay the fee")]:
        with pytest.raises(ledger.InvalidTransaction, match=message):
            ledger.check_transaction(state, tx, body=False)
    ledger.check_transaction(state, failing, body=False)  # can be included: it pays its fee
    with pytest.raises(ledger.InvalidTransaction, match="balance 98 < amount 100"):
        ledger.check_transaction(state, failing)
    pool = ledger.Mempool(state)
    for tx in (cheap, unpaid, failing):
        with pytest.raises(ledger.MempoolRejected):
            pool.add(tx)
    new_state, _, results = factory.commit_next(None, state, [cheap, unpaid, failing], b"p" * 32)
    assert [r.ok for r in results.tx_results] == [False, False, False], results
    assert new_state.account(REQUESTER.address) == state.account(REQUESTER.address), "skipped"
    assert new_state.account(broke.address) == state.account(broke.address), "skipped"
    assert new_state.account(THIRD.address) == ledger.Account(98, 0, 1), "charged"
    assert new_state.total_supply() == state.total_supply() == 300, "supply"


def test_agreement_locks_escrow_and_receipt_settles_it() -> None:
    state = open_trade(GENESIS.initial_state())
    assert state.account(REQUESTER.address) == ledger.Account(95_000, 5_000, 1), "escrow"
    assert state.trades[JOB].status is ledger.TradeStatus.OPEN, "trade opened"
    receipt = factory.receipt(PROVIDER, 0, JOB, wall_ms=90_500, fee=2)
    state, results = run(state, receipt)
    assert results[0].ok, results[0].error
    cost = 10 * 2 * 90_500 // 1000  # 1810
    assert state.account(REQUESTER.address) == ledger.Account(100_000 - cost, 0, 1), "refund"
    assert state.account(PROVIDER.address) == ledger.Account(100_000 + cost - 2, 0, 1, cost)
    trade = state.trades[JOB]
    assert (trade.status, trade.paid) == (ledger.TradeStatus.SETTLED, cost), trade
    state, results = run(state, factory.receipt(PROVIDER, 1, JOB, wall_ms=1))
    assert not results[0].ok and "already settled" in results[0].error, results[0]


def test_only_the_provider_can_settle_and_only_before_the_deadline() -> None:
    state = open_trade(GENESIS.initial_state(), deadline_in_ms=5_000)
    state, results = run(state, factory.receipt(THIRD, 0, JOB, wall_ms=1))
    assert not results[0].ok and "provider" in results[0].error, results[0]
    state, results = run(state, factory.receipt(PROVIDER, 0, JOB, wall_ms=1), interval_ms=9_000)
    assert not results[0].ok and "deadline passed" in results[0].error, results[0]


def test_refund_only_after_the_deadline_by_anyone() -> None:
    state = open_trade(GENESIS.initial_state(), deadline_in_ms=5_000)
    state, results = run(state, factory.refund(THIRD, 0, JOB))
    assert not results[0].ok and "after the trade's deadline" in results[0].error, results[0]
    state, results = run(state, factory.refund(THIRD, 1, JOB, fee=4), interval_ms=5_000)
    assert results[0].ok, results[0].error
    assert state.account(REQUESTER.address) == ledger.Account(100_000, 0, 1), "full refund"
    assert state.account(THIRD.address) == ledger.Account(99_996, 0, 2), "refunder pays fee"


def test_cancel_by_the_requester_before_a_receipt() -> None:
    state = open_trade(GENESIS.initial_state())
    state, results = run(state, factory.cancel(PROVIDER, 0, JOB))
    assert not results[0].ok and "only the requester" in results[0].error, results[0]
    state, results = run(state, factory.cancel(REQUESTER, 1, JOB))
    assert results[0].ok, results[0].error
    assert state.account(REQUESTER.address) == ledger.Account(100_000, 0, 2), "full refund"
    state, results = run(state, factory.receipt(PROVIDER, 1, JOB, wall_ms=1))
    assert not results[0].ok and "cancelled" in results[0].error, results[0]


def test_a_job_id_stays_taken_until_a_block_passes_the_closed_trades_deadline() -> None:
    state = open_trade(GENESIS.initial_state(), deadline_in_ms=5_000)
    state, _ = run(state, factory.cancel(REQUESTER, 1, JOB))

    def replay(nonce: int) -> ledger.Agreement:
        return factory.agreement(
            REQUESTER,
            PROVIDER,
            nonce,
            JOB,
            price_per_gpu_second=10,
            gpus=2,
            max_cost=5_000,
            deadline_ms=state.time_ms + 60_000,
        )

    state, results = run(state, replay(2))
    assert not results[0].ok and "already has a trade" in results[0].error, results[0]
    state, results = run(state, replay(3), interval_ms=10_000)
    assert results[0].ok, f"job id should be free after the old deadline: {results[0].error}"


def test_blocks_that_do_not_follow_are_refused_whole() -> None:
    state = GENESIS.initial_state()
    block = factory.next_block(state, [factory.transfer(REQUESTER, 0, THIRD.address, 1)], b"p" * 32)
    for bad, message in [
        (dataclasses.replace(block, height=2), "height"),
        (dataclasses.replace(block, prev_hash=b"\0" * 32), "previous hash"),
        (dataclasses.replace(block, time_ms=state.time_ms), "time"),
        (dataclasses.replace(block, chain_id="other"), "chain"),
        (dataclasses.replace(block, state_root=b"\0" * 32), "state root"),
        (dataclasses.replace(block, tx_root=b"\0" * 32), "transaction root"),
        (dataclasses.replace(block, transactions=()), "transaction root"),
    ]:
        with pytest.raises(ledger.InvalidBlock, match=message):
            ledger.apply_block(state, bad)
    assert state.account(REQUESTER.address).nonce == 0, "a refused block changed the state"
    _, results = ledger.apply_block(state, block)
    assert results.tx_results[0].ok, results.tx_results[0].error


def test_state_root_is_recomputable_from_scratch() -> None:
    state = open_trade(GENESIS.initial_state())
    state, _ = run(state, factory.transfer(THIRD, 0, PROPOSER.address, 5))
    rebuilt = ledger.LedgerState(
        chain_id=state.chain_id,
        height=state.height,
        block_hash=state.block_hash,
        time_ms=state.time_ms,
        accounts=dict(state.accounts),
        trades=dict(state.trades),
        validators=state.validators,
        supply=state.supply,
    )
    assert ledger.state_root(rebuilt) == ledger.state_root(state), "incremental root drifted"
    assert ledger.state_root(state) != ledger.state_root(GENESIS.initial_state()), "root stuck"


def test_transactions_the_mempool_verified_skip_the_signature_check() -> None:
    state = GENESIS.initial_state()
    pool = ledger.Mempool(state)
    good = factory.transfer(REQUESTER, 0, THIRD.address, 5)
    pool.add(good)
    forged = dataclasses.replace(factory.transfer(THIRD, 0, REQUESTER.address, 5), amount=6)
    block = factory.next_block(state, [good, forged], PROPOSER.address)
    _, results = ledger.apply_block(state, block, verified=pool)
    ok = [r.ok for r in results.tx_results]
    assert ok == [True, False], f"the pool's tx applies, the forged one still fails: {ok}"
    assert "signature" in results.tx_results[1].error, results.tx_results[1].error
