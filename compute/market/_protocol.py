"""The market protocol's decisions, pure: no I/O, no clock, no randomness.

Every choice a role makes about what a peer sent or what the chain shows is a function here
of plain values (the message, the trade, the time, what the node holds), returning a refusal
reason or the next step. The drivers (``_requester``, ``_provider``, ``_exchange``) read the
inputs, call these, and carry the answer out; the unit tests call these directly.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING

import ledger
from compute.market.types import transfer_rate_bytes_per_s
from compute.types import CPU_MODEL
from ledger import AgreementTerms, TradeStatus

if TYPE_CHECKING:
    from collections.abc import Sequence

    from compute import Offer
    from compute.market.types import Award, Bid, JobRequest, Requirements

restart_rerun_margin_ms = 1_000
"""A provider re-runs an interrupted job only if it still ends this long before the deadline."""
bid_start_skew_ms = 30_000
"""A bid may promise a start this far in the past (clock skew); earlier is a lie."""


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


def gossip_verdict(
    request: JobRequest | None, *, sender: bytes, type_tag: str, chain_id: str, now_ms: int
) -> bool | None:
    """The ``jobs`` topic's validator: False for what no honest node sends (undecodable,
    unsigned, signed by someone else than the gossip sender, another chain's, nonsense
    numbers), None for what is merely stale, True otherwise. ``request`` is None when the
    payload did not decode or its signature did not verify."""
    if request is None or type_tag != request.TYPE_TAG:
        return False
    if request.signer != sender or request.chain_id != chain_id:
        return False
    if request.max_wall_ms <= 0 or request.bid_window_ms <= 0 or request.inputs_bytes < 0:
        return False
    if request.deadline_ms <= now_ms:
        return None
    return True


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


def within_caps(from_requester: int, from_peer: int, per_requester_max: int) -> bool:
    """A requester (by key) and the peer that relays it (by peer id) each stay under the cap:
    a stranger cannot hold more of this provider's attention than that, whatever it signs."""
    return from_requester < per_requester_max and from_peer < per_requester_max


# ---- requester: bid acceptance ----------------------------------------------------------------


def offer_refusal(
    bid: Bid, offer: Offer | None, requirements: Requirements, now_ms: int
) -> str | None:
    """Why a bid contradicts its signer's live offer (None: it agrees). A bid is only worth
    what the provider advertised and can be held to: the same price for the same GPU model,
    enough GPUs of that model meeting the requirements, no more free slots than it has."""
    if offer is None:
        return "the bidder has no live offer"
    price = offer.price_for(bid.model)
    if price is None or price != bid.price_per_gpu_second:
        return (
            f"bid price {bid.price_per_gpu_second} for {bid.model} contradicts its offer ({price})"
        )
    if bid.gpus == 0:
        if bid.model != CPU_MODEL or not 0 < bid.free_slots <= offer.total_cpu_slots:
            return "bid for a CPU slot contradicts its offer"
    else:
        count = sum(
            1
            for g in offer.gpus
            if g.model == bid.model
            and g.vram_bytes >= requirements.min_vram_bytes
            and g.compute_capability >= requirements.min_compute_capability
            and g.cuda_version >= requirements.min_cuda_version
        )
        if count < bid.gpus or not 0 < bid.free_slots <= count:
            return f"bid for {bid.gpus} x {bid.model} ({bid.free_slots} free) contradicts its offer"
    if bid.expected_start_ms < now_ms - bid_start_skew_ms:
        return "bid promises a start in the past"
    return None


def bond_refusal(bonded: int, bond_min: int) -> str | None:
    """A provider must hold the chain's minimum bond to be awarded work."""
    if bonded < bond_min:
        return f"the bidder's bond {bonded} is below provider_bond_min {bond_min} (stake first)"
    return None


def stake_needed(bonded: int, target: int, bond_min: int) -> int:
    """What a provider must stake so its bond is at least ``max(target, bond_min)``."""
    return max(0, max(target, bond_min) - bonded)


