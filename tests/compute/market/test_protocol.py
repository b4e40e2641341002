"""The market's pure protocol decisions, one by one (no network, no chain, no clock)."""

from __future__ import annotations

import dataclasses

import ledger
from compute import OfferConfig
from compute.market import Award, Bid, JobManifest, JobRequest, Requirements
from compute.market._protocol import (
    CancelStep,
    OpenStep,
    ReleaseStep,
    SettleStep,
    WatchStep,
    attempt_deadline,
    attempt_job_id,
    award_refusal,
    award_terms_refusal,
    bid_again,
    bid_refusal,
    bond_refusal,
    can_pay,
    can_rerun,
    cancel_step,
    gossip_verdict,
    offer_refusal,
    open_step,
    release_step,
    request_refusal,
    retry_after_refund,
    settle_step,
    spot_checked,
    terms_refusal,
    verify_step,
    watch_step,
    within_caps,
)
from compute.testing import make_offer
from ledger import AgreementTerms, TradeStatus
from ledger.testing import key_for

CHAIN = "market-protocol"
REQUESTER = key_for(1, "market-protocol")
PROVIDER = key_for(2, "market-protocol")
MANIFEST = JobManifest(("true",), (), ())
NOW = 1_000_000


MIB = 1024 * 1024


def _request(**changes: object) -> JobRequest:
    values: dict[str, object] = {
        "chain_id": CHAIN,
        "created_ms": NOW,
        "requirements": Requirements(gpus=1),
        "max_price_per_gpu_second": 50,
        "max_wall_ms": 10_000,
        "deadline_ms": NOW + 60_000,
        "bid_window_ms": 1_000,
        "manifest_digest": ledger.hash_of(MANIFEST),
        "inputs_bytes": 0,
    }
    values.update(changes)
    return ledger.sign_object(JobRequest(**values), REQUESTER, CHAIN)  # type: ignore[arg-type]


def _bid(job_id: bytes, **changes: object) -> Bid:
    values: dict[str, object] = {
        "job_id": job_id,
        "price_per_gpu_second": 30,
        "gpus": 1,
        "model": "RTX4090",
        "expected_start_ms": NOW,
        "free_slots": 1,
        "reservation_expiry_ms": NOW + 3_000,
    }
    values.update(changes)
    return ledger.sign_object(Bid(**values), PROVIDER, CHAIN)  # type: ignore[arg-type]


def _award(request: JobRequest, **changes: object) -> Award:
    job_id = ledger.hash_of(request)
    values: dict[str, object] = {
        "job_id": job_id,
        "request": request,
        "attempt": 0,
        "attempt_job_id": job_id,
        "provider": PROVIDER.address,
        "price_per_gpu_second": 30,
        "gpus": 1,
        "max_cost": request.max_cost(30),
        "deadline_ms": NOW + 30_000,
        "manifest": MANIFEST,
        "group_id": job_id,
    }
    values.update(changes)
    return ledger.sign_object(Award(**values), REQUESTER, CHAIN)  # type: ignore[arg-type]


def test_bid_admission() -> None:
    request = _request()
    ok = {"chain_id": CHAIN, "now_ms": NOW, "inputs_bytes_max": 1024}
    assert request_refusal(request, sender=REQUESTER.address, **ok) is None  # type: ignore[arg-type]
    assert "signed" in str(request_refusal(request, sender=PROVIDER.address, **ok))  # type: ignore[arg-type]
    late = _request(deadline_ms=NOW + 5_000)
    assert request_refusal(late, sender=REQUESTER.address, **ok) == "too late to run"  # type: ignore[arg-type]
    big = _request(inputs_bytes=4096)
    assert "too large" in str(request_refusal(big, sender=REQUESTER.address, **ok))  # type: ignore[arg-type]
    assert not bid_again(True, False, 0, NOW), "a bid in flight is not repeated"
    assert not bid_again(False, True, NOW + 1, NOW), "a delivered, live bid is not repeated"
    assert bid_again(False, True, NOW, NOW), "a lapsed reservation is bid again"
    assert bid_again(False, False, NOW + 1, NOW), "a bid that never arrived is sent again"
    assert can_pay(100, 0, 99, 1) and not can_pay(100, 1, 99, 1), "committed funds count"


def test_bid_acceptance() -> None:
    request = _request()
    job_id = ledger.hash_of(request)
    bid = _bid(job_id)
    kw = {"accepting": True, "bids": (), "bids_max": 4}
    assert bid_refusal(bid, request, **kw) is None  # type: ignore[arg-type]
    assert "not accepting" in str(bid_refusal(bid, request, accepting=False, bids=(), bids_max=4))
    pricey = _bid(job_id, price_per_gpu_second=51)
    assert "max price" in str(bid_refusal(pricey, request, **kw))  # type: ignore[arg-type]
    other = _bid(job_id, gpus=2)
    assert "GPU count" in str(bid_refusal(other, request, **kw))  # type: ignore[arg-type]
    dup = bid_refusal(bid, request, accepting=True, bids=(bid,), bids_max=4)
    assert dup is not None and "duplicate" in dup


