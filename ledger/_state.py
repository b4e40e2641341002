"""The pure, deterministic state transition and the state root.

``apply_block(state, block)`` checks the block against the state (chain, height, parent, time,
transaction root), applies each transaction in order and checks the resulting state root. A
transaction that cannot be included (bad signature, wrong nonce, fee below ``params.fee_min``
or more than the sender's balance) is recorded as failed and changes nothing; one that can but
whose body fails is recorded as failed, pays its fee and uses up its nonce (so it can never be
replayed). Nothing here does I/O or reads a clock.

The state root is a two-level hash: every account and trade is a leaf
``sha256(key || canonical value)``; leaves fall into 256 buckets by the first byte of their id
(addresses and job ids are uniformly distributed); a bucket's hash is the hash of its leaves in
key order, and the root is the hash of the 256 bucket hashes. A block recomputes only the
buckets it touched, so the root costs O(touched * bucket size), not O(state).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ledger._codec import digest, encode
from ledger._keys import Address
from ledger._outputs import chunk_count, chunk_is_bad, merkle_verify, output_leaf
from ledger.exceptions import InvalidBlock, InvalidTransaction
from ledger.types import (
    NO_GROUP,
    Account,
    Agreement,
    Block,
    BlockHash,
    Cancel,
    ChainParams,
    JobId,
    Receipt,
    Refund,
    SlashBadKey,
    SlashOutvoted,
    Stake,
    Trade,
    TradeStatus,
    Transaction,
    Transfer,
    TxHash,
    TxResult,
    Unbond,
    Validator,
    amount_max,
    block_transactions_max,
    tx_hash,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Container, Iterable, Mapping, Sequence

bucket_count = 256
_NO_PARAMS = ChainParams()
"""The rules of a genesis that names none (frozen, so one instance is shared)."""
_EMPTY_BUCKET = digest(b"")
_ACCOUNT_PREFIX = b"a"
_TRADE_PREFIX = b"t"


def _leaf(key: bytes, value: Account | Trade) -> bytes:
    return digest(key + encode(value))


def _bucket_hash(bucket: Mapping[bytes, bytes]) -> bytes:
    if not bucket:
        return _EMPTY_BUCKET
    return digest(b"".join(bucket[k] for k in sorted(bucket)))


class LedgerState:
    """One immutable snapshot of the ledger: accounts, trades, the last block, the root.

    Treat it as immutable: ``apply_block`` returns a new one and shares unchanged parts with
    the old one (the mappings are copied, the leaf buckets only where a block touched them).
    """

    __slots__ = (
        "_bucket_hashes",
        "_buckets",
        "accounts",
        "block_hash",
        "chain_id",
        "height",
        "params",
        "root",
        "supply",
        "time_ms",
        "trades",
        "validators",
    )

    def __init__(
        self,
        *,
        chain_id: str,
        height: int,
        block_hash: bytes,
        time_ms: int,
        accounts: dict[Address, Account],
        trades: dict[JobId, Trade],
        validators: tuple[Validator, ...],
        supply: int,
        params: ChainParams = _NO_PARAMS,
        _buckets: tuple[dict[bytes, bytes], ...] | None = None,
        _bucket_hashes: tuple[bytes, ...] | None = None,
    ) -> None:
        self.chain_id = chain_id
        self.height = height
        self.block_hash = block_hash
        self.time_ms = time_ms
        self.accounts: Mapping[Address, Account] = accounts
        self.trades: Mapping[JobId, Trade] = trades
        self.validators = validators
        self.supply = supply
        self.params = params
        """The chain's rules from genesis (fees, bonds, slashing, evidence window)."""
        if _buckets is None or _bucket_hashes is None:
            buckets: list[dict[bytes, bytes]] = [{} for _ in range(bucket_count)]
            for address, account in accounts.items():
                key = _ACCOUNT_PREFIX + address
                buckets[address[0]][key] = _leaf(key, account)
            for job_id, trade in trades.items():
                key = _TRADE_PREFIX + job_id
                buckets[job_id[0]][key] = _leaf(key, trade)
            _buckets = tuple(buckets)
            _bucket_hashes = tuple(_bucket_hash(b) for b in buckets)
        self._buckets = _buckets
        self._bucket_hashes = _bucket_hashes
        self.root = digest(b"".join(_bucket_hashes))

    def account(self, address: bytes) -> Account:
        """The account at ``address``; an address never seen is an empty account."""
        return self.accounts.get(Address(address)) or _EMPTY_ACCOUNT

    def total_supply(self) -> int:
        """Balances, escrow, bonds and unbonding stake over every account: constant after
        genesis."""
        return sum(a.total() for a in self.accounts.values())

    def _with_changes(
        self,
        *,
        height: int,
        block_hash: bytes,
        time_ms: int,
        accounts: Mapping[Address, Account],
        trades: Mapping[JobId, Trade | None],
    ) -> LedgerState:
        new_accounts = dict(self.accounts)
        new_accounts.update(accounts)
        new_trades = dict(self.trades)
        buckets = list(self._buckets)
        copied: set[int] = set()

        def bucket(index: int) -> dict[bytes, bytes]:
            if index not in copied:
                buckets[index] = dict(buckets[index])
                copied.add(index)
            return buckets[index]

        for address, account in accounts.items():
            key = _ACCOUNT_PREFIX + address
            bucket(address[0])[key] = _leaf(key, account)
        for job_id, maybe_trade in trades.items():
            key = _TRADE_PREFIX + job_id
            if maybe_trade is None:
                del new_trades[job_id]
                bucket(job_id[0]).pop(key, None)
            else:
                new_trades[job_id] = maybe_trade
                bucket(job_id[0])[key] = _leaf(key, maybe_trade)
        hashes = list(self._bucket_hashes)
        for index in copied:
            hashes[index] = _bucket_hash(buckets[index])
        return LedgerState(
            chain_id=self.chain_id,
            height=height,
            block_hash=block_hash,
            time_ms=time_ms,
            accounts=new_accounts,
            trades=new_trades,
            validators=self.validators,
            supply=self.supply,
            params=self.params,
            _buckets=tuple(buckets),
            _bucket_hashes=tuple(hashes),
        )


