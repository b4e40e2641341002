"""The real ledger against a slow, obviously correct reference model.

Random transfers, agreements, receipts (some revealing a wrong key), refunds, cancels, stakes,
unbonds and bad-key slash evidence (valid and invalid: wrong nonces, fees below the minimum,
wrong senders, overspends, unbonded providers, early refunds, late receipts, unbonds before
they mature, evidence against honest keys or twice against one trade) go through
``build_block``, ``apply_block`` and a ``MemoryStore``; the model applies the rules below with
plain dicts. They must agree on every transaction's outcome (and whether it paid its fee),
every account field and the total supply.
"""

from __future__ import annotations

import dataclasses
import math

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import ledger
from ledger import testing as factory
from ledger.types import deadline_horizon_ms_max

FIELDS = [f.name for f in dataclasses.fields(ledger.Account)]

KEYS = [factory.key_for(i, "model") for i in range(5)]
START_BALANCE = 10_000
START_BONDS = [1_000, 800, 600, 1_000, 0]
FEE_MIN = 1
PARAMS = ledger.ChainParams(
    fee_min=FEE_MIN,
    provider_bond_min=500,
    unbonding_delay_ms=200_000,
    charge_min=3,
    slash_amount=700,
    evidence_window_ms=5_000,
)
HORIZON_MS = min(deadline_horizon_ms_max, PARAMS.unbonding_delay_ms - PARAMS.evidence_window_ms)
SUPPLY = START_BALANCE * len(KEYS) + sum(START_BONDS)
pending_max = 4
"""Transactions per block: small blocks keep one failure from failing a sender's whole queue."""


@dataclasses.dataclass
class ModelTrade:
    requester: int
    provider: int
    price: int
    gpus: int
    max_cost: int
    deadline_ms: int
    opened_ms: int
    status: str = "open"
    bad_key: bool = False
    """Settled with a key that does not open the sealed outputs."""
    slashed: bool = False


@dataclasses.dataclass
class Pending:
    kind: str
    sender: int
    nonce: int
    fee: int
    tx: ledger.Transaction
    args: dict[str, int]


