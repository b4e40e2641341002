"""Factories for tests, scripts and benchmarks: deterministic keys, a funded genesis, signed
transactions and a chain driver. Real objects only; nothing here fakes a ledger part."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from ledger._genesis import Genesis, GenesisAccount
from ledger._keys import Address, SigningKey, sign_object
from ledger._state import BlockResults, LedgerState, apply_block, build_block
from ledger.types import (
    Agreement,
    AgreementTerms,
    Block,
    Cancel,
    JobId,
    Receipt,
    Refund,
    Transfer,
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
    keys: Sequence[SigningKey], balance: int, *, chain_id: str = test_chain_id
) -> Genesis:
    return Genesis(
        chain_id=chain_id,
        genesis_time_ms=test_genesis_time_ms,
        accounts=tuple(GenesisAccount(k.address, balance) for k in keys),
        validators=(Validator(keys[0].address, 1),),
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
    )
    signed_terms = sign_object(terms, provider, chain_id)
    return sign_object(Agreement(nonce=nonce, fee=fee, terms=signed_terms), requester, chain_id)


def receipt(
    provider: SigningKey,
    nonce: int,
    job_id: JobId,
    *,
    wall_ms: int,
    exit_status: int = 0,
    fee: int = 0,
    chain_id: str = test_chain_id,
) -> Receipt:
    tx = Receipt(
        nonce=nonce,
        fee=fee,
        job_id=job_id,
        output_digest=hashlib.sha256(job_id).digest(),
        wall_ms=wall_ms,
        exit_status=exit_status,
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


def next_block(
    state: LedgerState,
    txs: Sequence[Transfer | Agreement | Receipt | Refund | Cancel],
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
    txs: Sequence[Transfer | Agreement | Receipt | Refund | Cancel],
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
