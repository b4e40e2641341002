"""The ledger's canonical types: transactions, accounts, trades, blocks and commit certificates.

Every type is a frozen dataclass with one canonical msgpack encoding (``ledger.encode``); hashes
and signatures are taken over that encoding. Transactions are a tagged union: each kind's first
field ``kind`` names it, so ``decode(Transaction, data)`` picks the right class.

``validate()`` on a transaction is the stateless check (shapes, ranges, signatures); the stateful
check lives with the state transition in ``ledger._state``.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, ClassVar, NewType

from ledger._codec import encode_with, hash_of
from ledger._keys import Address, verify
from ledger._outputs import (
    output_bytes_max,
    output_key_bytes,
    proof_hashes_max,
    sealed_chunk_bytes_max,
)
from ledger.exceptions import InvalidTransaction

JobId = NewType("JobId", bytes)
"""A job's 32-byte id, chosen by the requester (in practice a hash of the job request)."""
Height = NewType("Height", int)
TxHash = NewType("TxHash", bytes)
BlockHash = NewType("BlockHash", bytes)

_UNSIGNED = Address(b"")
NO_GROUP = bytes(32)
"""``AgreementTerms.group_id`` of a trade that belongs to no group."""
"""The signer field before signing; ``sign_object`` fills it in."""
address_bytes = 32
job_id_bytes = 32
hash_bytes = 32
signature_bytes = 64
amount_max = 2**63 - 1
"""Largest amount anywhere (balance, fee, price, supply): every sum of amounts must fit in it."""
nonce_max = 2**63 - 1
gpus_max = 1024
wall_ms_max = 10 * 365 * 24 * 3600 * 1000
"""Longest usage a receipt may claim: ten years of wall time, far past any real job."""
deadline_horizon_ms_max = 30 * 24 * 3600 * 1000
"""How far past a block's time an agreement's deadline may lie (bounds how long trades stay)."""
transaction_bytes_max = 4096
"""Largest encoded transaction; the largest kind (a slash carrying a 1 KiB output chunk and
its Merkle proof) stays under 2.5 KiB."""
block_transactions_max = 10_000
block_bytes_max = 8 * 1024 * 1024


day_ms = 24 * 3600 * 1000
unbonding_delay_ms_max = 365 * day_ms
"""Longest unbonding delay a genesis may set."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ChainParams:
    """Chain-wide rules fixed in genesis (every node must agree on them).

    The field defaults are the permissive rules of a chain whose genesis names none (no fee,
    no bond); ``ChainParams.default()`` is what ``gpumesh init``, ``testnet init`` and ``dev``
    write.
    """

    fee_min: int = 0
    """Smallest fee any transaction may carry."""
    provider_bond_min: int = 0
    """Bond a provider must hold for an agreement naming it to be valid."""
    unbonding_delay_ms: int = deadline_horizon_ms_max
    """How long unbonded stake stays slashable before it can return to the balance."""
    charge_min: int = 0
    """Least a settled or requester-cancelled trade pays its provider (capped by max_cost)."""
    slash_amount: int = 0
    """What one proven fault takes from a provider's bond (at most what it has)."""
    evidence_window_ms: int = 0
    """How long after its deadline a closed trade stays in the state, open to slash evidence."""

    @classmethod
    def default(cls) -> ChainParams:
        """The network defaults a new genesis gets."""
        return cls(
            fee_min=1,
            provider_bond_min=1_000_000,
            unbonding_delay_ms=3 * day_ms,
            charge_min=1,
            slash_amount=1_000_000,
            evidence_window_ms=day_ms,
        )

    def problems(self) -> list[str]:
        """What is wrong with these parameters, one message per problem (empty: valid)."""
        found = [
            f"params.{f.name} {getattr(self, f.name)} is outside 0..{amount_max}"
            for f in dataclasses.fields(self)
            if not 0 <= getattr(self, f.name) <= amount_max
        ]
        if not 0 < self.unbonding_delay_ms <= unbonding_delay_ms_max:
            found.append(f"params.unbonding_delay_ms must be in 1..{unbonding_delay_ms_max}")
        if not 0 <= self.evidence_window_ms < self.unbonding_delay_ms:
            found.append("params.evidence_window_ms must be below params.unbonding_delay_ms")
        return found

    def deadline_horizon_ms(self) -> int:
        """How far past a block's time an agreement's deadline may lie: a provider's bond must
        stay slashable (bonded, or unbonding) until every trade's evidence window closes."""
        return min(deadline_horizon_ms_max, self.unbonding_delay_ms - self.evidence_window_ms)