class LedgerVersusModel(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.genesis = dataclasses.replace(
            factory.funded_genesis(KEYS, START_BALANCE, params=PARAMS),
            accounts=tuple(
                ledger.GenesisAccount(k.address, START_BALANCE, bond)
                for k, bond in zip(KEYS, START_BONDS, strict=True)
            ),
        )
        self.state = self.genesis.initial_state()
        self.store = ledger.MemoryStore()
        self.acct = {
            i: dict.fromkeys(FIELDS, 0) | {"balance": START_BALANCE, "bonded": START_BONDS[i]}
            for i in range(len(KEYS))
        }
        self.trades: dict[int, ModelTrade] = {}
        self.forgotten: dict[int, ModelTrade] = {}
        """Closed trades the state dropped (the store keeps them)."""
        self.time_ms = self.genesis.genesis_time_ms
        self.pending: list[Pending] = []
        self.pending_count = dict.fromkeys(range(len(KEYS)), 0)
        self.next_job = 0

    def _has_open_trade(self) -> bool:
        return any(t.status == "open" for t in self.trades.values())

    def _draw_job(self, data: st.DataObject) -> int:
        """Mostly an open trade's job, sometimes any job ever named (closed or never opened)."""
        open_jobs = sorted(j for j, t in self.trades.items() if t.status == "open")
        if open_jobs and data.draw(st.integers(0, 4), label="pick open") > 0:
            return data.draw(st.sampled_from(open_jobs), label="job")
        return data.draw(st.integers(0, self.next_job - 1), label="job")

    # -- building transactions ----------------------------------------------------------------

    def _nonce_for(self, sender: int, skew: int) -> int:
        """The nonce the sender would use next; ``skew`` makes replays and gaps on purpose."""
        expected = self.acct[sender]["nonce"] + self.pending_count[sender]
        return max(0, expected + skew)

    def _queue(
        self, kind: str, sender: int, nonce: int, fee: int, tx: ledger.Transaction, **args: int
    ) -> None:
        self.pending.append(Pending(kind, sender, nonce, fee, tx, args))
        self.pending_count[sender] += 1

    skews = st.sampled_from([0] * 14 + [-1, 1])
    accounts = st.integers(0, len(KEYS) - 1)
    mostly = st.sampled_from([True, True, True, False])
    fees = st.sampled_from([1, 1, 1, 2, 7, 0])

    @rule(
        sender=accounts,
        recipient=accounts,
        amount=st.integers(0, 3_000) | st.integers(0, 12_000),
        fee=fees,
        skew=skews,
    )
    def transfer(self, sender: int, recipient: int, amount: int, fee: int, skew: int) -> None:
        nonce = self._nonce_for(sender, skew)
        tx = factory.transfer(KEYS[sender], nonce, KEYS[recipient].address, amount, fee=fee)
        self._queue("transfer", sender, nonce, fee, tx, recipient=recipient, amount=amount)

    @precondition(lambda self: len(self.pending) < pending_max)
    @rule(
        requester=accounts,
        provider_offset=st.sampled_from([1, 2, 3, 4] * 3 + [0]),
        price=st.integers(0, 50),
        gpus=st.integers(0, 4),
        max_cost=st.integers(0, 4_000),
        deadline_offset=st.integers(20_000, 250_000) | st.integers(-1_000, 3_000),
        fee=fees,
        skew=skews,
        reuse=st.sampled_from([False] * 5 + [True]),
    )
    def agreement(
        self,
        requester: int,
        provider_offset: int,
        price: int,
        gpus: int,
        max_cost: int,
        deadline_offset: int,
        fee: int,
        skew: int,
        reuse: bool,
    ) -> None:
        provider = (requester + provider_offset) % len(KEYS)  # offset 0: the same account
        if reuse and self.trades:
            job = max(self.trades)  # a job id that already has a trade
        else:
            job = self.next_job
            self.next_job += 1
        nonce = self._nonce_for(requester, skew)
        deadline = self.time_ms + deadline_offset
        tx = factory.agreement(
            KEYS[requester],
            KEYS[provider],
            nonce,
            factory.job_id_for(job),
            price_per_gpu_second=price,
            gpus=gpus,
            max_cost=max_cost,
            deadline_ms=deadline,
            fee=fee,
        )
        self._queue(
            "agreement",
            requester,
            nonce,
            fee,
            tx,
            job=job,
            provider=provider,
            price=price,
            gpus=gpus,
            max_cost=max_cost,
            deadline=deadline,
        )

    @precondition(lambda self: self._has_open_trade() and len(self.pending) < pending_max)
    @rule(data=st.data(), wall_ms=st.integers(0, 300_000), fee=fees, skew=skews, honest=mostly)
    def receipt(self, data: st.DataObject, wall_ms: int, fee: int, skew: int, honest: bool) -> None:
        bad_key = data.draw(st.sampled_from([False] * 3 + [True]), label="bad key")
        job = self._draw_job(data)
        trade = self.trades.get(job)
        sender = trade.provider if honest and trade else data.draw(self.accounts, label="who")
        nonce = self._nonce_for(sender, skew)
        requester = trade.requester if trade else data.draw(self.accounts, label="acker")
        tx = factory.receipt(
            KEYS[sender],
            nonce,
            factory.job_id_for(job),
            wall_ms=wall_ms,
            fee=fee,
            requester=KEYS[requester],
            key=bytes(32) if bad_key else None,
        )
        self._queue("receipt", sender, nonce, fee, tx, job=job, wall_ms=wall_ms, bad_key=bad_key)

    @precondition(lambda self: self.trades and len(self.pending) < pending_max)
    @rule(data=st.data(), sender=accounts, fee=fees, index=st.sampled_from([0, 0, 1, 2]))
    def slash_bad_key(self, data: st.DataObject, sender: int, fee: int, index: int) -> None:
        """Bad-key evidence against any trade still in the state (settled or not, honest
        key or not): only a settled, bad-key, not yet slashed one may be slashed."""
        job = data.draw(st.sampled_from(sorted(self.trades)), label="evidence job")
        job_id = factory.job_id_for(job)
        _, chunks, _, _, plain_hashes = factory.sealed_outputs(job_id)
        index = min(index, len(chunks) - 1)
        nonce = self._nonce_for(sender, 0)
        tx = ledger.sign_object(
            ledger.SlashBadKey(
                nonce=nonce,
                fee=fee,
                job_id=job_id,
                index=index,
                chunk=chunks[index],
                plain_hash=plain_hashes[index],
                proof=ledger.merkle_proof(ledger.output_leaves(chunks, plain_hashes), index),
            ),
            KEYS[sender],
            factory.test_chain_id,
        )
        self._queue("slash_bad_key", sender, nonce, fee, tx, job=job)

    @precondition(lambda self: self._has_open_trade() and len(self.pending) < pending_max)
    @rule(data=st.data(), sender=accounts, fee=fees, skew=skews)
    def refund(self, data: st.DataObject, sender: int, fee: int, skew: int) -> None:
        job = self._draw_job(data)
        nonce = self._nonce_for(sender, skew)
        tx = factory.refund(KEYS[sender], nonce, factory.job_id_for(job), fee=fee)
        self._queue("refund", sender, nonce, fee, tx, job=job)

    @precondition(lambda self: self._has_open_trade() and len(self.pending) < pending_max)
    @rule(data=st.data(), fee=fees, skew=skews, honest=mostly)
    def cancel(self, data: st.DataObject, fee: int, skew: int, honest: bool) -> None:
        job = self._draw_job(data)
        trade = self.trades.get(job)
        if honest and trade:
            by_provider = data.draw(st.booleans(), label="by provider")
            sender = trade.provider if by_provider else trade.requester
        else:
            sender = data.draw(self.accounts, label="who")
        nonce = self._nonce_for(sender, skew)
        tx = factory.cancel(KEYS[sender], nonce, factory.job_id_for(job), fee=fee)
        self._queue("cancel", sender, nonce, fee, tx, job=job)

    @precondition(lambda self: len(self.pending) < pending_max)
    @rule(sender=accounts, amount=st.integers(0, 1_500) | st.integers(0, 12_000), fee=fees)
    def stake(self, sender: int, amount: int, fee: int) -> None:
        nonce = self._nonce_for(sender, 0)
        tx = factory.stake(KEYS[sender], nonce, amount, fee=fee)
        self._queue("stake", sender, nonce, fee, tx, amount=amount)

    @precondition(lambda self: len(self.pending) < pending_max)
    @rule(sender=accounts, amount=st.sampled_from([0, 0, 0, 0, 1, 100, 600, 2_000]), fee=fees)
    def unbond(self, sender: int, amount: int, fee: int) -> None:
        nonce = self._nonce_for(sender, 0)
        tx = factory.unbond(KEYS[sender], nonce, amount, fee=fee)
        self._queue("unbond", sender, nonce, fee, tx, amount=amount)

    # -- committing a block -------------------------------------------------------------------

    @rule(interval_ms=st.sampled_from([1, 500, 2_000, 20_000, 70_000]), proposer=accounts)
    def commit_block(self, interval_ms: int, proposer: int) -> None:
        pending, self.pending = self.pending, []
        self.pending_count = dict.fromkeys(range(len(KEYS)), 0)
        self.state, _, results = factory.commit_next(
            self.store,
            self.state,
            [p.tx for p in pending],
            KEYS[proposer].address,
            interval_ms=interval_ms,
        )
        self.time_ms += interval_ms
        self._drop_expired()
        fees = 0
        for p, result in zip(pending, results.tx_results, strict=True):
            charged = self._model_charge(p)
            expected_ok = charged and self._model_apply(p)
            assert result.ok == expected_ok, (
                f"{p.kind} {p.args} from {p.sender}: ledger ok={result.ok} ({result.error}),"
                f" model ok={expected_ok} (charged={charged})"
            )
            if charged:
                fees += p.fee
        self.acct[proposer]["balance"] += fees

    def _drop_expired(self) -> None:
        """Closed trades leave the state once a block is past deadline + evidence window."""
        for job, trade in list(self.trades.items()):
            expiry = trade.deadline_ms + PARAMS.evidence_window_ms
            if trade.status != "open" and expiry < self.time_ms:
                self.forgotten[job] = self.trades.pop(job)

    def _model_charge(self, p: Pending) -> bool:
        """Whether the transaction can be included at all; if so its sender pays the fee and
        uses up the nonce, whatever the body then does."""
        s, fee, a = p.sender, p.fee, self.acct[p.sender]
        if p.kind == "agreement" and p.args["provider"] == s:
            return False  # the stateless check refuses it: it is not even charged
        if p.kind == "stake" and p.args["amount"] == 0:
            return False  # a stake of nothing is refused statelessly
        if p.nonce != a["nonce"] or fee < FEE_MIN or a["balance"] < fee:
            return False
        a["balance"] -= fee
        a["nonce"] += 1
        return True

    def _cost(self, trade: ModelTrade, wall_ms: int) -> int:
        usage = math.ceil(trade.price * max(trade.gpus, 1) * wall_ms / 1000)
        return min(trade.max_cost, max(PARAMS.charge_min, usage))

    def _close(self, trade: ModelTrade, paid: int) -> None:
        requester, provider = self.acct[trade.requester], self.acct[trade.provider]
        requester["locked"] -= trade.max_cost
        requester["balance"] += trade.max_cost - paid
        provider["balance"] += paid
        provider["earned"] += paid

    def _slash(self, provider: int, requester: int, sender: int) -> None:
        a = self.acct[provider]
        taken = min(PARAMS.slash_amount, a["bonded"] + a["unbonding"])
        from_bond = min(taken, a["bonded"])
        a["bonded"] -= from_bond
        a["unbonding"] -= taken - from_bond
        a["slashed"] += 1
        to_sender = 0 if sender in (requester, provider) else taken // 2
        self.acct[requester]["balance"] += taken - to_sender
        self.acct[sender]["balance"] += to_sender

    def _model_apply(self, p: Pending) -> bool:
        """The rules, written out plainly, after the fee was paid. True when the body applies."""
        s, now, me = p.sender, self.time_ms, self.acct[p.sender]
        if p.kind == "transfer":
            amount = p.args["amount"]
            if me["balance"] < amount:
                return False
            me["balance"] -= amount
            self.acct[p.args["recipient"]]["balance"] += amount
        elif p.kind == "stake":
            if me["balance"] < p.args["amount"]:
                return False
            me["balance"] -= p.args["amount"]
            me["bonded"] += p.args["amount"]
        elif p.kind == "unbond":
            amount = p.args["amount"]
            matured = me["unbonding"] > 0 and now >= me["unbond_release_ms"]
            if amount > me["bonded"] or (amount == 0 and not matured):
                return False
            if matured:
                me["balance"] += me["unbonding"]
                me["unbonding"] = me["unbond_release_ms"] = 0
            if amount:
                me["bonded"] -= amount
                me["unbonding"] += amount
                me["unbond_release_ms"] = now + PARAMS.unbonding_delay_ms
        elif p.kind == "agreement":
            a = p.args
            if (
                a["job"] in self.trades
                or not now < a["deadline"]
                or a["deadline"] - now > HORIZON_MS
                or self.acct[a["provider"]]["bonded"] < PARAMS.provider_bond_min
                or me["balance"] < a["max_cost"]
            ):
                return False
            me["balance"] -= a["max_cost"]
            me["locked"] += a["max_cost"]
            self.trades[a["job"]] = ModelTrade(
                s, a["provider"], a["price"], a["gpus"], a["max_cost"], a["deadline"], now
            )
            self.forgotten.pop(a["job"], None)
        elif p.kind == "slash_bad_key":
            trade = self.trades.get(p.args["job"])
            if trade is None or trade.status != "settled" or not trade.bad_key or trade.slashed:
                return False
            self._slash(trade.provider, trade.requester, s)
            trade.slashed = True
        else:
            trade = self.trades.get(p.args["job"])
            if trade is None or trade.status != "open":
                return False
            if p.kind == "receipt":
                if s != trade.provider or now > trade.deadline_ms:
                    return False
                self._close(trade, self._cost(trade, p.args["wall_ms"]))
                self.acct[s]["completed"] += 1
                trade.status = "settled"
                trade.bad_key = bool(p.args["bad_key"])

            elif p.kind == "refund":
                if now <= trade.deadline_ms:
                    return False
                self._close(trade, 0)
                self._slash(trade.provider, trade.requester, s)
                self.acct[trade.provider]["failed"] += 1
                trade.status = "refunded"
            elif s == trade.requester:
                self._close(trade, self._cost(trade, now - trade.opened_ms))
                trade.status = "cancelled"
            elif s == trade.provider:
                self._close(trade, 0)
                self.acct[s]["failed"] += 1
                trade.status = "cancelled"
            else:
                return False
        return True

    # -- agreement ----------------------------------------------------------------------------

    @invariant()
    def accounts_agree(self) -> None:
        for i, key in enumerate(KEYS):
            account = self.state.account(key.address)
            model = ledger.Account(**self.acct[i])
            assert account == model, f"account {i}: ledger {account} != model {model}"

    @invariant()
    def supply_is_constant(self) -> None:
        total = self.state.total_supply()
        assert total == SUPPLY, f"supply drifted to {total}"
        money = ("balance", "locked", "bonded", "unbonding")
        assert sum(a[f] for a in self.acct.values() for f in money) == total, "model drifted"

    @invariant()
    def store_agrees(self) -> None:
        if self.state.height == 0:
            return
        reloaded = self.store.load_state(self.genesis)
        assert reloaded.root == self.state.root, "the store's state differs from the ledger's"
        for job, trade in (self.trades | self.forgotten).items():
            stored = self.store.trade(factory.job_id_for(job))
            assert stored is not None, f"job {job} has no stored trade"
            assert stored.status.name.lower() == trade.status, f"job {job}: {stored.status}"


LedgerVersusModel.TestCase.settings = settings(
    max_examples=100, stateful_step_count=80, deadline=None
)
TestLedgerVersusModel = LedgerVersusModel.TestCase
