"""The market's pure parts and its store: codec round trips, matching, ranking, persistence."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import plyvel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ledger
from compute import OfferConfig, SlotAllocator, read_inventory
from compute.market import (
    Award,
    Bid,
    JobManifest,
    JobRecord,
    JobRequest,
    JobState,
    JobStore,
    Requirements,
    Role,
    StoreFormatError,
    attempt_job_id,
    explain_unsatisfiable,
    fit_on_node,
    rank_bids,
)
from compute.market._protocol import reputation
from compute.market._store import store_format
from compute.market.types import InputRef, Stamp
from compute.testing import make_offer
from ledger.testing import key_for

CHAIN = "market-unit"
GiB = 1024**3
u32 = st.integers(min_value=0, max_value=2**32)
digest = st.binary(min_size=32, max_size=32)
versions = st.tuples(st.integers(0, 99), st.integers(0, 99))
requirements = st.builds(
    Requirements,
    gpus=st.integers(0, 64),
    min_vram_bytes=u32,
    model=st.text(max_size=16),
    min_compute_capability=versions,
    min_cuda_version=versions,
)
requests = st.builds(
    JobRequest,
    chain_id=st.just(CHAIN),
    created_ms=u32,
    requirements=requirements,
    max_price_per_gpu_second=u32,
    max_wall_ms=u32,
    deadline_ms=u32,
    bid_window_ms=u32,
    manifest_digest=digest,
    inputs_bytes=u32,
)


# No per-example deadline: Ed25519 signing on a CPU shared by six test suites is slow.
@settings(max_examples=50, deadline=None)
@given(requests, st.integers(0, 7), u32)
def test_signed_messages_round_trip_and_verify(
    request: JobRequest, attempt: int, price: int
) -> None:
    key = key_for(1, "market-unit")
    signed = ledger.sign_object(request, key, CHAIN)
    assert ledger.decode(JobRequest, ledger.encode(signed)) == signed, "request round trip"
    assert ledger.verify_object(signed, CHAIN), "a signed request must verify"
    job_id = ledger.hash_of(signed)
    award = ledger.sign_object(
        Award(
            job_id=job_id,
            request=signed,
            attempt=attempt,
            attempt_job_id=attempt_job_id(job_id, attempt),
            provider=key_for(2, "market-unit").address,
            price_per_gpu_second=price,
            gpus=request.requirements.gpus,
            max_cost=signed.max_cost(price),
            deadline_ms=request.deadline_ms,
            manifest=JobManifest(("sh", "-c", "true"), (("A", "b"),), ()),
            group_id=job_id,
        ),
        key,
        CHAIN,
    )
    assert ledger.decode(Award, ledger.encode(award)) == award, "award round trip"
    tampered = dataclasses.replace(award, price_per_gpu_second=price + 1)
    assert not ledger.verify_object(tampered, CHAIN), "a changed award must not verify"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=8), st.binary(max_size=64)), max_size=4))
def test_manifest_and_record_round_trip(files: list[tuple[str, bytes]]) -> None:
    manifest = JobManifest(
        ("sh", "-c", "true"),
        (("A", "1"),),
        tuple(InputRef(n, ledger.digest(d), len(d)) for n, d in files),
    )
    assert ledger.decode(JobManifest, ledger.encode(manifest)) == manifest
    request = ledger.sign_object(
        JobRequest(
            chain_id=CHAIN,
            created_ms=1,
            requirements=Requirements(),
            max_price_per_gpu_second=1,
            max_wall_ms=1,
            deadline_ms=2,
            bid_window_ms=1,
            manifest_digest=ledger.hash_of(manifest),
            inputs_bytes=0,
        ),
        key_for(1, "market-unit"),
        CHAIN,
    )
    record = JobRecord(
        role=Role.REQUESTER,
        job_id=ledger.hash_of(request),
        state=JobState.BIDDING,
        request=request,
        stamps=(Stamp(JobState.BIDDING, 5),),
    )
    assert ledger.decode(JobRecord, ledger.encode(record)) == record


def test_attempt_ids_are_distinct_and_stable() -> None:
    job_id = ledger.digest(b"job")
    ids = [attempt_job_id(job_id, n) for n in range(5)]
    assert ids[0] == job_id, "attempt 0 trades under the job id itself"
    assert len(set(ids)) == 5 and all(len(i) == 32 for i in ids), "attempt ids must differ"
    assert attempt_job_id(job_id, 3) == ids[3], "an attempt id must be reproducible on restart"


def test_job_store_persists_across_reopen(tmp_path: Path) -> None:
    request = ledger.sign_object(
        JobRequest(
            chain_id=CHAIN,
            created_ms=1,
            requirements=Requirements(gpus=1),
            max_price_per_gpu_second=5,
            max_wall_ms=1000,
            deadline_ms=10_000,
            bid_window_ms=100,
            manifest_digest=b"\0" * 32,
            inputs_bytes=3,
        ),
        key_for(1, "market-unit"),
        CHAIN,
    )
    job_id = ledger.hash_of(request)
    record = JobRecord(role=Role.REQUESTER, job_id=job_id, state=JobState.LOCKED, request=request)
    manifest = JobManifest(("true",), (), (InputRef("a", ledger.digest(b"abc"), 3),))
    store = JobStore(tmp_path / "jobs")
    store.put(record, manifest=manifest, blobs=[b"abc"])
    provider_side = dataclasses.replace(
        record, role=Role.PROVIDER, attempt_job_id=attempt_job_id(job_id, 1)
    )
    store.put(provider_side)
    store.close()
    store = JobStore(tmp_path / "jobs")
    try:
        assert store.get(Role.REQUESTER, job_id) == record, "requester record lost on reopen"
        assert store.get(Role.PROVIDER, attempt_job_id(job_id, 1)) == provider_side
        assert [r.role for r in store.records()] == [Role.REQUESTER, Role.PROVIDER]
        assert list(store.records(Role.PROVIDER)) == [provider_side]
        assert store.manifest(job_id) == manifest and store.blob(ledger.digest(b"abc")) == b"abc"
    finally:
        store.close()


def test_a_job_store_of_another_format_is_refused_at_open_saying_what_to_do(
    tmp_path: Path,
) -> None:
    JobStore(tmp_path / "fresh").close()
    JobStore(tmp_path / "fresh").close()  # a store it marked itself opens again
    # An unmarked store holding a job: written before the format mark existed.
    old = plyvel.DB(str(tmp_path / "old"), create_if_missing=True)
    old.put(b"j\x01" + bytes(32), b"an older record")
    old.close()
    with pytest.raises(StoreFormatError, match="format 1, this gpumesh reads format"):
        JobStore(tmp_path / "old")
    newer = plyvel.DB(str(tmp_path / "newer"), create_if_missing=True)
    newer.put(b"v", (store_format + 1).to_bytes(4, "big"))
    newer.close()
    with pytest.raises(StoreFormatError, match="move the directory aside"):
        JobStore(tmp_path / "newer")


def test_reputation_score_orders_providers() -> None:
    # The chain's counters: (completed, failed, slashed); a slash also counts as a failure.
    good, new, failing, slashed = (
        reputation(9, 0, 0),
        reputation(0, 0, 0),
        reputation(1, 2, 0),
        reputation(5, 1, 1),
    )
    assert good > new > failing, "completed trades raise it, failed ones lower it"
    assert slashed < reputation(5, 1, 0), "a slash costs more than a failure"


def _bid(signer: int, price: int, start: int, free: int) -> Bid:
    return Bid(
        job_id=b"j" * 32,
        price_per_gpu_second=price,
        gpus=1,
        model="RTX4090",
        expected_start_ms=start,
        free_slots=free,
        reservation_expiry_ms=0,
        signer=bytes([signer]) * 32,
    )


def test_rank_bids_by_each_strategy() -> None:
    a, b, c = _bid(1, 30, 500, 1), _bid(2, 50, 100, 1), _bid(3, 40, 300, 4)
    scores = {a.signer: 0.2, b.signer: 0.9, c.signer: 0.5}
    assert rank_bids([a, b, c], "cheapest", scores.__getitem__)[0] is a
    assert rank_bids([a, b, c], "soonest", scores.__getitem__)[0] is b
    assert rank_bids([a, b, c], "least-loaded", scores.__getitem__)[0] is c
    assert rank_bids([a, b, c], "reputation", scores.__getitem__)[0] is b


def test_explain_names_what_is_unmet() -> None:
    now = 1_800_000_000_000
    offers = [
        make_offer(
            key_for(1, "market-unit"), chain_id=CHAIN, now_ms=now, simulate_gpus="RTX4090:1"
        ),
        make_offer(
            key_for(2, "market-unit"),
            chain_id=CHAIN,
            now_ms=now,
            simulate_gpus="A100-80GB:2",
            busy_gpus=2,
        ),
    ]
    assert explain_unsatisfiable([], Requirements(gpus=1), 100) is not None
    assert explain_unsatisfiable(offers, Requirements(gpus=1), 1000) is None, "RTX fits"
    too_dear = explain_unsatisfiable(offers, Requirements(gpus=1), 1)
    assert too_dear is not None and "too expensive" in too_dear, too_dear
    full = explain_unsatisfiable(offers, Requirements(gpus=2, min_vram_bytes=80 * GiB), 1000)
    assert full is not None and "full" in full, f"busy A100s should read as full: {full}"
    none = explain_unsatisfiable(offers, Requirements(gpus=4), 1000)
    assert none is not None and none.startswith("no provider offers >= 4 GPUs"), none
    cpu = explain_unsatisfiable(offers, Requirements(gpus=0), 1000)
    assert cpu is not None and "CPU" in cpu, f"GPU-only providers have no CPU slot: {cpu}"


def test_fit_on_node_respects_requirements_and_free_slots() -> None:
    inventory = read_inventory(simulate_gpus="RTX4090:2", simulate_seed="x")
    allocator = SlotAllocator(inventory.gpus)
    config = dataclasses.replace(OfferConfig(), price_per_gpu_second=7)
    assert fit_on_node(Requirements(gpus=2), allocator, config) == ("RTX4090", 2, 7)
    assert fit_on_node(Requirements(gpus=1, min_vram_bytes=80 * GiB), allocator, config) is None
    assert fit_on_node(Requirements(gpus=1, model="A100-80GB"), allocator, config) is None
    assert (
        fit_on_node(Requirements(gpus=1, min_compute_capability=(9, 0)), allocator, config) is None
    )
    assert fit_on_node(Requirements(gpus=0), allocator, config) is None, "no CPU slots here"
    from compute.types import JobId

    allocator.allocate(JobId("busy"), 1)
    assert fit_on_node(Requirements(gpus=2), allocator, config) is None, "one GPU is busy"
    assert fit_on_node(Requirements(gpus=1), allocator, config) == ("RTX4090", 1, 7)


@pytest.mark.parametrize("gpus", [0, 1, 3])
def test_max_cost_is_the_ledger_cost_of_the_whole_budget(gpus: int) -> None:
    request = JobRequest(
        chain_id=CHAIN,
        created_ms=1,
        requirements=Requirements(gpus=gpus),
        max_price_per_gpu_second=1,
        max_wall_ms=2_500,
        deadline_ms=2,
        bid_window_ms=1,
        manifest_digest=b"",
        inputs_bytes=0,
    )
    terms = ledger.AgreementTerms(
        job_id=ledger.JobId(b"j" * 32),
        requester=ledger.Address(b"r" * 32),
        provider=ledger.Address(b"p" * 32),
        price_per_gpu_second=40,
        gpus=gpus,
        max_cost=request.max_cost(40),
        deadline_ms=2,
    )
    assert terms.cost(2_500) == request.max_cost(40), "escrow must cover the full wall budget"
