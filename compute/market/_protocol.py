"""The market protocol's decisions, pure: no I/O, no clock, no randomness.

Every choice a role makes about what a peer sent or what the chain shows is a function here
of plain values (the message, the trade, the time, what the node holds), returning a refusal
reason or the next step. The drivers (``_requester``, ``_provider``, ``_exchange``) read the
inputs, call these, and carry the answer out; the unit tests call these directly.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import ledger
from ledger import AgreementTerms, TradeStatus

if TYPE_CHECKING:
    from collections.abc import Sequence

    from compute.market.types import Award, Bid, JobRequest

restart_rerun_margin_ms = 1_000
"""A provider re-runs an interrupted job only if it still ends this long before the deadline."""


def attempt_job_id(job_id: bytes, attempt: int) -> bytes:
    """The ledger job id of ``attempt``: the job id itself first, then a hash per retry."""
    if attempt == 0:
        return job_id
    return ledger.digest(job_id + attempt.to_bytes(4, "big"))


# ---- provider: bid admission -----------------------------------------------------------------


def request_refusal(
    request: JobRequest,
    *,
    sender: bytes,
    chain_id: str,
    now_ms: int,
    inputs_bytes_max: int,
) -> str | None:
    """Why a provider must not bid on a gossiped request (None: it may, if it fits and pays)."""
    if request.signer != sender or request.chain_id != chain_id:
        return "request not signed by its gossip sender, or for another chain"
    if request.deadline_ms <= now_ms + request.max_wall_ms:
        return "too late to run"
    if request.inputs_bytes > inputs_bytes_max:
        return "inputs too large for this provider"
    if request.max_wall_ms <= 0 or request.bid_window_ms <= 0:
        return "a request needs a positive wall time and bid window"
    return None


def bid_again(in_flight: bool, delivered: bool, reservation_expiry_ms: int, now_ms: int) -> bool:
    """A provider bids once per job; again only if that bid never reached the requester or
    its reservation lapsed (a requester that restarted mid-window asks again)."""
    if in_flight:
        return False
    return not delivered or reservation_expiry_ms <= now_ms


def can_pay(spendable: int, committed: int, max_cost: int, fee: int) -> bool:
    """The requester's spendable balance covers this job on top of what it already has
    committed here (escrow of its other unopened awards and bids), plus the fee."""
    return spendable - committed >= max_cost + fee


# ---- requester: bid acceptance ----------------------------------------------------------------


def bid_refusal(
    bid: Bid,
    request: JobRequest,
    *,
    accepting: bool,
    bids: Sequence[Bid],
    bids_max: int,
) -> str | None:
    """Why a requester refuses a bid (None: it is kept for the award)."""
    if not accepting:
        return "not accepting bids for this job"
    if bid.price_per_gpu_second > request.max_price_per_gpu_second:
        return "bid is above the job's max price"
    if bid.gpus != request.requirements.gpus:
        return "bid is for another GPU count"
    if len(bids) >= bids_max or any(b.signer == bid.signer for b in bids):
        return "bid refused: duplicate or too many bids"
    return None


def attempt_deadline(request: JobRequest, now_ms: int, slack_ms: int) -> int | None:
    """An attempt's trade deadline, or None when the job's deadline leaves no time to run."""
    deadline = min(request.deadline_ms, now_ms + request.max_wall_ms + slack_ms)
    if deadline <= now_ms + request.max_wall_ms:
        return None
    return deadline


def terms_refusal(terms: AgreementTerms, award: Award, requester: bytes) -> str | None:
    """Why the provider's signed terms are not what the requester awarded (None: they are)."""
    expected = AgreementTerms(
        job_id=ledger.JobId(award.attempt_job_id),
        requester=ledger.Address(requester),
        provider=ledger.Address(award.provider),
        price_per_gpu_second=award.price_per_gpu_second,
        gpus=award.gpus,
        max_cost=award.max_cost,
        deadline_ms=award.deadline_ms,
    )
    unsigned = AgreementTerms(
        job_id=terms.job_id,
        requester=terms.requester,
        provider=terms.provider,
        price_per_gpu_second=terms.price_per_gpu_second,
        gpus=terms.gpus,
        max_cost=terms.max_cost,
        deadline_ms=terms.deadline_ms,
    )
    if unsigned != expected:
        return "returned terms that differ"
    return None


def room_for_round(request: JobRequest, now_ms: int) -> bool:
    """The deadline still leaves room for another bid window and the run."""
    return now_ms + request.bid_window_ms + request.max_wall_ms < request.deadline_ms


# ---- provider: award acceptance ----------------------------------------------------------------


