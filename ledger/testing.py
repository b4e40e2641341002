"""Factories for tests, scripts and benchmarks: deterministic keys, a funded genesis, signed
transactions and a chain driver. Real objects only; nothing here fakes a ledger part."""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING

from ledger._genesis import Genesis, GenesisAccount
from ledger._keys import Address, SigningKey, sign_object
from ledger._outputs import seal
from ledger._state import BlockResults, LedgerState, apply_block, build_block
from ledger.types import (
    NO_GROUP,
    Agreement,
    AgreementTerms,
    Block,
    Cancel,
    ChainParams,
    Delivery,
    DeliveryAck,
    JobId,
    Receipt,
    Refund,
    Stake,
    TradeStatus,
    Transaction,
    Transfer,
    Unbond,
    Validator,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ledger.abc import StoreAPI

test_chain_id = "gpumesh-test"
test_genesis_time_ms = 1_700_000_000_000
block_interval_ms = 1000


def key_for(index: int, namespace: str = "ledger-test") -> SigningKey:
    """A deterministic key: the same index gives the same address in every process."""
    return SigningKey(hashlib.sha256(f"{namespace}/{index}".encode()).digest())


def job_id_for(label: str | int) -> JobId:
    return JobId(hashlib.sha256(f"job/{label}".encode()).digest())


def funded_genesis(
    keys: Sequence[SigningKey],
    balance: int,
    *,
    chain_id: str = test_chain_id,
    params: ChainParams | None = None,
    bonded: int = 0,
) -> Genesis:
    """Every key funded with ``balance`` and a bond of ``bonded``; ``params`` default to a
    genesis that names none."""
    return Genesis(
        chain_id=chain_id,
        genesis_time_ms=test_genesis_time_ms,
        accounts=tuple(GenesisAccount(k.address, balance, bonded) for k in keys),
        validators=(Validator(keys[0].address, 1),),
        params=params or ChainParams(),
    )


def transfer(
    key: SigningKey,
    nonce: int,
    recipient: bytes,
    amount: int,
    *,
    fee: int = 0,
    chain_id: str = test_chain_id,
) -> Transfer:
    tx = Transfer(nonce=nonce, fee=fee, recipient=Address(recipient), amount=amount)
    return sign_object(tx, key, chain_id)


def agreement(
    requester: SigningKey,
    provider: SigningKey,
    nonce: int,
    job_id: JobId,
    *,
    price_per_gpu_second: int,
    gpus: int,
    max_cost: int,
    deadline_ms: int,
    fee: int = 0,
    group_id: bytes = NO_GROUP,
    chain_id: str = test_chain_id,
) -> Agreement:
    terms = AgreementTerms(
        job_id=job_id,
        requester=requester.address,
        provider=provider.address,
        price_per_gpu_second=price_per_gpu_second,
        gpus=gpus,
        max_cost=max_cost,
        deadline_ms=deadline_ms,
        group_id=group_id,
        manifest_digest=hashlib.sha256(b"manifest/" + job_id).digest(),
    )
    signed_terms = sign_object(terms, provider, chain_id)
    return sign_object(Agreement(nonce=nonce, fee=fee, terms=signed_terms), requester, chain_id)


def sealed_outputs(
    job_id: JobId,
) -> tuple[bytes, tuple[bytes, ...], bytes, bytes, tuple[bytes, ...]]:
    """A job's deterministic output bundle, sealed under a key derived from the job id."""
    plaintext = b"outputs of " + job_id * 40
    return seal(job_id, plaintext, key=hashlib.sha256(b"key/" + job_id).digest())


def delivery(
    provider: SigningKey,
    job_id: JobId,
    *,
    wall_ms: int,
    exit_status: int = 0,
    plain_root: bytes | None = None,
    chain_id: str = test_chain_id,
) -> Delivery:
    """The provider's signed delivery of ``sealed_outputs(job_id)``."""
    _, chunks, output_root, real_plain_root, _ = sealed_outputs(job_id)
    size = len(b"".join(chunks)) - 16 * len(chunks)
    return sign_object(
        Delivery(
            job_id=job_id,
            output_root=output_root,
            plain_root=real_plain_root if plain_root is None else plain_root,
            output_bytes=size,
            wall_ms=wall_ms,
            exit_status=exit_status,
        ),
        provider,
        chain_id,
    )


def receipt(
    provider: SigningKey,
    nonce: int,
    job_id: JobId,
    *,
    wall_ms: int,
    requester: SigningKey,
    exit_status: int = 0,
    fee: int = 0,
    key: bytes | None = None,
    chain_id: str = test_chain_id,
) -> Receipt:
    """The provider's settle: its delivery acked by ``requester``, with the sealing key."""
    signed = delivery(provider, job_id, wall_ms=wall_ms, exit_status=exit_status, chain_id=chain_id)
    ack = sign_object(DeliveryAck(delivery=signed), requester, chain_id)
    tx = Receipt(
        nonce=nonce,
        fee=fee,
        job_id=job_id,
        ack=ack,
        key=sealed_outputs(job_id)[0] if key is None else key,
    )
    return sign_object(tx, provider, chain_id)


def refund(
    key: SigningKey, nonce: int, job_id: JobId, *, fee: int = 0, chain_id: str = test_chain_id
) -> Refund:
    return sign_object(Refund(nonce=nonce, fee=fee, job_id=job_id), key, chain_id)


def cancel(
    key: SigningKey, nonce: int, job_id: JobId, *, fee: int = 0, chain_id: str = test_chain_id
) -> Cancel:
    return sign_object(Cancel(nonce=nonce, fee=fee, job_id=job_id), key, chain_id)


def stake(
    key: SigningKey, nonce: int, amount: int, *, fee: int = 0, chain_id: str = test_chain_id
) -> Stake:
    return sign_object(Stake(nonce=nonce, fee=fee, amount=amount), key, chain_id)


def unbond(
    key: SigningKey, nonce: int, amount: int, *, fee: int = 0, chain_id: str = test_chain_id
) -> Unbond:
    return sign_object(Unbond(nonce=nonce, fee=fee, amount=amount), key, chain_id)


def next_block(
    state: LedgerState,
    txs: Sequence[Transaction],
    proposer: bytes,
    *,
    interval_ms: int = block_interval_ms,
) -> Block:
    """The block after ``state`` holding ``txs``, ``interval_ms`` later."""
    return build_block(
        state, state.height + 1, state.block_hash, state.time_ms + interval_ms, proposer, txs
    )


def commit_next(
    store: StoreAPI | None,
    state: LedgerState,
    txs: Sequence[Transaction],
    proposer: bytes,
    *,
    interval_ms: int = block_interval_ms,
) -> tuple[LedgerState, Block, BlockResults]:
    """Build, apply and (with a store) commit the next block; what a single validator does."""
    block = next_block(state, txs, proposer, interval_ms=interval_ms)
    new_state, results = apply_block(state, block)
    if store is not None:
        store.commit_block(block, None, new_state, results)
    return new_state, block, results


def scripted_transactions(
    keys: Sequence[SigningKey], state: LedgerState, seed: int, count: int
) -> list[Transaction]:
    """``count`` transactions for the block after ``state``, a pure function of the seed and
    the state: transfers, agreements, receipts, refunds and cancels, a few of them invalid.
    Two processes that replay the same seed build the same chain."""
    rng = random.Random(f"{seed}/{state.height}")
    nonces = {k.address: state.account(k.address).nonce for k in keys}
    open_jobs = sorted(j for j, t in state.trades.items() if t.status is TradeStatus.OPEN)
    by_address = {k.address: k for k in keys}
    txs: list[Transaction] = []
    for i in range(count):
        roll = rng.random()
        if roll < 0.1 and open_jobs:
            job_id = open_jobs.pop(rng.randrange(len(open_jobs)))
            terms = state.trades[job_id].terms
            provider, requester = by_address[terms.provider], by_address[terms.requester]
            choice = rng.random()
            if choice < 0.6:
                tx: Transaction = receipt(
                    provider,
                    nonces[provider.address],
                    job_id,
                    wall_ms=rng.randrange(100_000),
                    requester=requester,
                )
                nonces[provider.address] += 1
            elif choice < 0.8:
                tx = cancel(requester, nonces[requester.address], job_id, fee=1)
                nonces[requester.address] += 1
            else:
                tx = refund(provider, nonces[provider.address], job_id)
                nonces[provider.address] += 1
        elif roll < 0.2:
            requester, provider = rng.sample(list(keys), 2)
            tx = agreement(
                requester,
                provider,
                nonces[requester.address],
                job_id_for(f"{seed}/{state.height}/{i}"),
                price_per_gpu_second=rng.randrange(50),
                gpus=rng.randrange(4),
                max_cost=rng.randrange(5_000),
                deadline_ms=state.time_ms + rng.randrange(1_000, 20_000),
            )
            nonces[requester.address] += 1
        else:
            sender, recipient = rng.sample(list(keys), 2)
            # One in twenty reuses a nonce: a replay the ledger must record as failed.
            nonce = nonces[sender.address] - (rng.random() < 0.05)
            tx = transfer(
                sender,
                max(nonce, 0),
                recipient.address,
                rng.randrange(2_000),
                fee=rng.randrange(3),
            )
            nonces[sender.address] = max(nonces[sender.address], nonce + 1)
        txs.append(tx)
    return txs
