"""The real ledger against a slow, obviously correct reference model.

Random transfers, agreements, receipts, refunds and cancels (valid and invalid: wrong nonces,
wrong senders, overspends, early refunds, late receipts) go through ``build_block``,
``apply_block`` and a ``MemoryStore``; the model applies the rules below with plain dicts. They
must agree on every transaction's outcome, every account and the total supply.
"""

from __future__ import annotations

import dataclasses

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import ledger
from ledger import testing as factory
from ledger.types import deadline_horizon_ms_max

KEYS = [factory.key_for(i, "model") for i in range(5)]
START_BALANCE = 10_000
FEE_MIN = 1
PARAMS = ledger.ChainParams(fee_min=FEE_MIN)
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
    status: str = "open"


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
        self.genesis = factory.funded_genesis(KEYS, START_BALANCE, params=PARAMS)
        self.state = self.genesis.initial_state()
        self.store = ledger.MemoryStore()
        self.balance = {i: START_BALANCE for i in range(len(KEYS))}
        self.locked = dict.fromkeys(self.balance, 0)
        self.nonce = dict.fromkeys(self.balance, 0)
        self.earned = dict.fromkeys(self.balance, 0)
        self.trades: dict[int, ModelTrade] = {}
        self.time_ms = self.genesis.genesis_time_ms
        self.pending: list[Pending] = []
        self.pending_count = dict.fromkeys(self.balance, 0)
        self.next_job = 0

    def _draw_job(self, data: st.DataObject) -> int:
        """Mostly an open trade's job, sometimes any job ever named (closed or never opened)."""
        open_jobs = sorted(j for j, t in self.trades.items() if t.status == "open")
        if open_jobs and data.draw(st.integers(0, 4), label="pick open") > 0:
            return data.draw(st.sampled_from(open_jobs), label="job")
        return data.draw(st.integers(0, self.next_job - 1), label="job")

    # -- building transactions ----------------------------------------------------------------

    def _nonce_for(self, sender: int, skew: int) -> int:
        """The nonce the sender would use next; ``skew`` makes replays and gaps on purpose."""
        expected = self.nonce[sender] + self.pending_count[sender]
        return max(0, expected + skew)

    def _queue(
        self, kind: str, sender: int, nonce: int, fee: int, tx: ledger.Transaction, **args: int
    ) -> None:
        self.pending.append(Pending(kind, sender, nonce, fee, tx, args))
        self.pending_count[sender] += 1

    skews = st.sampled_from([0] * 14 + [-1, 1])
    accounts = st.integers(0, len(KEYS) - 1)
    fees = st.sampled_from([0, 0, 1, 7])

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
        provider_offset=st.sampled_from([1, 2, 3, 4, 0]),
        price=st.integers(0, 50),
        gpus=st.integers(0, 4),
        max_cost=st.integers(0, 4_000),
        deadline_offset=st.integers(-1_000, 60_000) | st.integers(1, 3_000),
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

    @precondition(lambda self: self.next_job > 0 and len(self.pending) < pending_max)
    @rule(
        data=st.data(), wall_ms=st.integers(0, 300_000), fee=fees, skew=skews, honest=st.booleans()
    )
    def receipt(self, data: st.DataObject, wall_ms: int, fee: int, skew: int, honest: bool) -> None:
        job = self._draw_job(data)
        trade = self.trades.get(job)
        sender = trade.provider if honest and trade else data.draw(self.accounts, label="who")
        nonce = self._nonce_for(sender, skew)
        tx = factory.receipt(KEYS[sender], nonce, factory.job_id_for(job), wall_ms=wall_ms, fee=fee)
        self._queue("receipt", sender, nonce, fee, tx, job=job, wall_ms=wall_ms)

    @precondition(lambda self: self.next_job > 0 and len(self.pending) < pending_max)
    @rule(data=st.data(), sender=accounts, fee=fees, skew=skews)
    def refund(self, data: st.DataObject, sender: int, fee: int, skew: int) -> None:
        job = self._draw_job(data)
        nonce = self._nonce_for(sender, skew)
        tx = factory.refund(KEYS[sender], nonce, factory.job_id_for(job), fee=fee)
        self._queue("refund", sender, nonce, fee, tx, job=job)

    @precondition(lambda self: self.next_job > 0 and len(self.pending) < pending_max)
    @rule(data=st.data(), fee=fees, skew=skews, honest=st.booleans())
    def cancel(self, data: st.DataObject, fee: int, skew: int, honest: bool) -> None:
        job = self._draw_job(data)
        trade = self.trades.get(job)
        sender = trade.requester if honest and trade else data.draw(self.accounts, label="who")
        nonce = self._nonce_for(sender, skew)
        tx = factory.cancel(KEYS[sender], nonce, factory.job_id_for(job), fee=fee)
        self._queue("cancel", sender, nonce, fee, tx, job=job)

    # -- committing a block -------------------------------------------------------------------

    @rule(interval_ms=st.sampled_from([1, 500, 2_000, 20_000, 70_000]), proposer=accounts)
    def commit_block(self, interval_ms: int, proposer: int) -> None:
        pending, self.pending = self.pending, []
        self.pending_count = dict.fromkeys(self.balance, 0)
        self.state, _, results = factory.commit_next(
            self.store,
            self.state,
            [p.tx for p in pending],
            KEYS[proposer].address,
            interval_ms=interval_ms,
        )
        self.time_ms += interval_ms
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
        self.balance[proposer] += fees

    def _model_charge(self, p: Pending) -> bool:
        """Whether the transaction can be included at all; if so its sender pays the fee and
        uses up the nonce, whatever the body then does."""
        s, fee = p.sender, p.fee
        if p.kind == "agreement" and p.args["provider"] == s:
            return False  # the stateless check refuses it: it is not even charged
        if p.nonce != self.nonce[s] or fee < FEE_MIN or self.balance[s] < fee:
            return False
        self.balance[s] -= fee
        self.nonce[s] += 1
        return True

    def _model_apply(self, p: Pending) -> bool:
        """The rules, written out plainly, after the fee was paid. True when the body applies."""
        s, now = p.sender, self.time_ms
        if p.kind == "transfer":
            amount = p.args["amount"]
            if self.balance[s] < amount:
                return False
            self.balance[s] -= amount
            self.balance[p.args["recipient"]] += amount
        elif p.kind == "agreement":
            a = p.args
            existing = self.trades.get(a["job"])
            job_taken = existing is not None and (
                existing.status == "open" or existing.deadline_ms >= now
            )
            if (
                job_taken
                or a["provider"] == s
                or not now < a["deadline"]
                or a["deadline"] - now > deadline_horizon_ms_max
                or self.balance[s] < a["max_cost"]
            ):
                return False
            self.balance[s] -= a["max_cost"]
            self.locked[s] += a["max_cost"]
            self.trades[a["job"]] = ModelTrade(
                s, a["provider"], a["price"], a["gpus"], a["max_cost"], a["deadline"]
            )
        else:
            trade = self.trades.get(p.args["job"])
            if trade is None or trade.status != "open":
                return False
            if p.kind == "receipt":
                cost = min(
                    trade.max_cost, trade.price * max(trade.gpus, 1) * p.args["wall_ms"] // 1000
                )
                if s != trade.provider or now > trade.deadline_ms:
                    return False
                self.locked[trade.requester] -= trade.max_cost
                self.balance[trade.requester] += trade.max_cost - cost
                self.balance[s] += cost
                self.earned[s] += cost
                trade.status = "settled"
            elif p.kind == "refund":
                if now <= trade.deadline_ms:
                    return False
                self.locked[trade.requester] -= trade.max_cost
                self.balance[trade.requester] += trade.max_cost
                trade.status = "refunded"
            else:
                if s != trade.requester:
                    return False
                self.locked[s] -= trade.max_cost
                self.balance[s] += trade.max_cost
                trade.status = "cancelled"
        return True

    # -- agreement ----------------------------------------------------------------------------

    @invariant()
    def accounts_agree(self) -> None:
        for i, key in enumerate(KEYS):
            account = self.state.account(key.address)
            model = ledger.Account(self.balance[i], self.locked[i], self.nonce[i], self.earned[i])
            assert account == model, f"account {i}: ledger {account} != model {model}"

    @invariant()
    def supply_is_constant(self) -> None:
        total = self.state.total_supply()
        assert total == START_BALANCE * len(KEYS), f"supply drifted to {total}"
        assert sum(self.balance.values()) + sum(self.locked.values()) == total, "model drifted"

    @invariant()
    def store_agrees(self) -> None:
        if self.state.height == 0:
            return
        reloaded = self.store.load_state(self.genesis)
        assert reloaded.root == self.state.root, "the store's state differs from the ledger's"
        for job, trade in self.trades.items():
            stored = self.store.trade(factory.job_id_for(job))
            assert stored is not None, f"job {job} has no stored trade"
            assert stored.status.name.lower() == trade.status, f"job {job}: {stored.status}"


LedgerVersusModel.TestCase.settings = settings(
    max_examples=60, stateful_step_count=80, deadline=None
)
TestLedgerVersusModel = LedgerVersusModel.TestCase