_EMPTY_ACCOUNT = Account()


def state_root(state: LedgerState) -> bytes:
    """The 32-byte root over every account and trade; any node can recompute it."""
    return state.root


def tx_root(hashes: Iterable[bytes]) -> bytes:
    """The transactions' commitment in a header: SHA-256 of their hashes in block order."""
    return digest(b"".join(hashes))


@dataclasses.dataclass(frozen=True, slots=True)
class BlockResults:
    """What ``apply_block`` did: one result per transaction and what the store must rewrite."""

    tx_results: tuple[TxResult, ...]
    accounts: Mapping[Address, Account]
    """Every account the block changed, with its new value."""
    trades: Mapping[JobId, Trade]
    """Every trade the block opened or closed, with its new value (the store keeps them all)."""
    removed_trades: frozenset[JobId]
    """Closed trades dropped from the state because their deadline passed."""
    fees: int


class _Overlay:
    """Writes of the block so far over the parent state; one transaction's writes are staged
    separately and merged only when the whole transaction succeeded."""

    __slots__ = ("accounts", "base", "trades")

    def __init__(self, base: LedgerState) -> None:
        self.base = base
        self.accounts: dict[Address, Account] = {}
        self.trades: dict[JobId, Trade | None] = {}

    def account(self, address: Address) -> Account:
        found = self.accounts.get(address)
        if found is not None:
            return found
        return self.base.accounts.get(address) or _EMPTY_ACCOUNT

    def trade(self, job_id: JobId) -> Trade | None:
        if job_id in self.trades:
            return self.trades[job_id]
        return self.base.trades.get(job_id)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidTransaction(message)


def _open_trade(view: _Overlay, job_id: JobId) -> Trade:
    trade = view.trade(job_id)
    _require(trade is not None, f"no trade for job {job_id.hex()}")
    assert trade is not None
    _require(trade.status is TradeStatus.OPEN, f"trade is already {trade.status.name.lower()}")
    return trade


def _release(trade: Trade, requester: Account, refund: int) -> Account:
    """The requester's account with the trade's escrow unlocked and ``refund`` of it returned."""
    max_cost = trade.terms.max_cost
    assert requester.locked >= max_cost, "escrow accounting broke: locked < a trade's max cost"
    return dataclasses.replace(
        requester, balance=requester.balance + refund, locked=requester.locked - max_cost
    )


