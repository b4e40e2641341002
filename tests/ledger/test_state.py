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
    assert new_state.total_supply() == state.total_supply() == state.supply, "supply changed"
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
    if not results[0].ok:
        raise ledger.InvalidTransaction(results[0].error)
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
    receipt = factory.receipt(PROVIDER, 0, JOB, requester=REQUESTER, wall_ms=90_500, fee=2)
    state, results = run(state, receipt)
    assert results[0].ok, results[0].error
    cost = 10 * 2 * 90_500 // 1000  # 1810
    assert state.account(REQUESTER.address) == ledger.Account(100_000 - cost, 0, 1), "refund"
    assert state.account(PROVIDER.address) == ledger.Account(
        100_000 + cost - 2, 0, 1, cost, completed=1
    ), "paid, and the settle counted"
    trade = state.trades[JOB]
    assert (trade.status, trade.paid) == (ledger.TradeStatus.SETTLED, cost), trade
    state, results = run(state, factory.receipt(PROVIDER, 1, JOB, requester=REQUESTER, wall_ms=1))
    assert not results[0].ok and "already settled" in results[0].error, results[0]


def test_only_the_provider_can_settle_and_only_before_the_deadline() -> None:
    state = open_trade(GENESIS.initial_state(), deadline_in_ms=5_000)
    state, results = run(state, factory.receipt(THIRD, 0, JOB, requester=REQUESTER, wall_ms=1))
    assert not results[0].ok and "provider" in results[0].error, results[0]
    state, results = run(
        state, factory.receipt(PROVIDER, 0, JOB, requester=REQUESTER, wall_ms=1), interval_ms=9_000
    )
    assert not results[0].ok and "deadline passed" in results[0].error, results[0]


def test_refund_only_after_the_deadline_by_anyone() -> None:
    state = open_trade(GENESIS.initial_state(), deadline_in_ms=5_000)
    state, results = run(state, factory.refund(THIRD, 0, JOB))
    assert not results[0].ok and "after the trade's deadline" in results[0].error, results[0]
    state, results = run(state, factory.refund(THIRD, 1, JOB, fee=4), interval_ms=5_000)
    assert results[0].ok, results[0].error
    assert state.account(REQUESTER.address) == ledger.Account(100_000, 0, 1), "full refund"
    assert state.account(THIRD.address) == ledger.Account(99_996, 0, 2), "refunder pays fee"


def test_cancel_by_the_requester_pays_for_the_time_held() -> None:
    state = open_trade(GENESIS.initial_state())
    state, results = run(state, factory.cancel(THIRD, 0, JOB))
    assert not results[0].ok and "only the requester or provider" in results[0].error, results
    state, results = run(state, factory.cancel(REQUESTER, 1, JOB), interval_ms=1_500)
    assert results[0].ok, results[0].error
    # Open for 2.5 s (two blocks): 2 GPUs x 10 per GPU-second x 2.5 s = 50.
    assert state.account(REQUESTER.address) == ledger.Account(99_950, 0, 2), "pro rata refund"
    assert state.account(PROVIDER.address) == ledger.Account(100_050, 0, 0, 50), "paid so far"
    trade = state.trades[JOB]
    assert (trade.status, trade.paid) == (ledger.TradeStatus.CANCELLED, 50), trade
    state, results = run(state, factory.receipt(PROVIDER, 0, JOB, requester=REQUESTER, wall_ms=1))
    assert not results[0].ok and "cancelled" in results[0].error, results[0]


def test_cancel_by_the_provider_refunds_everything_and_counts_a_failure() -> None:
    state = open_trade(GENESIS.initial_state())
    state, results = run(state, factory.cancel(PROVIDER, 0, JOB), interval_ms=30_000)
    assert results[0].ok, results[0].error
    assert state.account(REQUESTER.address) == ledger.Account(100_000, 0, 1), "full refund"
    assert state.account(PROVIDER.address) == ledger.Account(100_000, 0, 1, failed=1), "failed"


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


# -- bonds, slashing, minimum charges ----------------------------------------------------------

BOND_PARAMS = ledger.ChainParams(
    fee_min=1,
    provider_bond_min=1_000,
    unbonding_delay_ms=100_000,
    charge_min=7,
    slash_amount=800,
    evidence_window_ms=20_000,
)


def bonded_genesis(provider_bond: int = 1_000) -> ledger.LedgerState:
    genesis = ledger.Genesis(
        chain_id=factory.test_chain_id,
        genesis_time_ms=factory.test_genesis_time_ms,
        accounts=(
            ledger.GenesisAccount(REQUESTER.address, 100_000),
            ledger.GenesisAccount(PROVIDER.address, 100_000, provider_bond),
            ledger.GenesisAccount(THIRD.address, 100_000),
        ),
        validators=(ledger.Validator(PROPOSER.address, 1),),
        params=BOND_PARAMS,
    )
    state = genesis.initial_state()
    assert state.supply == state.total_supply() == 300_000 + provider_bond, "bonds are supply"
    return state


