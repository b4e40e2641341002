"""Every ledger type round-trips through the canonical codec; signatures bind chain and type;
bad bytes and bad values fail with a clear error."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ledger
from ledger import testing as factory
from ledger._codec import to_plain
from ledger.types import amount_max

KEY = factory.key_for(1)


def slow_encode(value: Any) -> bytes:
    """The reference encoding: the dataclass tree as plain lists, then msgpack."""
    packed: bytes = msgpack.packb(to_plain(value), use_bin_type=True)
    return packed


OTHER = factory.key_for(2)
CHAIN = factory.test_chain_id

u64 = st.integers(0, 2**63 - 1)
b32 = st.binary(min_size=32, max_size=32)
b64 = st.binary(min_size=64, max_size=64)

terms = st.builds(
    ledger.AgreementTerms,
    job_id=b32,
    requester=b32,
    provider=b32,
    price_per_gpu_second=u64,
    gpus=u64,
    max_cost=u64,
    deadline_ms=u64,
    group_id=b32,
    manifest_digest=b32,
    signer=b32,
    signature=b64,
)
transfers = st.builds(
    ledger.Transfer, nonce=u64, fee=u64, recipient=b32, amount=u64, signer=b32, signature=b64
)
agreements = st.builds(ledger.Agreement, nonce=u64, fee=u64, terms=terms, signer=b32, signature=b64)
deliveries = st.builds(
    ledger.Delivery,
    job_id=b32,
    output_root=b32,
    plain_root=b32,
    output_bytes=u64,
    wall_ms=u64,
    exit_status=st.integers(-(2**31), 2**31 - 1),
    signer=b32,
    signature=b64,
)
acks = st.builds(ledger.DeliveryAck, delivery=deliveries, signer=b32, signature=b64)
receipts = st.builds(
    ledger.Receipt,
    nonce=u64,
    fee=u64,
    job_id=b32,
    ack=acks,
    key=b32,
    signer=b32,
    signature=b64,
)
bad_keys = st.builds(
    ledger.SlashBadKey,
    nonce=u64,
    fee=u64,
    job_id=b32,
    index=u64,
    chunk=st.binary(max_size=1040),
    plain_hash=b32,
    proof=st.lists(b32, max_size=20).map(tuple),
    signer=b32,
    signature=b64,
)
outvotes = st.builds(
    ledger.SlashOutvoted,
    nonce=u64,
    fee=u64,
    delivery=deliveries,
    job_y=b32,
    job_z=b32,
    signer=b32,
    signature=b64,
)
refunds = st.builds(ledger.Refund, nonce=u64, fee=u64, job_id=b32, signer=b32, signature=b64)
cancels = st.builds(ledger.Cancel, nonce=u64, fee=u64, job_id=b32, signer=b32, signature=b64)
stakes = st.builds(ledger.Stake, nonce=u64, fee=u64, amount=u64, signer=b32, signature=b64)
unbonds = st.builds(ledger.Unbond, nonce=u64, fee=u64, amount=u64, signer=b32, signature=b64)
transactions = st.one_of(
    transfers, agreements, receipts, refunds, cancels, stakes, unbonds, bad_keys, outvotes
)
accounts = st.builds(ledger.Account, *[u64] * 10)
trades = st.builds(
    ledger.Trade,
    terms,
    st.sampled_from(ledger.TradeStatus),
    u64,
    u64,
    u64,
    st.binary(),
    u64,
    st.booleans(),
    b32,
    b32,
    b32,
    u64,
)
blocks = st.builds(
    ledger.Block,
    st.text(max_size=20),
    u64,
    b32,
    u64,
    b32,
    b32,
    b32,
    st.lists(transactions, max_size=4).map(tuple),
)
commits = st.builds(
    ledger.Commit,
    u64,
    st.integers(0, 1000),
    b32,
    st.lists(st.builds(ledger.CommitSig, b32, b64), max_size=4).map(tuple),
)
records = st.builds(ledger.TxRecord, transactions, u64, u64, st.booleans(), st.text())
others = st.one_of(
    deliveries,
    acks,
    accounts,
    trades,
    commits,
    records,
    st.builds(ledger.TxResult, b32, st.booleans(), st.text()),
    st.builds(ledger.Validator, b32, st.integers(1, 100)),
    st.builds(ledger.Head, u64, b32, u64, b32),
    st.builds(ledger.ReceiptRecord, receipts, b32, u64),
    blocks.map(lambda b: b.header()),
)


@settings(max_examples=200)
@given(transactions)
def test_every_transaction_kind_round_trips_through_the_union(tx: ledger.Transaction) -> None:
    data = ledger.encode(tx)
    assert data == slow_encode(tx), "the fast encoder disagrees with the plain one"
    decoded = ledger.decode(ledger.Transaction, data)  # type: ignore[arg-type]
    assert decoded == tx, f"{type(tx).__name__} did not survive a round trip"
    assert type(decoded) is type(tx), "the union decoded to the wrong kind"


@settings(max_examples=50)
@given(blocks)
def test_blocks_round_trip_and_hash_their_header(block: ledger.Block) -> None:
    assert ledger.decode(ledger.Block, ledger.encode(block)) == block, "block round trip"
    assert block.hash() == ledger.hash_of(block.header()), "block hash is not the header's hash"


@settings(max_examples=150)
@given(others)
def test_other_types_round_trip(value: Any) -> None:
    assert ledger.decode(type(value), ledger.encode(value)) == value, f"{type(value).__name__}"
    assert ledger.encode(value) == slow_encode(value), "the fast encoder disagrees"


def test_unknown_transaction_kind_is_a_clear_error() -> None:
    tx = factory.refund(KEY, 0, factory.job_id_for(1))
    plain = msgpack.unpackb(ledger.encode(tx))
    plain[0] = 99
    with pytest.raises(ledger.DecodeError, match="unknown kind 99"):
        ledger.decode(ledger.Transaction, msgpack.packb(plain))  # type: ignore[arg-type]
    # A kind number that names another class than the fields fit is refused too.
    plain[0] = int(ledger.TxKind.TRANSFER)
    with pytest.raises(ledger.DecodeError, match="Transfer with 7 fields"):
        ledger.decode(ledger.Transaction, msgpack.packb(plain))  # type: ignore[arg-type]
    with pytest.raises(ledger.DecodeError, match="starts with a kind"):
        ledger.decode(ledger.Transaction, msgpack.packb(["x"]))  # type: ignore[arg-type]


@pytest.mark.parametrize("cut", [1, 5, 40, 100])
def test_truncated_and_garbage_bytes_are_decode_errors(cut: int) -> None:
    data = ledger.encode(factory.transfer(KEY, 0, OTHER.address, 5))
    with pytest.raises(ledger.DecodeError):
        ledger.decode(ledger.Transaction, data[:-cut])  # type: ignore[arg-type]
    with pytest.raises(ledger.DecodeError):
        ledger.decode(ledger.Transaction, bytes(range(cut)))  # type: ignore[arg-type]


def test_wrong_field_types_are_decode_errors() -> None:
    tx = factory.transfer(KEY, 0, OTHER.address, 5)
    plain = msgpack.unpackb(ledger.encode(tx))
    plain[4] = "5"  # amount as a string
    with pytest.raises(ledger.DecodeError, match=r"\$\.amount: expected int, got str"):
        ledger.decode(ledger.Transaction, msgpack.packb(plain))  # type: ignore[arg-type]


def test_signature_binds_chain_id_and_type_tag() -> None:
    tx = factory.refund(KEY, 0, factory.job_id_for(1))
    tx.validate(CHAIN)
    with pytest.raises(ledger.InvalidTransaction, match="signature does not verify"):
        tx.validate("another-chain")
    # The same fields and signature presented as another kind (a Cancel) do not verify.
    as_cancel = ledger.Cancel(
        nonce=tx.nonce, fee=tx.fee, job_id=tx.job_id, signer=tx.signer, signature=tx.signature
    )
    with pytest.raises(ledger.InvalidTransaction, match="signature does not verify"):
        as_cancel.validate(CHAIN)
    with pytest.raises(ledger.InvalidTransaction, match="signature does not verify"):
        dataclasses.replace(tx, nonce=1).validate(CHAIN)


def test_terms_must_carry_the_providers_signature() -> None:
    agreement = factory.agreement(
        KEY,
        OTHER,
        0,
        factory.job_id_for(1),
        price_per_gpu_second=1,
        gpus=1,
        max_cost=10,
        deadline_ms=10**13,
    )
    agreement.validate(CHAIN)
    # The requester signs the terms itself instead of the provider.
    forged_terms = ledger.sign_object(agreement.terms, KEY, CHAIN)
    forged = ledger.sign_object(dataclasses.replace(agreement, terms=forged_terms), KEY, CHAIN)
    with pytest.raises(ledger.InvalidTransaction, match="signed by the provider"):
        forged.validate(CHAIN)
    tampered_terms = dataclasses.replace(agreement.terms, max_cost=1)
    tampered = ledger.sign_object(dataclasses.replace(agreement, terms=tampered_terms), KEY, CHAIN)
    with pytest.raises(ledger.InvalidTransaction, match="provider's signature"):
        tampered.validate(CHAIN)


@pytest.mark.parametrize("amount", [-1, amount_max + 1])
def test_negative_or_overflowing_amounts_are_invalid(amount: int) -> None:
    tx = ledger.sign_object(
        ledger.Transfer(nonce=0, fee=0, recipient=OTHER.address, amount=amount), KEY, CHAIN
    )
    with pytest.raises(ledger.InvalidTransaction, match=r"amount .* is outside"):
        tx.validate(CHAIN)
    fee_tx = ledger.sign_object(
        ledger.Transfer(nonce=0, fee=amount, recipient=OTHER.address, amount=1), KEY, CHAIN
    )
    with pytest.raises(ledger.InvalidTransaction, match=r"fee .* is outside"):
        fee_tx.validate(CHAIN)


def test_amounts_past_64_bits_cannot_even_be_encoded() -> None:
    with pytest.raises(OverflowError, match="64 bits"):
        ledger.encode(ledger.Transfer(nonce=0, fee=0, recipient=OTHER.address, amount=2**64))


def test_short_addresses_are_invalid() -> None:
    tx = ledger.sign_object(
        ledger.Transfer(nonce=0, fee=0, recipient=ledger.Address(b"\x01" * 31), amount=1),
        KEY,
        CHAIN,
    )
    with pytest.raises(ledger.InvalidTransaction, match="recipient must be 32 bytes"):
        tx.validate(CHAIN)


def test_cost_counts_cpu_jobs_as_one_slot_rounds_up_and_caps_at_max_cost() -> None:
    base = dict(
        job_id=factory.job_id_for(1),
        requester=KEY.address,
        provider=OTHER.address,
        price_per_gpu_second=10,
        max_cost=1_000,
        deadline_ms=1,
    )
    two_gpus = ledger.AgreementTerms(gpus=2, **base)  # type: ignore[arg-type]
    cpu_only = ledger.AgreementTerms(gpus=0, **base)  # type: ignore[arg-type]
    assert two_gpus.cost(1_500) == 30, "2 GPUs x 1.5 s x 10/GPU-s"
    assert cpu_only.cost(1_500) == 15, "a CPU-only job counts as one slot"
    assert two_gpus.cost(999) == 20, "rounding is up to the smallest unit"
    assert two_gpus.cost(1) == 1, "a millisecond of work is not free"
    assert two_gpus.cost(0) == 0 and two_gpus.cost(0, charge_min=5) == 5, "minimum charge"
    assert two_gpus.cost(1_500, charge_min=5) == 30, "the minimum only raises small charges"
    assert two_gpus.cost(10**9) == 1_000, "cost is capped at max_cost"
    assert two_gpus.cost(0, charge_min=5_000) == 1_000, "even the minimum charge is capped"


def test_a_failed_encode_leaves_no_bytes_behind() -> None:
    tx = factory.transfer(KEY, 0, OTHER.address, 5)
    with pytest.raises(TypeError, match="cannot encode"):
        ledger.encode([b"half", {1, 2}])  # a set has no canonical encoding
    with pytest.raises(OverflowError, match="64 bits"):
        ledger.encode([b"half", 2**64])
    assert ledger.encode(tx) == slow_encode(tx), "bytes of a failed encode leaked into the next"


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=10),
    max_leaves=40,
)


@settings(max_examples=300)
@given(msgpack_values, st.sampled_from([ledger.Transaction, ledger.Block, ledger.Commit]))
def test_arbitrary_msgpack_gives_a_decode_error_or_a_valid_object(value: Any, cls: Any) -> None:
    data = msgpack.packb(value, use_bin_type=True)
    try:
        decoded = ledger.decode(cls, data)
    except ledger.DecodeError:
        return
    assert ledger.encode(decoded) == data, "decode accepted bytes that are not canonical"