def _charge(view: _Overlay, tx: Transaction, *, check_nonce: bool) -> Account:
    """The sender after paying ``tx``'s fee and using up its nonce, or ``InvalidTransaction``
    when the transaction cannot be included at all (wrong nonce, fee below the minimum, a fee
    the sender cannot pay). Only a transaction that passes this may change the state."""
    sender = view.account(tx.signer)
    # Plain ifs, not _require: the messages are built only when a check fails (this runs for
    # every transaction, and formatting four messages cost more than the checks).
    nonce = sender.nonce
    if check_nonce and tx.nonce != nonce:
        if tx.nonce < nonce:
            raise InvalidTransaction(
                f"nonce {tx.nonce} was already used (account nonce is {nonce})"
            )
        raise InvalidTransaction(f"nonce {tx.nonce} is out of order (account nonce is {nonce})")
    fee = tx.fee
    fee_min = view.base.params.fee_min
    if fee < fee_min:
        raise InvalidTransaction(f"fee {fee} is below the minimum fee {fee_min}")
    if sender.balance < fee:
        raise InvalidTransaction(f"balance {sender.balance} cannot pay the fee {fee}")
    # Built directly: dataclasses.replace costs more than the rest of a transfer's charge.
    return Account(
        sender.balance - fee,
        sender.locked,
        sender.nonce + 1,
        sender.earned,
        sender.bonded,
        sender.unbonding,
        sender.unbond_release_ms,
        sender.completed,
        sender.failed,
        sender.slashed,
    )


def _with_balance(account: Account, balance: int) -> Account:
    """``account`` with a new balance, built directly (the transfer path is the hot one)."""
    return Account(
        balance,
        account.locked,
        account.nonce,
        account.earned,
        account.bonded,
        account.unbonding,
        account.unbond_release_ms,
        account.completed,
        account.failed,
        account.slashed,
    )


def _slash(provider: Account, amount: int) -> tuple[Account, int]:
    """Take up to ``amount`` from the provider's stake, bond first, then unbonding stake (it
    stays slashable until released): the new account (``slashed`` counted) and what was taken."""
    taken = min(amount, provider.bonded + provider.unbonding)
    from_bond = min(taken, provider.bonded)
    return (
        dataclasses.replace(
            provider,
            bonded=provider.bonded - from_bond,
            unbonding=provider.unbonding - (taken - from_bond),
            slashed=provider.slashed + 1,
        ),
        taken,
    )