def award_refusal(
    award: Award,
    *,
    chain_id: str,
    own_address: bytes,
    now_ms: int,
) -> str | None:
    """The checks of an award that need nothing but the award (signatures, ids, budget)."""
    request = award.request
    if not ledger.verify_object(request, chain_id) or request.signer != award.signer:
        return "the award's job request is not signed by the awarding requester"
    if ledger.hash_of(request) != award.job_id:
        return "the award's job id is not its request's hash"
    if award.attempt_job_id != attempt_job_id(award.job_id, award.attempt):
        return "award is for another attempt id"
    if award.provider != own_address:
        return "award is for another provider"
    if ledger.hash_of(award.manifest) != request.manifest_digest:
        return "the award's manifest is not the one its job request names"
    if award.gpus != request.requirements.gpus:
        return "award is for another GPU count"
    if award.max_cost != request.max_cost(award.price_per_gpu_second):
        return "award max_cost does not match price x gpus x max wall time"
    if award.deadline_ms <= now_ms + request.max_wall_ms:
        return "the award's deadline leaves too little time"
    return None


def award_terms_refusal(award: Award, own_price: int) -> str | None:
    if award.price_per_gpu_second < own_price:
        return f"award price {award.price_per_gpu_second} is below ours ({own_price})"
    return None


# ---- after the award: what the chain says ------------------------------------------------------


class OpenStep(enum.Enum):
    """Provider, holding slots for an award: what to do now."""

    START = "start"
    CLOSED = "closed"
    WAIT = "wait"
    GIVE_UP = "give_up"


def open_step(
    trade_status: TradeStatus | None, terms_match: bool, now_ms: int, give_up_ms: int
) -> OpenStep:
    if trade_status is not None and terms_match:
        return OpenStep.START if trade_status is TradeStatus.OPEN else OpenStep.CLOSED
    if now_ms > give_up_ms:
        return OpenStep.GIVE_UP
    return OpenStep.WAIT


def can_rerun(now_ms: int, max_wall_ms: int, deadline_ms: int) -> bool:
    """A provider interrupted by a restart re-runs only if the run still fits the deadline."""
    return now_ms + max_wall_ms + restart_rerun_margin_ms < deadline_ms


class WatchStep(enum.Enum):
    """Requester, with a trade locked: what the chain's view means."""

    SETTLED = "settled"
    CANCELLED = "cancelled"
    REFUNDED = "refunded"
    SEND_REFUND = "send_refund"
    WAIT = "wait"


def watch_step(
    trade_status: TradeStatus, head_ms: int, deadline_ms: int, refund_live: bool
) -> WatchStep:
    if trade_status is TradeStatus.SETTLED:
        return WatchStep.SETTLED
    if trade_status is TradeStatus.CANCELLED:
        return WatchStep.CANCELLED
    if trade_status is TradeStatus.REFUNDED:
        return WatchStep.REFUNDED
    # A refund is valid only past the deadline; resent if the chain lost the last one.
    if head_ms > deadline_ms and not refund_live:
        return WatchStep.SEND_REFUND
    return WatchStep.WAIT


def retry_after_refund(
    request: JobRequest, now_ms: int, bids: Sequence[Bid], tried: Sequence[bytes]
) -> bool:
    """After a refund: retry with the next untried bid while the job's deadline allows."""
    has_time = now_ms + request.max_wall_ms < request.deadline_ms
    return has_time and any(b.signer not in tried for b in bids)


class CancelStep(enum.Enum):
    """Requester cancelling: what the trade's state asks for."""

    SEND_CANCEL = "send_cancel"
    TOO_LATE = "too_late"
    """The receipt settled first: carry on to the outputs."""
    CLOSED = "closed"


def cancel_step(trade_status: TradeStatus | None) -> CancelStep:
    if trade_status is TradeStatus.OPEN:
        return CancelStep.SEND_CANCEL
    if trade_status is TradeStatus.SETTLED:
        return CancelStep.TOO_LATE
    return CancelStep.CLOSED


class SettleStep(enum.Enum):
    """Provider with a result: what the trade's state asks for."""

    SUBMIT_RECEIPT = "submit_receipt"
    DONE = "done"
    CANCELLED = "cancelled"
    REFUNDED = "refunded"


def settle_step(trade_status: TradeStatus) -> SettleStep:
    if trade_status is TradeStatus.OPEN:
        return SettleStep.SUBMIT_RECEIPT
    if trade_status is TradeStatus.SETTLED:
        return SettleStep.DONE
    if trade_status is TradeStatus.CANCELLED:
        return SettleStep.CANCELLED
    return SettleStep.REFUNDED