def test_attempt_deadline_and_rounds() -> None:
    request = _request(outputs_bytes_max=0)
    assert attempt_deadline(request, NOW, 4_000) == NOW + 14_000
    assert attempt_deadline(request, NOW + 50_000, 4_000) is None, "no time left to run"
    # Moving the data gets time at transfer_rate_bytes_per_s: inputs, image, declared outputs.
    big = _request(inputs_bytes=80 * MIB, outputs_bytes_max=160 * MIB, deadline_ms=NOW + 10**7)
    assert attempt_deadline(big, NOW, 4_000, image_bytes=16 * MIB) == NOW + 14_000 + 32_000
    assert attempt_job_id(b"j" * 32, 0) == b"j" * 32
    assert attempt_job_id(b"j" * 32, 1) != attempt_job_id(b"j" * 32, 2)
    bids = (_bid(ledger.hash_of(request)),)
    assert retry_after_refund(request, NOW, bids, ())
    assert not retry_after_refund(request, NOW, bids, (PROVIDER.address,)), "tried already"


def test_award_acceptance() -> None:
    request = _request()
    award = _award(request)
    kw = {"chain_id": CHAIN, "own_address": PROVIDER.address, "now_ms": NOW}
    assert award_refusal(award, **kw) is None  # type: ignore[arg-type]
    wrong = {**kw, "own_address": REQUESTER.address}
    assert "another provider" in str(award_refusal(award, **wrong))  # type: ignore[arg-type]
    bad_cost = _award(request, max_cost=1)
    assert "max_cost" in str(award_refusal(bad_cost, **kw))  # type: ignore[arg-type]
    other_manifest = _award(request, manifest=JobManifest(("false",), (), ()))
    assert "manifest" in str(award_refusal(other_manifest, **kw))  # type: ignore[arg-type]
    attempt = _award(request, attempt=1)
    assert "attempt" in str(award_refusal(attempt, **kw))  # type: ignore[arg-type]
    forged = dataclasses.replace(award, request=dataclasses.replace(request, max_wall_ms=1))
    assert award_refusal(forged, **kw) is not None, "a changed request must not pass"  # type: ignore[arg-type]
    late = _award(request, deadline_ms=NOW + 5_000)
    assert "too little time" in str(award_refusal(late, **kw))  # type: ignore[arg-type]
    assert award_terms_refusal(award, 31) is not None and award_terms_refusal(award, 30) is None


def test_terms_must_be_what_was_awarded() -> None:
    request = _request()
    award = _award(request)
    terms = ledger.sign_object(
        AgreementTerms(
            job_id=ledger.JobId(award.attempt_job_id),
            requester=ledger.Address(REQUESTER.address),
            provider=ledger.Address(PROVIDER.address),
            price_per_gpu_second=30,
            gpus=1,
            max_cost=award.max_cost,
            deadline_ms=award.deadline_ms,
            group_id=award.group_id,
            manifest_digest=request.manifest_digest,
        ),
        PROVIDER,
        CHAIN,
    )
    assert terms_refusal(terms, award, REQUESTER.address) is None
    greedy = dataclasses.replace(terms, price_per_gpu_second=31)
    assert terms_refusal(greedy, award, REQUESTER.address) is not None


def test_what_the_trade_means_for_each_side() -> None:
    assert open_step(TradeStatus.OPEN, True, NOW, NOW + 1) is OpenStep.START
    assert open_step(TradeStatus.CANCELLED, True, NOW, NOW + 1) is OpenStep.CLOSED
    assert open_step(None, False, NOW, NOW + 1) is OpenStep.WAIT
    assert open_step(TradeStatus.OPEN, False, NOW + 2, NOW + 1) is OpenStep.GIVE_UP
    assert can_rerun(NOW, 1_000, NOW + 2_001) and not can_rerun(NOW, 1_000, NOW + 2_000)
    deadline = NOW
    assert watch_step(TradeStatus.OPEN, NOW, deadline, False) is WatchStep.WAIT
    assert watch_step(TradeStatus.OPEN, NOW + 1, deadline, False) is WatchStep.SEND_REFUND
    assert watch_step(TradeStatus.OPEN, NOW + 1, deadline, True) is WatchStep.WAIT
    assert watch_step(TradeStatus.SETTLED, NOW, deadline, False) is WatchStep.SETTLED
    assert watch_step(TradeStatus.REFUNDED, NOW, deadline, False) is WatchStep.REFUNDED
    assert cancel_step(TradeStatus.OPEN) is CancelStep.SEND_CANCEL
    assert cancel_step(TradeStatus.SETTLED) is CancelStep.TOO_LATE
    assert cancel_step(None) is CancelStep.CLOSED
    assert settle_step(TradeStatus.OPEN) is SettleStep.SUBMIT_RECEIPT
    assert settle_step(TradeStatus.SETTLED) is SettleStep.DONE
    assert settle_step(TradeStatus.CANCELLED) is SettleStep.CANCELLED
    assert settle_step(TradeStatus.REFUNDED) is SettleStep.REFUNDED