def _body(
    view: _Overlay,
    tx: Transaction,
    txh: TxHash,
    accounts: dict[Address, Account],
    trades: dict[JobId, Trade],
    *,
    height: int,
    time_ms: int,
) -> None:
    """What ``tx`` does beyond its fee, written into ``accounts`` and ``trades`` (which already
    hold the charged sender); raises ``InvalidTransaction`` when the body does not apply, and
    then the caller drops everything but the charge."""
    sender_address = tx.signer
    params = view.base.params

    def current(address: Address) -> Account:
        return accounts.get(address) or view.account(address)

    sender = accounts[sender_address]
    if isinstance(tx, Transfer):
        amount = tx.amount
        if sender.balance < amount:
            raise InvalidTransaction(f"balance {sender.balance} < amount {amount}")
        accounts[sender_address] = _with_balance(sender, sender.balance - amount)
        recipient = current(tx.recipient)
        accounts[tx.recipient] = _with_balance(recipient, recipient.balance + amount)
    elif isinstance(tx, Agreement):
        terms = tx.terms
        existing = view.trade(terms.job_id)
        _require(
            existing is None
            or (
                existing.status is not TradeStatus.OPEN
                and existing.terms.deadline_ms + params.evidence_window_ms < time_ms
            ),
            f"job {terms.job_id.hex()} already has a trade",
        )
        _require(time_ms < terms.deadline_ms, "the deadline has already passed")
        horizon = params.deadline_horizon_ms()
        _require(
            terms.deadline_ms - time_ms <= horizon,
            f"the deadline is more than {horizon} ms ahead",
        )
        bonded = current(terms.provider).bonded
        _require(
            bonded >= params.provider_bond_min,
            f"the provider's bond {bonded} is below the minimum {params.provider_bond_min}",
        )
        max_cost = terms.max_cost
        _require(sender.balance >= max_cost, f"balance {sender.balance} < max_cost {max_cost}")
        accounts[sender_address] = dataclasses.replace(
            sender, balance=sender.balance - max_cost, locked=sender.locked + max_cost
        )
        trades[terms.job_id] = Trade(
            terms=terms, status=TradeStatus.OPEN, opened_height=height, opened_time_ms=time_ms
        )
    elif isinstance(tx, Receipt):
        trade = _open_trade(view, tx.job_id)
        terms = trade.terms
        _require(sender_address == terms.provider, "only the trade's provider may send a receipt")
        _require(time_ms <= terms.deadline_ms, "the deadline passed before the receipt")
        _require(tx.ack.signer == terms.requester, "the delivery ack is not the requester's")
        delivery = tx.ack.delivery
        cost = terms.cost(delivery.wall_ms, params.charge_min)
        _pay(accounts, current, trade, cost, completed=1)
        trades[tx.job_id] = dataclasses.replace(
            trade,
            status=TradeStatus.SETTLED,
            closed_height=height,
            paid=cost,
            receipt_tx=txh,
            output_root=delivery.output_root,
            plain_root=delivery.plain_root,
            key=tx.key,
            output_bytes=delivery.output_bytes,
        )
    elif isinstance(tx, Refund):
        trade = _open_trade(view, tx.job_id)
        terms = trade.terms
        _require(time_ms > terms.deadline_ms, "a refund is only valid after the trade's deadline")
        requester_address = terms.requester
        accounts[requester_address] = _release(trade, current(requester_address), terms.max_cost)
        # The award was abandoned: the provider neither settled nor gave it up in time. It
        # pays once per trade (outvote evidence may have slashed it for this trade already).
        provider = current(terms.provider)
        if not trade.slashed:
            provider, taken = _slash(provider, params.slash_amount)
            accounts[terms.provider] = provider
            _share_slash(
                accounts, current, taken, requester_address, sender_address, terms.provider
            )
        provider = current(terms.provider)
        accounts[terms.provider] = dataclasses.replace(provider, failed=provider.failed + 1)
        trades[tx.job_id] = dataclasses.replace(
            trade, status=TradeStatus.REFUNDED, closed_height=height, slashed=True
        )
    elif isinstance(tx, Cancel):
        trade = _open_trade(view, tx.job_id)
        terms = trade.terms
        if sender_address == terms.requester:
            # Pays for the time the provider held the job, however the requester got what
            # it wanted (it cannot have the outputs: they are sealed until a receipt).
            cost = terms.cost(time_ms - trade.opened_time_ms, params.charge_min)
            _pay(accounts, current, trade, cost, completed=0)
        else:
            _require(sender_address == terms.provider, "only the requester or provider may cancel")
            cost = 0
            accounts[terms.requester] = _release(trade, current(terms.requester), terms.max_cost)
            provider = current(sender_address)
            accounts[sender_address] = dataclasses.replace(provider, failed=provider.failed + 1)
        trades[tx.job_id] = dataclasses.replace(
            trade, status=TradeStatus.CANCELLED, closed_height=height, paid=cost
        )
    elif isinstance(tx, Stake):
        amount = tx.amount
        _require(sender.balance >= amount, f"balance {sender.balance} < stake {amount}")
        accounts[sender_address] = dataclasses.replace(
            sender, balance=sender.balance - amount, bonded=sender.bonded + amount
        )
    elif isinstance(tx, Unbond):
        account = sender
        claimed = account.unbonding > 0 and time_ms >= account.unbond_release_ms
        if claimed:
            account = dataclasses.replace(
                account,
                balance=account.balance + account.unbonding,
                unbonding=0,
                unbond_release_ms=0,
            )
        amount = tx.amount
        if amount:
            _require(account.bonded >= amount, f"bond {account.bonded} < unbond {amount}")
            account = dataclasses.replace(
                account,
                bonded=account.bonded - amount,
                unbonding=account.unbonding + amount,
                unbond_release_ms=time_ms + params.unbonding_delay_ms,
            )
        else:
            _require(claimed, "no unbonding stake has matured yet")
        accounts[sender_address] = account
    elif isinstance(tx, SlashBadKey):
        trade = _kept_trade(view, tx.job_id, time_ms, params.evidence_window_ms)
        _require(trade.status is TradeStatus.SETTLED, "only a settled trade revealed a key")
        leaf = output_leaf(tx.index, tx.chunk, tx.plain_hash)
        _require(
            merkle_verify(
                trade.output_root, leaf, tx.index, chunk_count(trade.output_bytes), tx.proof
            ),
            "the chunk's proof does not lead to the trade's output root",
        )
        _require(
            chunk_is_bad(tx.job_id, trade.key, tx.index, tx.chunk, tx.plain_hash),
            "the revealed key opens the chunk to its committed plaintext",
        )
        _slash_for(accounts, current, trades, trade, tx.job_id, sender_address, params)
    elif isinstance(tx, SlashOutvoted):
        delivery = tx.delivery
        trade = _kept_trade(view, delivery.job_id, time_ms, params.evidence_window_ms)
        terms = trade.terms
        _require(delivery.signer == terms.provider, "the delivery is not the trade's provider's")
        _require(terms.group_id != NO_GROUP, "the trade belongs to no group")
        providers = {terms.provider}
        roots = set()
        for job_id in (tx.job_y, tx.job_z):
            other = view.trade(job_id)
            _require(other is not None, f"no trade for job {job_id.hex()}")
            assert other is not None
            _require(other.status is TradeStatus.SETTLED, "the outvoting trades must be settled")
            _require(
                other.terms.requester == terms.requester and other.terms.group_id == terms.group_id,
                "the outvoting trades are not of the same requester and group",
            )
            _require(other.terms.provider not in providers, "the three providers must differ")
            providers.add(other.terms.provider)
            roots.add(other.plain_root)
        _require(len(roots) == 1, "the two outvoting trades disagree with each other")
        _require(delivery.plain_root not in roots, "the delivery agrees with the others")
        _slash_for(accounts, current, trades, trade, delivery.job_id, sender_address, params)
    else:  # pragma: no cover - the codec only builds the kinds above
        raise InvalidTransaction(f"unknown transaction type {type(tx).__name__}")