class TxKind(enum.IntEnum):
    TRANSFER = 1
    AGREEMENT = 2
    RECEIPT = 3
    REFUND = 4
    CANCEL = 5
    STAKE = 6
    UNBOND = 7
    SLASH_BAD_KEY = 8
    SLASH_OUTVOTED = 9


class TradeStatus(enum.IntEnum):
    OPEN = 1
    SETTLED = 2
    REFUNDED = 3
    CANCELLED = 4


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidTransaction(message)


def _check_amount(name: str, value: int) -> None:
    _check(0 <= value <= amount_max, f"{name} {value} is outside 0..{amount_max}")


def _check_bytes(name: str, value: bytes, size: int) -> None:
    _check(len(value) == size, f"{name} must be {size} bytes, got {len(value)}")


@dataclasses.dataclass(frozen=True, slots=True)
class Account:
    """One account's state. ``earned`` sums what the account was paid as a provider.

    Money: ``balance`` (spendable), ``locked`` (escrow of its open trades as a requester),
    ``bonded`` (a provider's stake, slashable) and ``unbonding`` (stake on its way back to the
    balance, still slashable, released from ``unbond_release_ms``). The counts ``completed``,
    ``failed`` and ``slashed`` are the provider's on-chain reputation.
    """

    balance: int = 0
    locked: int = 0
    nonce: int = 0
    earned: int = 0
    bonded: int = 0
    unbonding: int = 0
    unbond_release_ms: int = 0
    completed: int = 0
    """Trades it settled with a receipt."""
    failed: int = 0
    """Trades it gave up (provider cancel) or abandoned past the deadline."""
    slashed: int = 0
    """Proven faults it was slashed for."""

    def total(self) -> int:
        """Every unit of money the account holds, in any form (what supply counts)."""
        return self.balance + self.locked + self.bonded + self.unbonding


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AgreementTerms:
    """The trade both sides agreed to; signed by the provider, embedded in the requester's tx."""

    TYPE_TAG: ClassVar[str] = "gpumesh/agreement-terms/1"
    job_id: JobId
    requester: Address
    provider: Address
    price_per_gpu_second: int
    gpus: int
    max_cost: int
    deadline_ms: int
    group_id: bytes = NO_GROUP
    """The logical job: every attempt or replica of one job shares it (``NO_GROUP``: none,
    which no outvote evidence can name)."""
    manifest_digest: bytes = bytes(hash_bytes)
    """SHA-256 of the job's canonical manifest: what the provider agreed to run."""
    signer: Address = _UNSIGNED
    signature: bytes = b""

    def validate(self, chain_id: str) -> None:
        _check_bytes("terms.job_id", self.job_id, job_id_bytes)
        _check_bytes("terms.group_id", self.group_id, hash_bytes)
        _check_bytes("terms.manifest_digest", self.manifest_digest, hash_bytes)
        _check_bytes("terms.requester", self.requester, address_bytes)
        _check_bytes("terms.provider", self.provider, address_bytes)
        _check(self.requester != self.provider, "requester and provider must differ")
        _check_amount("terms.price_per_gpu_second", self.price_per_gpu_second)
        _check(0 <= self.gpus <= gpus_max, f"terms.gpus {self.gpus} is outside 0..{gpus_max}")
        _check_amount("terms.max_cost", self.max_cost)
        _check(0 <= self.deadline_ms <= amount_max, "terms.deadline_ms is out of range")
        _check(self.signer == self.provider, "the terms must be signed by the provider")
        _check(
            verify(self.signer, self.signature, chain_id, self.TYPE_TAG, _signed_body(self)),
            "the provider's signature over the terms does not verify",
        )

    def cost(self, wall_ms: int, charge_min: int = 0) -> int:
        """What the requester pays for ``wall_ms`` of usage: CPU-only jobs count one slot,
        rounded up to a whole unit, at least ``charge_min``, at most ``max_cost``."""
        usage = -(-self.price_per_gpu_second * max(self.gpus, 1) * wall_ms // 1000)
        return min(self.max_cost, max(charge_min, usage))


def _signed_body(obj: object) -> bytes:
    return encode_with(obj, signature=b"")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Delivery:
    """What a provider commits to when it hands over a job's sealed outputs (signed by it):
    the roots of ``ledger._outputs``, the bundle's size and the usage it bills."""

    TYPE_TAG: ClassVar[str] = "gpumesh/delivery/1"
    job_id: JobId
    output_root: bytes
    plain_root: bytes
    output_bytes: int
    wall_ms: int
    exit_status: int
    signer: Address = _UNSIGNED
    signature: bytes = b""

    def validate(self, chain_id: str) -> None:
        _check_bytes("delivery.job_id", self.job_id, job_id_bytes)
        _check_bytes("delivery.output_root", self.output_root, hash_bytes)
        _check_bytes("delivery.plain_root", self.plain_root, hash_bytes)
        _check(
            0 <= self.output_bytes <= output_bytes_max,
            f"delivery.output_bytes {self.output_bytes} is outside 0..{output_bytes_max}",
        )
        _check(0 <= self.wall_ms <= wall_ms_max, f"delivery.wall_ms {self.wall_ms} is out of range")
        _check(-(2**31) <= self.exit_status < 2**31, "delivery.exit_status must fit in 32 bits")
        _check_bytes("delivery.signer", self.signer, address_bytes)
        _check(
            verify(self.signer, self.signature, chain_id, self.TYPE_TAG, _signed_body(self)),
            "the provider's signature over the delivery does not verify",
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryAck:
    """The requester's word that it fetched the delivery's ciphertext and checked it against
    the roots (``ledger._outputs.check_sealed``): what lets the provider settle."""

    TYPE_TAG: ClassVar[str] = "gpumesh/delivery-ack/1"
    delivery: Delivery
    signer: Address = _UNSIGNED
    signature: bytes = b""

    def validate(self, chain_id: str) -> None:
        self.delivery.validate(chain_id)
        _check_bytes("ack.signer", self.signer, address_bytes)
        _check(
            verify(self.signer, self.signature, chain_id, self.TYPE_TAG, _signed_body(self)),
            "the requester's signature over the delivery ack does not verify",
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _TxBase:
    """Fields and checks every transaction shares; the sender is ``signer``."""

    TYPE_TAG: ClassVar[str]
    KIND: ClassVar[TxKind]
    if TYPE_CHECKING:
        # Declared by every subclass, in an order the codec depends on (kind first, the
        # signature last); declared here for the type checker only.
        @property
        def kind(self) -> TxKind: ...
        @property
        def nonce(self) -> int: ...
        @property
        def fee(self) -> int: ...
        @property
        def signer(self) -> Address: ...
        @property
        def signature(self) -> bytes: ...

    def _validate_common(self) -> None:
        _check(self.kind == self.KIND, f"kind {self.kind} does not match {type(self).__name__}")
        _check(0 <= self.nonce <= nonce_max, f"nonce {self.nonce} is outside 0..{nonce_max}")
        _check_amount("fee", self.fee)
        _check_bytes("signer", self.signer, address_bytes)
        _check_bytes("signature", self.signature, signature_bytes)

    def _verify_signature(self, chain_id: str) -> None:
        _check(
            verify(self.signer, self.signature, chain_id, self.TYPE_TAG, _signed_body(self)),
            "the sender's signature does not verify",
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Transfer(_TxBase):
    TYPE_TAG: ClassVar[str] = "gpumesh/tx/transfer/1"
    KIND: ClassVar[TxKind] = TxKind.TRANSFER
    kind: TxKind = TxKind.TRANSFER
    nonce: int
    fee: int
    recipient: Address
    amount: int
    signer: Address = _UNSIGNED
    signature: bytes = b""

    def validate(self, chain_id: str) -> None:
        """Stateless checks, signature included; raises ``InvalidTransaction``."""
        self._validate_common()
        _check_bytes("recipient", self.recipient, address_bytes)
        _check_amount("amount", self.amount)
        self._verify_signature(chain_id)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Agreement(_TxBase):
    """Opens a trade: sent by the requester, locks ``terms.max_cost`` of its balance."""

    TYPE_TAG: ClassVar[str] = "gpumesh/tx/agreement/1"
    KIND: ClassVar[TxKind] = TxKind.AGREEMENT
    kind: TxKind = TxKind.AGREEMENT
    nonce: int
    fee: int
    terms: AgreementTerms
    signer: Address = _UNSIGNED
    signature: bytes = b""

    def validate(self, chain_id: str) -> None:
        self._validate_common()
        _check(self.signer == self.terms.requester, "an agreement is sent by its requester")
        self.terms.validate(chain_id)
        self._verify_signature(chain_id)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Receipt(_TxBase):
    """Settles a trade: sent by the provider with the requester's ack of its delivery and the
    key that opens the sealed outputs. Pays ``terms.cost(delivery.wall_ms)``, refunds the rest,
    and the trade keeps the roots and the key (so anyone can check the outputs against them)."""

    TYPE_TAG: ClassVar[str] = "gpumesh/tx/receipt/1"
    KIND: ClassVar[TxKind] = TxKind.RECEIPT
    kind: TxKind = TxKind.RECEIPT
    nonce: int
    fee: int
    job_id: JobId
    ack: DeliveryAck
    key: bytes
    signer: Address = _UNSIGNED
    signature: bytes = b""

    @property
    def delivery(self) -> Delivery:
        return self.ack.delivery

    @property
    def wall_ms(self) -> int:
        return self.ack.delivery.wall_ms

    @property
    def exit_status(self) -> int:
        return self.ack.delivery.exit_status

    def validate(self, chain_id: str) -> None:
        self._validate_common()
        _check_bytes("job_id", self.job_id, job_id_bytes)
        _check_bytes("key", self.key, output_key_bytes)
        delivery = self.ack.delivery
        _check(delivery.job_id == self.job_id, "the acked delivery is for another job")
        _check(delivery.signer == self.signer, "the acked delivery is not the sender's")
        self.ack.validate(chain_id)
        self._verify_signature(chain_id)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Refund(_TxBase):
    """Closes a trade still open past its deadline (an abandoned award), sent by anyone: full
    refund to the requester, and the provider is slashed (see ``ledger._state``)."""

    TYPE_TAG: ClassVar[str] = "gpumesh/tx/refund/1"
    KIND: ClassVar[TxKind] = TxKind.REFUND
    kind: TxKind = TxKind.REFUND
    nonce: int
    fee: int
    job_id: JobId
    signer: Address = _UNSIGNED
    signature: bytes = b""

    def validate(self, chain_id: str) -> None:
        self._validate_common()
        _check_bytes("job_id", self.job_id, job_id_bytes)
        self._verify_signature(chain_id)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Cancel(_TxBase):
    """Closes an open trade before any receipt. By the requester: the provider is paid for the
    block time since the trade opened (``terms.cost``), the rest refunded. By the provider:
    full refund, and the provider's ``failed`` count goes up."""

    TYPE_TAG: ClassVar[str] = "gpumesh/tx/cancel/1"
    KIND: ClassVar[TxKind] = TxKind.CANCEL
    kind: TxKind = TxKind.CANCEL
    nonce: int
    fee: int
    job_id: JobId
    signer: Address = _UNSIGNED
    signature: bytes = b""

    def validate(self, chain_id: str) -> None:
        self._validate_common()
        _check_bytes("job_id", self.job_id, job_id_bytes)
        self._verify_signature(chain_id)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Stake(_TxBase):
    """Moves ``amount`` of the sender's balance into its bond."""

    TYPE_TAG: ClassVar[str] = "gpumesh/tx/stake/1"
    KIND: ClassVar[TxKind] = TxKind.STAKE
    kind: TxKind = TxKind.STAKE
    nonce: int
    fee: int
    amount: int
    signer: Address = _UNSIGNED
    signature: bytes = b""

    def validate(self, chain_id: str) -> None:
        self._validate_common()
        _check(1 <= self.amount <= amount_max, f"amount {self.amount} is outside 1..{amount_max}")
        self._verify_signature(chain_id)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Unbond(_TxBase):
    """Releases matured unbonding stake to the balance, then starts unbonding ``amount`` of the
    bond (released ``unbonding_delay_ms`` later); ``amount`` 0 only claims."""

    TYPE_TAG: ClassVar[str] = "gpumesh/tx/unbond/1"
    KIND: ClassVar[TxKind] = TxKind.UNBOND
    kind: TxKind = TxKind.UNBOND
    nonce: int
    fee: int
    amount: int
    signer: Address = _UNSIGNED
    signature: bytes = b""

    def validate(self, chain_id: str) -> None:
        self._validate_common()
        _check_amount("amount", self.amount)
        self._verify_signature(chain_id)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SlashBadKey(_TxBase):
    """Evidence (from anyone) that a settled trade's revealed key does not open one of the
    chunks its provider committed to: the chunk, its claimed plaintext hash and the Merkle proof
    to the trade's ``output_root``. Slashes the provider once per trade."""

    TYPE_TAG: ClassVar[str] = "gpumesh/tx/slash-bad-key/1"
    KIND: ClassVar[TxKind] = TxKind.SLASH_BAD_KEY
    kind: TxKind = TxKind.SLASH_BAD_KEY
    nonce: int
    fee: int
    job_id: JobId
    index: int
    chunk: bytes
    plain_hash: bytes
    proof: tuple[bytes, ...]
    signer: Address = _UNSIGNED
    signature: bytes = b""

    def validate(self, chain_id: str) -> None:
        self._validate_common()
        _check_bytes("job_id", self.job_id, job_id_bytes)
        _check(0 <= self.index < 2**40, f"index {self.index} is out of range")
        _check(
            len(self.chunk) <= sealed_chunk_bytes_max,
            f"chunk is {len(self.chunk)} bytes, more than {sealed_chunk_bytes_max}",
        )
        _check_bytes("plain_hash", self.plain_hash, hash_bytes)
        _check(len(self.proof) <= proof_hashes_max, f"proof has more than {proof_hashes_max}")
        for i, node in enumerate(self.proof):
            _check_bytes(f"proof[{i}]", node, hash_bytes)
        self._verify_signature(chain_id)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SlashOutvoted(_TxBase):
    """Evidence (from anyone) that a provider delivered a result two other providers
    contradict: its signed ``delivery`` for trade X, and two settled trades ``job_y``,
    ``job_z`` of the same requester and group, by two other distinct providers, whose plain
    roots agree with each other and not with the delivery's. Slashes X's provider once."""

    TYPE_TAG: ClassVar[str] = "gpumesh/tx/slash-outvoted/1"
    KIND: ClassVar[TxKind] = TxKind.SLASH_OUTVOTED
    kind: TxKind = TxKind.SLASH_OUTVOTED
    nonce: int
    fee: int
    delivery: Delivery
    job_y: JobId
    job_z: JobId
    signer: Address = _UNSIGNED
    signature: bytes = b""

    def validate(self, chain_id: str) -> None:
        self._validate_common()
        _check_bytes("job_y", self.job_y, job_id_bytes)
        _check_bytes("job_z", self.job_z, job_id_bytes)
        jobs = {self.delivery.job_id, self.job_y, self.job_z}
        _check(len(jobs) == 3, "the outvoted trade and the two others must be three trades")
        self.delivery.validate(chain_id)
        self._verify_signature(chain_id)


Transaction = (
    Transfer | Agreement | Receipt | Refund | Cancel | Stake | Unbond | SlashBadKey | SlashOutvoted
)
TRANSACTION_TYPES: tuple[type[Transaction], ...] = (
    Transfer,
    Agreement,
    Receipt,
    Refund,
    Cancel,
    Stake,
    Unbond,
    SlashBadKey,
    SlashOutvoted,
)


def tx_hash(tx: Transaction) -> TxHash:
    """A transaction's id: SHA-256 of its canonical encoding (signature included)."""
    return TxHash(hash_of(tx))


@dataclasses.dataclass(frozen=True, slots=True)
class Trade:
    """A trade's state on the ledger, from agreement to settlement, refund or cancel."""

    terms: AgreementTerms
    status: TradeStatus
    opened_height: int
    closed_height: int = 0
    paid: int = 0
    """What the provider was paid (settled trades only)."""
    receipt_tx: bytes = b""
    """Hash of the receipt transaction that settled it (settled trades only)."""
    opened_time_ms: int = 0
    """Block time of the agreement: a requester's cancel pays for the time since."""
    slashed: bool = False
    """Whether the provider was already slashed for this trade (once per trade)."""
    output_root: bytes = b""
    """The settling delivery's commitment to the sealed outputs (settled trades only)."""
    plain_root: bytes = b""
    """The settling delivery's commitment to the plaintext outputs (settled trades only)."""
    key: bytes = b""
    """The key that opens the sealed outputs, revealed by the receipt (settled trades only)."""
    output_bytes: int = 0
    """The settled output bundle's size (gives the Merkle trees' shape)."""


@dataclasses.dataclass(frozen=True, slots=True)
class TxResult:
    """What applying one transaction of a block did: ``error`` is empty when it succeeded."""

    tx_hash: TxHash
    ok: bool
    error: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class BlockHeader:
    """What a block's hash covers; ``tx_root`` commits to the transactions."""

    chain_id: str
    height: int
    prev_hash: bytes
    time_ms: int
    proposer: Address
    tx_root: bytes
    state_root: bytes
    """The state root *after* applying this block."""


@dataclasses.dataclass(frozen=True, slots=True)
class Block:
    chain_id: str
    height: int
    prev_hash: bytes
    time_ms: int
    proposer: Address
    tx_root: bytes
    state_root: bytes
    transactions: tuple[Transaction, ...]

    def header(self) -> BlockHeader:
        return BlockHeader(
            self.chain_id,
            self.height,
            self.prev_hash,
            self.time_ms,
            self.proposer,
            self.tx_root,
            self.state_root,
        )

    def hash(self) -> BlockHash:
        """The block id: SHA-256 of the canonical header."""
        return BlockHash(hash_of(self.header()))


@dataclasses.dataclass(frozen=True, slots=True)
class CommitSig:
    validator: bytes
    signature: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Commit:
    """The certificate consensus produces for a block; the ledger stores it, never checks it."""

    height: int
    round: int
    block_hash: bytes
    signatures: tuple[CommitSig, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Validator:
    address: Address
    power: int
