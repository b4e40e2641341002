"""The fair exchange on chain: a settle needs the requester's ack and reveals the key; each
cheat a provider could try is slashed by evidence anyone can submit, an honest provider never,
at most once per trade, and no slash creates or destroys money."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

import ledger
from ledger import testing as factory

REQUESTER, PROVIDER, OTHER_B, OTHER_C, WITNESS, PROPOSER = (
    factory.key_for(i, "fair") for i in range(6)
)
PARAMS = ledger.ChainParams(
    fee_min=1,
    provider_bond_min=1_000,
    unbonding_delay_ms=200_000,
    charge_min=1,
    slash_amount=800,
    evidence_window_ms=50_000,
)
GROUP = hashlib.sha256(b"one logical job").digest()


def genesis() -> ledger.LedgerState:
    keys = (REQUESTER, PROVIDER, OTHER_B, OTHER_C, WITNESS)
    return ledger.Genesis(
        chain_id=factory.test_chain_id,
        genesis_time_ms=factory.test_genesis_time_ms,
        accounts=tuple(ledger.GenesisAccount(k.address, 100_000, 2_000) for k in keys),
        validators=(ledger.Validator(PROPOSER.address, 1),),
        params=PARAMS,
    ).initial_state()


def run(
    state: ledger.LedgerState, *txs: ledger.Transaction, interval_ms: int = 1_000
) -> tuple[ledger.LedgerState, list[ledger.TxResult]]:
    new_state, _, results = factory.commit_next(
        None, state, txs, PROPOSER.address, interval_ms=interval_ms
    )
    assert new_state.total_supply() == state.supply, "a transaction changed the supply"
    return new_state, list(results.tx_results)


def nonce(state: ledger.LedgerState, key: ledger.SigningKey) -> int:
    return state.account(key.address).nonce


def open_trade(
    state: ledger.LedgerState, provider: ledger.SigningKey, label: str
) -> tuple[ledger.LedgerState, ledger.JobId]:
    job = factory.job_id_for(label)
    tx = factory.agreement(
        REQUESTER,
        provider,
        nonce(state, REQUESTER),
        job,
        price_per_gpu_second=10,
        gpus=1,
        max_cost=5_000,
        deadline_ms=state.time_ms + 60_000,
        fee=1,
        group_id=GROUP,
    )
    state, results = run(state, tx)
    assert results[0].ok, results[0].error
    return state, job


def settle(
    state: ledger.LedgerState, provider: ledger.SigningKey, job: ledger.JobId, **kwargs: bytes
) -> ledger.LedgerState:
    tx = factory.receipt(
        provider, nonce(state, provider), job, wall_ms=2_000, requester=REQUESTER, fee=1, **kwargs
    )
    state, results = run(state, tx)
    assert results[0].ok, results[0].error
    return state


def bad_key_evidence(
    state: ledger.LedgerState, job: ledger.JobId, index: int = 1
) -> ledger.SlashBadKey:
    _, chunks, _, _, plain_hashes = factory.sealed_outputs(job)
    leaves = ledger.output_leaves(chunks, plain_hashes)
    return ledger.sign_object(
        ledger.SlashBadKey(
            nonce=nonce(state, WITNESS),
            fee=1,
            job_id=job,
            index=index,
            chunk=chunks[index],
            plain_hash=plain_hashes[index],
            proof=ledger.merkle_proof(leaves, index),
        ),
        WITNESS,
        factory.test_chain_id,
    )


def test_a_settle_pays_and_reveals_the_key_and_the_roots() -> None:
    state, job = open_trade(genesis(), PROVIDER, "honest")
    state = settle(state, PROVIDER, job)
    trade = state.trades[job]
    key, chunks, output_root, plain_root, plain_hashes = factory.sealed_outputs(job)
    assert (trade.status, trade.paid) == (ledger.TradeStatus.SETTLED, 20), trade
    assert (trade.output_root, trade.plain_root, trade.key) == (output_root, plain_root, key)
    opened = ledger.open_sealed(job, trade.key, chunks, plain_hashes)
    assert isinstance(opened, bytes) and opened.startswith(b"outputs of "), "anyone can open"
    assert state.account(PROVIDER.address).completed == 1, "reputation counts the settle"


def test_a_receipt_needs_the_requesters_ack_of_the_providers_own_delivery() -> None:
    state, job = open_trade(genesis(), PROVIDER, "ack")
    delivery = factory.delivery(PROVIDER, job, wall_ms=1)
    forged_ack = ledger.sign_object(ledger.DeliveryAck(delivery=delivery), PROVIDER, "gpumesh-test")
    tx = ledger.sign_object(
        ledger.Receipt(nonce=0, fee=1, job_id=job, ack=forged_ack, key=bytes(32)),
        PROVIDER,
        factory.test_chain_id,
    )
    state, results = run(state, tx)
    assert not results[0].ok and "not the requester's" in results[0].error, results
    others = factory.delivery(OTHER_B, job, wall_ms=1)
    ack = ledger.sign_object(ledger.DeliveryAck(delivery=others), REQUESTER, "gpumesh-test")
    stolen = ledger.Receipt(nonce=1, fee=1, job_id=job, ack=ack, key=bytes(32))
    with pytest.raises(ledger.InvalidTransaction, match="not the sender's"):
        ledger.sign_object(stolen, PROVIDER, factory.test_chain_id).validate(factory.test_chain_id)


def test_an_honest_settle_cannot_be_slashed_for_a_bad_key() -> None:
    state, job = open_trade(genesis(), PROVIDER, "honest-key")
    state = settle(state, PROVIDER, job)
    state, results = run(state, bad_key_evidence(state, job))
    assert not results[0].ok and "opens the chunk" in results[0].error, results
    assert state.account(PROVIDER.address).bonded == 2_000, "an honest provider kept its bond"


def test_a_wrong_key_is_slashed_once_half_to_the_requester_half_to_the_witness() -> None:
    state, job = open_trade(genesis(), PROVIDER, "wrong-key")
    state = settle(state, PROVIDER, job, key=bytes(32))
    witness = state.account(WITNESS.address).balance
    requester = state.account(REQUESTER.address).balance
    state, results = run(state, bad_key_evidence(state, job))
    assert results[0].ok, results[0].error
    provider = state.account(PROVIDER.address)
    assert (provider.bonded, provider.slashed) == (1_200, 1), provider
    assert state.account(WITNESS.address).balance == witness - 1 + 400, "the witness's half"
    assert state.account(REQUESTER.address).balance == requester + 400, "the requester's half"
    state, results = run(state, bad_key_evidence(state, job, index=0))
    assert not results[0].ok and "already slashed" in results[0].error, "slashed twice"


def test_bad_key_evidence_must_prove_the_chunk_and_arrive_in_the_window() -> None:
    state, job = open_trade(genesis(), PROVIDER, "proof")
    state = settle(state, PROVIDER, job, key=bytes(32))
    evidence = bad_key_evidence(state, job)
    forged = ledger.sign_object(
        dataclasses.replace(evidence, chunk=evidence.chunk[:-1] + b"\0"),
        WITNESS,
        factory.test_chain_id,
    )
    state, results = run(state, forged)
    assert not results[0].ok and "proof does not lead" in results[0].error, results
    late = bad_key_evidence(state, job)
    state, results = run(state, late, interval_ms=60_000 + 50_000)
    assert not results[0].ok and "no trade" in results[0].error, "the window passed"


def test_an_outvoted_provider_is_slashed_once() -> None:
    state = genesis()
    state, x = open_trade(state, PROVIDER, "x")
    state, y = open_trade(state, OTHER_B, "y")
    state, z = open_trade(state, OTHER_C, "z")
    state = settle(state, OTHER_B, y)
    # y and z settled on the same plaintext; x's provider delivered another one.
    consensus_root = state.trades[y].plain_root
    z_tx = factory.receipt(OTHER_C, nonce(state, OTHER_C), z, wall_ms=2_000, requester=REQUESTER)
    z_delivery = dataclasses.replace(z_tx.ack.delivery, plain_root=consensus_root)
    z_delivery = ledger.sign_object(z_delivery, OTHER_C, factory.test_chain_id)
    z_ack = ledger.sign_object(ledger.DeliveryAck(delivery=z_delivery), REQUESTER, "gpumesh-test")
    z_tx = ledger.sign_object(
        dataclasses.replace(z_tx, ack=z_ack, fee=1), OTHER_C, factory.test_chain_id
    )
    state, results = run(state, z_tx)
    assert results[0].ok, results[0].error
    cheat = factory.delivery(PROVIDER, x, wall_ms=2_000, plain_root=b"\x07" * 32)

    def outvote(delivery: ledger.Delivery, y_job: bytes, z_job: bytes) -> ledger.SlashOutvoted:
        tx = ledger.SlashOutvoted(
            nonce=nonce(state, WITNESS),
            fee=1,
            delivery=delivery,
            job_y=ledger.JobId(y_job),
            job_z=ledger.JobId(z_job),
        )
        return ledger.sign_object(tx, WITNESS, factory.test_chain_id)

    honest = factory.delivery(PROVIDER, x, wall_ms=2_000, plain_root=consensus_root)
    state, results = run(state, outvote(honest, y, z))
    assert not results[0].ok and "agrees with the others" in results[0].error, results
    state, results = run(state, outvote(cheat, y, z))
    assert results[0].ok, results[0].error
    assert state.account(PROVIDER.address).slashed == 1, "the outvoted provider was slashed"
    assert state.trades[x].slashed, "the trade remembers it"
    state, results = run(state, outvote(cheat, z, y))
    assert not results[0].ok and "already slashed" in results[0].error, "slashed twice"
    # Past its deadline the abandoned award is refunded, but not slashed a second time.
    refund = factory.refund(REQUESTER, nonce(state, REQUESTER), x, fee=1)
    state, results = run(state, refund, interval_ms=60_000)
    assert results[0].ok, results[0].error
    provider = state.account(PROVIDER.address)
    assert (provider.slashed, provider.failed, provider.bonded) == (1, 1, 1_200), provider


def test_outvote_evidence_needs_one_group_and_three_providers() -> None:
    state = genesis()
    state, x = open_trade(state, PROVIDER, "x2")
    state, y = open_trade(state, OTHER_B, "y2")
    state, z = open_trade(state, OTHER_B, "z2")
    state = settle(state, OTHER_B, y)
    state = settle(state, OTHER_B, z)
    cheat = factory.delivery(PROVIDER, x, wall_ms=1, plain_root=b"\x07" * 32)
    tx = ledger.SlashOutvoted(nonce=0, fee=1, delivery=cheat, job_y=y, job_z=z)
    state, results = run(state, ledger.sign_object(tx, WITNESS, factory.test_chain_id))
    assert not results[0].ok, "one provider cannot outvote another twice"
    assert results[0].error in (
        "the three providers must differ",
        "the two outvoting trades disagree with each other",
    ), results[0].error
    bad = ledger.sign_object(dataclasses.replace(tx, job_z=y), WITNESS, factory.test_chain_id)
    with pytest.raises(ledger.InvalidTransaction, match="three trades"):
        bad.validate(factory.test_chain_id)


def test_an_outvoted_provider_that_cancelled_first_is_still_slashed() -> None:
    state = genesis()
    state, x = open_trade(state, PROVIDER, "x3")
    state, y = open_trade(state, OTHER_B, "y3")
    state, z = open_trade(state, OTHER_C, "z3")
    cheat = factory.delivery(PROVIDER, x, wall_ms=1, plain_root=b"\x07" * 32)
    # Never acked, the cheater gives the trade up itself before the others settle.
    state, results = run(state, factory.cancel(PROVIDER, nonce(state, PROVIDER), x, fee=1))
    assert results[0].ok and state.trades[x].status is ledger.TradeStatus.CANCELLED, results
    state = settle(state, OTHER_B, y)
    root = state.trades[y].plain_root
    z_delivery = ledger.sign_object(
        dataclasses.replace(factory.delivery(OTHER_C, z, wall_ms=2_000), plain_root=root),
        OTHER_C,
        factory.test_chain_id,
    )
    z_ack = ledger.sign_object(ledger.DeliveryAck(delivery=z_delivery), REQUESTER, "gpumesh-test")
    z_tx = ledger.Receipt(nonce=nonce(state, OTHER_C), fee=1, job_id=z, ack=z_ack, key=bytes(32))
    state, results = run(state, ledger.sign_object(z_tx, OTHER_C, factory.test_chain_id))
    assert results[0].ok, results[0].error
    tx = ledger.SlashOutvoted(nonce=nonce(state, WITNESS), fee=1, delivery=cheat, job_y=y, job_z=z)
    state, results = run(state, ledger.sign_object(tx, WITNESS, factory.test_chain_id))
    assert results[0].ok, results[0].error
    provider = state.account(PROVIDER.address)
    assert (provider.failed, provider.slashed, provider.bonded) == (1, 1, 1_200), provider