def _kept_trade(view: _Overlay, job_id: JobId, time_ms: int, window_ms: int) -> Trade:
    """A trade slash evidence may still name: in the state, within its evidence window, and
    not slashed for yet (a provider pays once per trade)."""
    trade = view.trade(job_id)
    _require(trade is not None, f"no trade for job {job_id.hex()} (or its evidence window passed)")
    assert trade is not None
    _require(
        time_ms <= trade.terms.deadline_ms + window_ms, "the trade's evidence window has passed"
    )
    _require(not trade.slashed, "the provider was already slashed for this trade")
    return trade


def _slash_for(
    accounts: dict[Address, Account],
    current: Callable[[Address], Account],
    trades: dict[JobId, Trade],
    trade: Trade,
    job_id: JobId,
    sender: Address,
    params: ChainParams,
) -> None:
    terms = trade.terms
    provider, taken = _slash(current(terms.provider), params.slash_amount)
    accounts[terms.provider] = provider
    _share_slash(accounts, current, taken, terms.requester, sender, terms.provider)
    trades[job_id] = dataclasses.replace(trade, slashed=True)


def _pay(
    accounts: dict[Address, Account],
    current: Callable[[Address], Account],
    trade: Trade,
    cost: int,
    *,
    completed: int,
) -> None:
    """Close ``trade``'s escrow: ``cost`` to the provider, the rest back to the requester."""
    terms = trade.terms
    assert 0 <= cost <= terms.max_cost, "cost is capped by the escrow"
    accounts[terms.requester] = _release(trade, current(terms.requester), terms.max_cost - cost)
    provider = current(terms.provider)
    accounts[terms.provider] = dataclasses.replace(
        provider,
        balance=provider.balance + cost,
        # Saturate: earnings are a statistic, not money; they must not overflow the codec.
        earned=min(amount_max, provider.earned + cost),
        completed=provider.completed + completed,
    )