def reputation(completed: int, failed: int, slashed: int) -> float:
    """Laplace-smoothed success rate from the chain's counters; a slash counts as three."""
    return (completed + 1) / (completed + failed + 3 * slashed + 2)


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


def transfer_allowance_ms(transfer_bytes: int) -> int:
    """The time a trade's deadline allows for moving ``transfer_bytes`` (inputs, image and
    outputs) at ``transfer_rate_bytes_per_s``."""
    return max(transfer_bytes, 0) * 1000 // transfer_rate_bytes_per_s


def attempt_deadline(
    request: JobRequest, now_ms: int, slack_ms: int, image_bytes: int = 0
) -> int | None:
    """An attempt's trade deadline, or None when the job's deadline leaves no time to run:
    the run's wall time, the slack, and an allowance for moving the inputs, the image and up
    to the declared outputs (``transfer_allowance_ms``), capped by the job's deadline."""
    moved = request.inputs_bytes + image_bytes + request.outputs_bytes_max
    allowance_ms = slack_ms + transfer_allowance_ms(moved)
    deadline = min(request.deadline_ms, now_ms + request.max_wall_ms + allowance_ms)
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
        group_id=award.group_id,
        manifest_digest=award.request.manifest_digest,
    )
    unsigned = dataclasses.replace(terms, signer=ledger.Address(b""), signature=b"")
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
    if len(award.group_id) != 32:
        return "award group id must be 32 bytes"
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


# ---- requester: verification (``--verify N``) -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VerifyDecision:
    winner: bytes | None
    """The plain root a majority of the planned replicas delivered: ack exactly those."""
    run_extra: bool = False
    """Every replica is in and no root has a majority: run one more replica."""
    undecided: bool = False
    """Every replica is in, the extra run too, and still no majority: ack nobody."""


def verify_step(
    planned: int, roots: Sequence[bytes | None], all_in: bool, extra_used: bool
) -> VerifyDecision:
    """Which deliveries of a verified job to ack. ``roots`` holds one entry per replica of
    the group (None: no delivery yet, or never); ``all_in``: no replica can still deliver.
    A root wins once a strict majority of the ``planned`` replicas delivered it."""
    counts: dict[bytes, int] = {}
    for root in roots:
        if root is not None:
            counts[root] = counts.get(root, 0) + 1
    for root, count in sorted(counts.items()):
        if count >= planned // 2 + 1:
            return VerifyDecision(root)
    if not all_in:
        return VerifyDecision(None)
    if not extra_used:
        return VerifyDecision(None, run_extra=True)
    return VerifyDecision(None, undecided=True)


def spot_checked(job_id: bytes, rate: float) -> bool:
    """Whether a job is re-run on a second provider at a spot-check ``rate`` (0..1): decided
    by the job's id, so a restart decides the same and nobody picks which."""
    return int.from_bytes(job_id[:8], "big") < rate * 2**64


class ReleaseStep(enum.Enum):
    """Provider that will not deliver: what it must do so it is never slashed when honest."""

    CANCEL = "cancel"
    """Send its own Cancel (full refund, no slash) before the deadline."""
    WAIT = "wait"
    """No trade yet: the requester's agreement may still commit until the deadline."""
    DONE = "done"


def release_step(
    trade_status: TradeStatus | None, terms_match: bool, head_ms: int, deadline_ms: int
) -> ReleaseStep:
    if trade_status is not None and terms_match:
        return ReleaseStep.CANCEL if trade_status is TradeStatus.OPEN else ReleaseStep.DONE
    if head_ms > deadline_ms:
        return ReleaseStep.DONE
    return ReleaseStep.WAIT


def settle_step(trade_status: TradeStatus) -> SettleStep:
    if trade_status is TradeStatus.OPEN:
        return SettleStep.SUBMIT_RECEIPT
    if trade_status is TradeStatus.SETTLED:
        return SettleStep.DONE
    if trade_status is TradeStatus.CANCELLED:
        return SettleStep.CANCELLED
    return SettleStep.REFUNDED