def test_an_agreement_needs_a_bonded_provider_and_a_deadline_within_the_bond() -> None:
    state = bonded_genesis(provider_bond=999)
    with pytest.raises(ledger.InvalidTransaction, match="bond 999 is below the minimum 1000"):
        open_trade(state, fee=1)
    state, results = run(state, factory.stake(PROVIDER, 0, 1, fee=1))
    assert results[0].ok, results[0].error
    assert state.account(PROVIDER.address).bonded == 1_000, "staked"
    # 100 s unbonding - 20 s evidence window: a deadline at most 80 s past the block's time
    # (the block comes 1 s after the state).
    with pytest.raises(ledger.InvalidTransaction, match="more than 80000 ms ahead"):
        open_trade(state, deadline_in_ms=81_001, fee=1)
    state = open_trade(state, deadline_in_ms=81_000, fee=1)
    assert state.trades[JOB].opened_time_ms == state.time_ms, "the trade records its opening"


def test_unbonding_waits_the_delay_and_stays_slashable() -> None:
    state = bonded_genesis()
    state, results = run(state, factory.unbond(PROVIDER, 0, 0, fee=1))
    assert not results[0].ok and "matured" in results[0].error, "nothing to claim"
    state, results = run(state, factory.unbond(PROVIDER, 1, 1_001, fee=1))
    assert not results[0].ok and "bond 1000 < unbond 1001" in results[0].error, results
    state, results = run(state, factory.unbond(PROVIDER, 2, 600, fee=1))
    assert results[0].ok, results[0].error
    provider = state.account(PROVIDER.address)
    assert (provider.bonded, provider.unbonding) == (400, 600), provider
    assert provider.unbond_release_ms == state.time_ms + 100_000, provider
    state, results = run(state, factory.unbond(PROVIDER, 3, 0, fee=1), interval_ms=99_999)
    assert not results[0].ok and "matured" in results[0].error, "claimed early"
    state, results = run(state, factory.unbond(PROVIDER, 4, 0, fee=1), interval_ms=1)
    assert results[0].ok, results[0].error
    provider = state.account(PROVIDER.address)
    assert (provider.bonded, provider.unbonding, provider.balance) == (400, 0, 100_595), provider


def test_a_refund_after_the_deadline_slashes_the_abandoned_award() -> None:
    state = open_trade(bonded_genesis(), deadline_in_ms=5_000, fee=1)
    # The provider starts unbonding all of it: the stake still answers for the trade.
    state, results = run(state, factory.unbond(PROVIDER, 0, 900, fee=1))
    assert results[0].ok, results[0].error
    state, results = run(state, factory.refund(THIRD, 0, JOB, fee=1), interval_ms=5_000)
    assert results[0].ok, results[0].error
    provider = state.account(PROVIDER.address)
    # 800 taken: the 100 still bonded, then 700 of the 900 unbonding.
    assert (provider.bonded, provider.unbonding) == (0, 200), provider
    assert (provider.failed, provider.slashed) == (1, 1), provider
    requester = state.account(REQUESTER.address)
    assert (requester.balance, requester.locked) == (100_000 - 1 + 400, 0), "refund + half"
    assert state.account(THIRD.address).balance == 100_000 - 1 + 400, "the reporter's half"
    trade = state.trades[JOB]
    assert (trade.status, trade.slashed) == (ledger.TradeStatus.REFUNDED, True), trade


@pytest.mark.parametrize("who", ["requester", "provider"])
def test_a_slash_reported_by_a_party_goes_to_the_requester(who: str) -> None:
    state = open_trade(bonded_genesis(), deadline_in_ms=5_000, fee=1)
    sender = REQUESTER if who == "requester" else PROVIDER
    nonce = state.account(sender.address).nonce
    state, results = run(state, factory.refund(sender, nonce, JOB, fee=1), interval_ms=6_000)
    assert results[0].ok, results[0].error
    requester = state.account(REQUESTER.address)
    paid_fees = 2 if who == "requester" else 1
    assert requester.balance == 100_000 - paid_fees + 800, "the whole slash to the harmed side"
    assert state.account(PROVIDER.address).bonded == 200, "slashed"


def test_minimum_charge_on_receipt_and_requester_cancel() -> None:
    state = open_trade(bonded_genesis(), fee=1)
    state, results = run(
        state, factory.receipt(PROVIDER, 0, JOB, requester=REQUESTER, wall_ms=0, fee=1)
    )
    assert results[0].ok, results[0].error
    assert state.trades[JOB].paid == 7, "a settle pays at least charge_min"
    other = factory.job_id_for("other")
    agreement = factory.agreement(
        REQUESTER,
        PROVIDER,
        state.account(REQUESTER.address).nonce,
        other,
        price_per_gpu_second=0,
        gpus=1,
        max_cost=5,
        deadline_ms=state.time_ms + 10_000,
        fee=1,
    )
    state, results = run(state, agreement)
    assert results[0].ok, results[0].error
    cancel = factory.cancel(REQUESTER, state.account(REQUESTER.address).nonce, other, fee=1)
    state, results = run(state, cancel)
    assert results[0].ok, results[0].error
    assert state.trades[other].paid == 5, "the minimum charge is capped by max_cost"


def test_closed_trades_stay_through_the_evidence_window() -> None:
    state = open_trade(bonded_genesis(), deadline_in_ms=5_000, fee=1)
    state, _ = run(state, factory.cancel(PROVIDER, 0, JOB, fee=1))
    state, _ = run(
        state, factory.transfer(THIRD, 0, PROPOSER.address, 1, fee=1), interval_ms=23_000
    )
    assert JOB in state.trades, "kept until deadline + evidence window"
    state, _ = run(state, factory.transfer(THIRD, 1, PROPOSER.address, 1, fee=1), interval_ms=2_000)
    assert JOB not in state.trades, "dropped after the evidence window"