def _share_slash(
    accounts: dict[Address, Account],
    current: Callable[[Address], Account],
    taken: int,
    requester: Address,
    sender: Address,
    provider: Address,
) -> None:
    """Half of a slash to the harmed requester, half to whoever brought the evidence; all of
    it to the requester when it sent the evidence itself or the provider did (a provider must
    not get back part of its own slash)."""
    to_sender = 0 if sender in (requester, provider) else taken // 2
    harmed = current(requester)
    accounts[requester] = _with_balance(harmed, harmed.balance + taken - to_sender)
    if to_sender:
        reporter = current(sender)
        accounts[sender] = _with_balance(reporter, reporter.balance + to_sender)


def _transition(
    view: _Overlay,
    tx: Transaction,
    txh: TxHash,
    *,
    height: int,
    time_ms: int,
    check_nonce: bool = True,
) -> tuple[dict[Address, Account], dict[JobId, Trade]]:
    """The writes ``tx`` makes when it applies in full, or ``InvalidTransaction`` when it
    would not (cannot be included, or its body fails); writes nothing to ``view``. What the
    mempool admits and reaps: it never hands a proposer a transaction that would fail."""
    accounts = {tx.signer: _charge(view, tx, check_nonce=check_nonce)}
    trades: dict[JobId, Trade] = {}
    _body(view, tx, txh, accounts, trades, height=height, time_ms=time_ms)
    return accounts, trades


def check_transaction(
    state: LedgerState, tx: Transaction, *, check_nonce: bool = True, body: bool = True
) -> None:
    """Stateless then stateful checks of ``tx`` against ``state`` as if it were in the next
    block at the state's time; raises ``InvalidTransaction`` with the reason.

    With ``body=False`` only whether the transaction can be included at all: valid, the right
    nonce (unless ``check_nonce=False``), a fee at least ``params.fee_min`` that the sender can
    pay. A block records such a transaction as failed and changes nothing, so a mempool must
    refuse it; one that passes this but whose body fails pays its fee and uses up its nonce.
    """
    tx.validate(state.chain_id)
    view = _Overlay(state)
    if not body:
        _charge(view, tx, check_nonce=check_nonce)
        return
    _transition(
        view,
        tx,
        tx_hash(tx),
        height=state.height + 1,
        time_ms=state.time_ms,
        check_nonce=check_nonce,
    )


def _check_header(state: LedgerState, block: Block) -> None:
    if block.chain_id != state.chain_id:
        raise InvalidBlock(f"block is for chain {block.chain_id!r}, not {state.chain_id!r}")
    if block.height != state.height + 1:
        raise InvalidBlock(f"block height {block.height} does not follow {state.height}")
    if block.prev_hash != state.block_hash:
        raise InvalidBlock("block's previous hash is not the hash of the last block")
    if block.time_ms <= state.time_ms:
        raise InvalidBlock(f"block time {block.time_ms} is not after {state.time_ms}")
    if len(block.proposer) != 32:
        raise InvalidBlock("block proposer is not a 32-byte address")
    if len(block.transactions) > block_transactions_max:
        raise InvalidBlock(f"block has more than {block_transactions_max} transactions")