def test_a_bid_must_agree_with_its_offer_and_bond() -> None:
    request = _request()
    job_id = ledger.hash_of(request)
    config = dataclasses.replace(OfferConfig.for_tests(), price_per_gpu_second=30)
    offer = make_offer(
        PROVIDER, chain_id=CHAIN, now_ms=NOW, simulate_gpus="RTX4090:2", config=config
    )
    req = request.requirements
    honest = _bid(job_id, free_slots=2)
    assert offer_refusal(honest, offer, req, NOW) is None, offer_refusal(honest, offer, req, NOW)
    assert "no live offer" in str(offer_refusal(honest, None, req, NOW))
    cheaper = _bid(job_id, price_per_gpu_second=29)
    assert "contradicts its offer" in str(offer_refusal(cheaper, offer, req, NOW))
    other_model = _bid(job_id, model="H100")
    assert "contradicts its offer" in str(offer_refusal(other_model, offer, req, NOW))
    too_free = _bid(job_id, free_slots=3)
    assert "contradicts its offer" in str(offer_refusal(too_free, offer, req, NOW))
    many = _bid(job_id, gpus=3)
    assert "contradicts its offer" in str(offer_refusal(many, offer, req, NOW))
    liar = _bid(job_id, expected_start_ms=0)
    assert "in the past" in str(offer_refusal(liar, offer, req, NOW))
    assert bond_refusal(999, 1_000) is not None and bond_refusal(1_000, 1_000) is None


def test_caps_and_release() -> None:
    assert within_caps(1, 1, 2) and not within_caps(2, 0, 2) and not within_caps(0, 2, 2)
    assert release_step(TradeStatus.OPEN, True, NOW, NOW) is ReleaseStep.CANCEL
    assert release_step(TradeStatus.SETTLED, True, NOW, NOW) is ReleaseStep.DONE
    assert release_step(None, False, NOW, NOW) is ReleaseStep.WAIT, "the trade may still open"
    assert release_step(None, False, NOW + 1, NOW) is ReleaseStep.DONE, "past the deadline"
    assert release_step(TradeStatus.OPEN, False, NOW, NOW) is ReleaseStep.WAIT, "not ours"


def test_the_jobs_topic_validator() -> None:
    request = _request()
    kw = {"sender": REQUESTER.address, "type_tag": JobRequest.TYPE_TAG, "chain_id": CHAIN}
    assert gossip_verdict(request, now_ms=NOW, **kw) is True  # type: ignore[arg-type]
    assert gossip_verdict(None, now_ms=NOW, **kw) is False, "undecodable or unsigned"  # type: ignore[arg-type]
    relayed = {**kw, "sender": PROVIDER.address}
    assert gossip_verdict(request, now_ms=NOW, **relayed) is False, "not the sender's"  # type: ignore[arg-type]
    other_chain = {**kw, "chain_id": "other"}
    assert gossip_verdict(request, now_ms=NOW, **other_chain) is False  # type: ignore[arg-type]
    stale = gossip_verdict(request, now_ms=request.deadline_ms, **kw)  # type: ignore[arg-type]
    assert stale is None, "a stale request is dropped without blame"


def test_verification_acks_only_the_majority() -> None:
    a, b = b"a" * 32, b"b" * 32
    assert verify_step(2, [a, None], False, False).winner is None, "wait for the second run"
    assert verify_step(2, [a, a], True, False).winner == a
    disagree = verify_step(2, [a, b], True, False)
    assert disagree.winner is None and disagree.run_extra, "a mismatch gets one more run"
    assert verify_step(3, [a, b, b], True, True).winner == b, "the extra run decides"
    assert verify_step(3, [a, b, None], False, True).winner is None
    stuck = verify_step(3, [a, b, None], True, True)
    assert stuck.undecided and stuck.winner is None, "no majority after the extra run: ack none"
    assert verify_step(3, [a, a, None], False, False).winner == a, "2 of 3 need not wait"
    assert not spot_checked(b"\xff" * 32, 0.5) and spot_checked(b"\x00" * 32, 0.5)
    assert not spot_checked(b"\x00" * 32, 0.0) and spot_checked(b"\xff" * 32, 1.0)