def _apply(
    state: LedgerState, block: Block, *, verify_signatures: bool, verified: Container[bytes] = ()
) -> tuple[LedgerState, BlockResults, Sequence[TxHash]]:
    _check_header(state, block)
    view = _Overlay(state)
    time_ms = block.time_ms
    height = block.height
    # Closed trades stay in the state until a block's time is past their deadline plus the
    # evidence window, so their job ids (and the provider's signed terms) cannot be replayed
    # before then, and slash evidence against them can still be judged; after it an
    # agreement over those terms is invalid anyway. The rule depends only on the trades and
    # block times, so the store rebuilds the same set from its trade table (see _store).
    removed = frozenset(
        job_id
        for job_id, trade in state.trades.items()
        if trade.status is not TradeStatus.OPEN
        and trade.terms.deadline_ms + state.params.evidence_window_ms < time_ms
    )
    for job_id in removed:
        view.trades[job_id] = None
    results: list[TxResult] = []
    hashes: list[TxHash] = []
    fees = 0
    for tx in block.transactions:
        txh = tx_hash(tx)
        hashes.append(txh)
        try:
            if verify_signatures and txh not in verified:
                tx.validate(state.chain_id)
            charged = _charge(view, tx, check_nonce=True)
        except InvalidTransaction as exc:
            # Cannot be included: skipped, changes nothing (a mempool never admits these).
            results.append(TxResult(txh, False, str(exc)))
            continue
        fees += tx.fee
        accounts = {tx.signer: charged}
        trades: dict[JobId, Trade] = {}
        try:
            _body(view, tx, txh, accounts, trades, height=height, time_ms=time_ms)
        except InvalidTransaction as exc:
            # The body failed: the fee is paid and the nonce used up, so it cannot be replayed.
            view.accounts[tx.signer] = charged
            results.append(TxResult(txh, False, str(exc)))
            continue
        view.accounts.update(accounts)
        view.trades.update(trades)
        results.append(TxResult(txh, True))
    if fees:
        proposer = view.account(block.proposer)
        view.accounts[block.proposer] = dataclasses.replace(
            proposer, balance=proposer.balance + fees
        )
    changed_trades = {k: v for k, v in view.trades.items() if v is not None}
    new_state = state._with_changes(
        height=height,
        block_hash=block.hash(),
        time_ms=time_ms,
        accounts=view.accounts,
        trades=view.trades,
    )
    block_results = BlockResults(
        tx_results=tuple(results),
        accounts=dict(view.accounts),
        trades=changed_trades,
        removed_trades=removed,
        fees=fees,
    )
    return new_state, block_results, hashes


def apply_block(
    state: LedgerState,
    block: Block,
    *,
    verify_signatures: bool = True,
    verified: Container[bytes] = (),
) -> tuple[LedgerState, BlockResults]:
    """Apply ``block`` to ``state``: a new state and one result per transaction.

    Raises ``InvalidBlock`` (and changes nothing) when the block does not follow the state or
    its transaction root or state root is wrong.

    Signature checks are most of the cost. ``verified`` holds hashes of transactions that
    already passed ``validate()`` for this chain (pass the ``Mempool``: it contains exactly
    the ones it admitted); a tx hash covers every field and the signature, so those are
    skipped safely. ``verify_signatures=False`` skips them all, for a caller replaying blocks
    it already applied once (its own store).
    """
    new_state, results, hashes = _apply(
        state, block, verify_signatures=verify_signatures, verified=verified
    )
    if tx_root(hashes) != block.tx_root:
        raise InvalidBlock("block's transaction root does not match its transactions")
    if new_state.root != block.state_root:
        raise InvalidBlock(
            f"block's state root {block.state_root.hex()} != computed {new_state.root.hex()}"
        )
    return new_state, results


def build_block(
    state: LedgerState,
    height: int,
    prev_hash: bytes,
    time_ms: int,
    proposer: bytes,
    txs: Sequence[Transaction],
    *,
    verified: Container[bytes] = (),
) -> Block:
    """The block a proposer publishes: ``txs`` in order, with the correct roots filled in.

    Transactions that fail are kept and recorded as failed when the block is applied; a
    proposer should pass what ``Mempool.reap`` gave it, which already passed every check,
    and ``verified=mempool`` so their signatures are not checked a second time.
    """
    draft = Block(
        chain_id=state.chain_id,
        height=height,
        prev_hash=prev_hash,
        time_ms=time_ms,
        proposer=Address(bytes(proposer)),
        tx_root=b"",
        state_root=b"",
        transactions=tuple(txs),
    )
    new_state, _, hashes = _apply(state, draft, verify_signatures=True, verified=verified)
    return dataclasses.replace(draft, tx_root=tx_root(hashes), state_root=new_state.root)


def genesis_state(
    chain_id: str,
    genesis_hash: BlockHash,
    time_ms: int,
    balances: Mapping[Address, int],
    validators: tuple[Validator, ...],
    params: ChainParams = _NO_PARAMS,
    bonds: Mapping[Address, int] | None = None,
) -> LedgerState:
    bonds = bonds or {}
    accounts = {
        address: Account(balance=balance, bonded=bonds.get(address, 0))
        for address, balance in balances.items()
    }
    supply = sum(a.total() for a in accounts.values())
    return LedgerState(
        chain_id=chain_id,
        height=0,
        block_hash=genesis_hash,
        time_ms=time_ms,
        accounts=accounts,
        trades={},
        validators=validators,
        supply=supply,
        params=params,
    )
