"""Offers: codec round trip, validation of bad offers, the directory, the publisher."""

from __future__ import annotations

import dataclasses
import json

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import compute
import ledger
from compute.testing import make_offer

CHAIN = "gpumesh-test"
NOW = 1_700_000_000_000
KEYS = [ledger.SigningKey(bytes([i + 1]) * 32) for i in range(6)]


def resign(offer: compute.Offer, key: ledger.SigningKey, **changes: object) -> compute.Offer:
    return ledger.sign_object(dataclasses.replace(offer, **changes), key, CHAIN)  # type: ignore[arg-type]


def offer(i: int = 0, **kw: object) -> compute.Offer:
    return make_offer(KEYS[i], chain_id=CHAIN, now_ms=kw.pop("now_ms", NOW), **kw)  # type: ignore[arg-type]


@given(
    seq=st.integers(0, 2**63),
    tags=st.lists(st.text(min_size=1, max_size=8), max_size=4),
    price=st.integers(0, 10**15),
)
def test_offer_codec_round_trip(seq: int, tags: list[str], price: int) -> None:
    base = offer(sequence=seq, config=compute.OfferConfig(price_per_gpu_second=price))
    signed = resign(base, KEYS[0], tags=tuple(tags))
    data = ledger.encode(signed)
    assert compute.decode_offer(data) == signed, "an offer must survive encode/decode unchanged"


def test_valid_offer_is_accepted() -> None:
    o = offer(simulate_gpus="A100-80GB:2,RTX4090:1")
    compute.validate_offer(o, chain_id=CHAIN, now_ms=NOW)
    assert o.provider == KEYS[0].address
    assert {p.model for p in o.prices} == {"A100-80GB", "RTX4090"}


def _gpu(o: compute.Offer, **changes: object) -> tuple[compute.OfferGpu, ...]:
    return (dataclasses.replace(o.gpus[0], **changes), *o.gpus[1:])  # type: ignore[arg-type]


BAD = {
    "negative VRAM": lambda o: resign(o, KEYS[0], gpus=_gpu(o, vram_bytes=-1)),
    "zero expiry": lambda o: resign(o, KEYS[0], expiry_ms=o.issued_at_ms),
    "expiry too long": lambda o: resign(o, KEYS[0], expiry_ms=o.issued_at_ms + 10**9),
    "issued in the future": lambda o: resign(
        o, KEYS[0], issued_at_ms=NOW + 10**7, expiry_ms=NOW + 10**7 + 1000
    ),
    "huge GPU list": lambda o: resign(
        o,
        KEYS[0],
        gpus=tuple(dataclasses.replace(o.gpus[0], index=i, uuid=f"GPU-{i}") for i in range(65)),
    ),
    "huge tag list": lambda o: resign(o, KEYS[0], tags=tuple(f"t{i}" for i in range(100))),
    "free above total": lambda o: resign(o, KEYS[0], gpus=_gpu(o, free_slots=5)),
    "duplicate GPU": lambda o: resign(o, KEYS[0], gpus=(o.gpus[0], o.gpus[0])),
    "unpriced model": lambda o: resign(o, KEYS[0], prices=()),
    "negative price": lambda o: resign(o, KEYS[0], prices=(compute.ModelPrice("RTX4090", -5),)),
    "unknown sandbox": lambda o: resign(o, KEYS[0], sandbox="docker"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_impossible_values_are_rejected(case: str) -> None:
    bad = BAD[case](offer())
    directory = compute.OfferDirectory(CHAIN)
    with pytest.raises(compute.OfferInvalidError):
        directory.add(bad, NOW)
    assert len(directory) == 0, f"{case}: a rejected offer must not be stored"
    assert directory.statistics()["rejected"] == 1, "rejections are counted"


def test_bad_signature_is_rejected() -> None:
    o = offer()
    tampered = dataclasses.replace(o, gpus=_gpu(o, vram_bytes=o.gpus[0].vram_bytes * 2))
    with pytest.raises(compute.OfferSignatureError):
        compute.OfferDirectory(CHAIN).add(tampered, NOW)
    stolen = dataclasses.replace(o, signer=KEYS[1].address)
    with pytest.raises(compute.OfferSignatureError):
        compute.OfferDirectory(CHAIN).add(ledger.encode(stolen), NOW)


def test_offer_for_another_chain_is_rejected() -> None:
    other = make_offer(KEYS[0], chain_id="other-chain", now_ms=NOW)
    with pytest.raises(compute.OfferWrongChainError):
        compute.OfferDirectory(CHAIN).add(ledger.encode(other), NOW)
    # Relabelling the chain id breaks the signature: the chain id is in the signed bytes.
    relabelled = dataclasses.replace(other, chain_id=CHAIN)
    with pytest.raises(compute.OfferSignatureError):
        compute.OfferDirectory(CHAIN).add(relabelled, NOW)


@pytest.mark.parametrize("data", [b"", b"\x90", b"\xc1garbage", b"\x00" * 70_000])
def test_undecodable_bytes_are_rejected(data: bytes) -> None:
    with pytest.raises(compute.OfferDecodeError):
        compute.OfferDirectory(CHAIN).add(data, NOW)


def test_directory_expiry_and_supersession() -> None:
    cfg = compute.OfferConfig(heartbeat_ms=1000, ttl_ms=5000)
    d = compute.OfferDirectory(CHAIN)
    first = offer(sequence=1, config=cfg)
    assert d.add(first, NOW) is compute.AddOutcome.ADDED
    assert d.add(ledger.encode(first), NOW + 1) is compute.AddOutcome.DUPLICATE
    assert len(d) == 1, "a duplicate never appears twice"
    newer = offer(sequence=2, config=cfg, now_ms=NOW + 1000, busy_gpus=1)
    assert d.add(newer, NOW + 1000) is compute.AddOutcome.REPLACED
    assert d.add(first, NOW + 1001) is compute.AddOutcome.STALE, "an older sequence is ignored"
    assert d.get(KEYS[0].address, NOW + 1001) == newer, "the newest offer wins"
    assert d.get(KEYS[0].address, NOW + 1000 + 5000) is None, "offers are gone at expiry"
    assert d.prune(NOW + 6000) == 1
    assert len(d) == 0
    late = offer(sequence=3, config=cfg)
    assert d.add(late, NOW + 6000) is compute.AddOutcome.EXPIRED, "late offers are not stored"


def test_directory_drops_a_provider_that_stops_heartbeating() -> None:
    cfg = compute.OfferConfig(heartbeat_ms=10_000, ttl_ms=300_000)
    d = compute.OfferDirectory(CHAIN, silence_ms_max=30_000)
    d.add(offer(0, config=cfg), NOW)
    d.add(offer(1, config=cfg), NOW)
    for beat in range(1, 6):  # provider 1 keeps beating every 10 s, provider 0 went silent
        t = NOW + beat * 10_000
        d.add(offer(1, sequence=1 + beat, config=cfg, now_ms=t), t)
    live = {o.provider for o in d.offers(NOW + 50_000)}
    assert live == {KEYS[1].address}, "the silent provider must drop out before its expiry"


def test_directory_is_bounded() -> None:
    d = compute.OfferDirectory(CHAIN, offers_max=3)
    for i in range(3):
        assert d.add(offer(i, config=compute.OfferConfig(ttl_ms=20_000)), NOW).is_new
    assert d.add(offer(3, config=compute.OfferConfig(ttl_ms=15_000)), NOW) is (
        compute.AddOutcome.FULL
    ), "a newcomer that expires sooner does not evict anyone"
    assert d.add(offer(4, config=compute.OfferConfig(ttl_ms=60_000)), NOW).is_new
    assert len(d) == 3, "the directory never exceeds offers_max"


def test_directory_filters_and_sorting() -> None:
    cfg = compute.OfferConfig
    d = compute.OfferDirectory(CHAIN)
    d.add(offer(0, simulate_gpus="A100-80GB:2", config=cfg(price_per_gpu_second=300)), NOW)
    d.add(offer(1, simulate_gpus="RTX4090:2", config=cfg(price_per_gpu_second=50)), NOW)
    d.add(
        offer(2, simulate_gpus="RTX4090:4", config=cfg(price_per_gpu_second=40, tags=("eu",))),
        NOW,
    )
    d.add(offer(3, simulate_gpus="T4:1", config=cfg(price_per_gpu_second=5)), NOW)
    d.add(offer(4, simulate_gpus="RTX4090:2", busy_gpus=2), NOW)  # no free GPU
    d.add(offer(5, simulate_gpus=""), NOW)  # CPU-only node

    def providers(**q: object) -> list[int]:
        rows = d.query(compute.OfferQuery(**q), NOW)  # type: ignore[arg-type]
        return [next(i for i, k in enumerate(KEYS) if k.address == m.offer.provider) for m in rows]

    assert providers(gpu_count=2, min_vram_bytes=24 * 1024**3) == [2, 1, 0], "cheapest first"
    assert providers(gpu_count=3) == [2], "needs three free GPUs of one model"
    assert providers(gpu_count=1, max_price=45) == [3, 2]
    assert providers(model="a100-80gb") == [0], "model match is case-insensitive"
    assert providers(min_compute_capability=(8, 9)) == [2, 1]
    assert providers(min_compute_capability=(7, 5), min_vram_bytes=32 * 1024**3) == [0]
    assert providers(min_cuda_version=(12, 5)) == [], "simulated GPUs run CUDA 12.4"
    assert providers(tags=("eu",)) == [2]
    assert providers(cpu_only=True) == [5]
    assert len(providers()) == 6, "no filter lists every live offer"
    rows = d.rows(
        compute.OfferQuery.from_json({"gpu_count": 2, "min_compute_capability": "8.9"}), NOW
    )
    assert [r["match"]["price_per_gpu_second"] for r in rows] == [40, 50]  # type: ignore[index]
    json.dumps(rows)  # JSON-ready: must not raise


@pytest.mark.parametrize(
    "params",
    [{"gpu_count": "2"}, {"bogus": 1}, {"min_cuda_version": "twelve"}, {"limit": 0},
     {"tags": "eu"}, {"cpu_only": True, "gpu_count": 1}],
)  # fmt: skip
def test_bad_queries_are_refused(params: dict[str, object]) -> None:
    with pytest.raises(compute.QueryError):
        compute.OfferQuery.from_json(params)


async def test_publisher_heartbeats_and_republishes_on_change(
    autojump_clock: trio.testing.MockClock,
) -> None:
    autojump_clock.jump(NOW / 1000)  # so issued_at_ms is a plausible wall-clock time
    # The publisher's clock is the trio clock here, so MockClock drives both sleeps and times.
    inventory = compute.read_inventory(simulate_gpus="RTX4090:2")
    allocator = compute.SlotAllocator(inventory.gpus)
    send, receive = trio.open_memory_channel[bytes](100)

    async def publish(data: bytes) -> None:
        send.send_nowait(data)

    config = compute.OfferConfig(heartbeat_ms=5000, ttl_ms=15_000, publish_interval_ms_min=1000)
    publisher = compute.OfferPublisher(
        key=KEYS[0],
        chain_id=CHAIN,
        inventory=inventory,
        allocator=allocator,
        config=config,
        sandbox="process",
        publish=publish,
        clock_ms=lambda: int(trio.current_time() * 1000),
    )
    directory = compute.OfferDirectory(CHAIN)

    async with trio.open_nursery() as nursery:
        await nursery.start(publisher.run)
        first = receive.receive_nowait()
        t0 = trio.current_time()
        assert directory.add(first, int(t0 * 1000)) is compute.AddOutcome.ADDED
        heartbeat = await receive.receive()
        assert trio.current_time() - t0 == pytest.approx(5.0), "heartbeat every 5 s"
        assert directory.add(heartbeat, int(trio.current_time() * 1000)).is_new
        # Three allocations in a burst become one publish, within the minimum interval.
        t1 = trio.current_time()
        for job in ("a", "b"):
            allocator.allocate(compute.JobId(job), 1)
        allocator.release(compute.JobId("b"))
        changed = compute.decode_offer(await receive.receive())
        assert trio.current_time() - t1 <= 1.0 + 1e-6, "a change is published within 1 s"
        assert changed.free_gpu_count == 1, "the published offer shows the busy GPU"
        assert directory.add(changed, int(trio.current_time() * 1000)).is_new
        assert changed.sequence > compute.decode_offer(heartbeat).sequence
        with trio.move_on_after(3.5):
            extra = await receive.receive()
            raise AssertionError(f"unexpected publish after a coalesced change: {extra!r}")
        nursery.cancel_scope.cancel()

    assert publisher.statistics()["published"] == 3


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.integers(0, 3),  # provider
            st.integers(1, 6),  # sequence
            st.integers(0, 4000),  # time step, ms
            st.sampled_from([2000, 5000, 20_000]),  # ttl, ms
        ),
        max_size=25,
    )
)
def test_directory_matches_a_simple_model(ops: list[tuple[int, int, int, int]]) -> None:
    offers_max = 3
    d = compute.OfferDirectory(CHAIN, offers_max=offers_max, silence_ms_max=8000)
    model: dict[int, tuple[int, int, int]] = {}  # provider -> (sequence, expiry, heard)
    now = NOW
    for provider, seq, step, ttl in ops:
        now += step
        cfg = compute.OfferConfig(heartbeat_ms=1000, ttl_ms=ttl)
        o = offer(provider, sequence=seq, config=cfg, now_ms=now)
        outcome = d.add(ledger.encode(o), now)
        live = {p: v for p, v in model.items() if v[1] > now and now - v[2] <= 8000}
        if outcome.is_new:
            assert provider not in live or live[provider][0] < seq, "older offer replaced newer"
            model[provider] = (seq, now + ttl, now)
        elif outcome in (compute.AddOutcome.STALE, compute.AddOutcome.DUPLICATE):
            assert provider in model, f"{outcome} for a provider never accepted"
            assert model[provider][0] >= seq, f"wrongly {outcome}"
        stored = {
            next(i for i, k in enumerate(KEYS) if k.address == x.provider): x.sequence
            for x in d.offers(now)
        }
        assert len(d) <= offers_max, "the directory outgrew its bound"
        for p, s in stored.items():
            assert model[p][0] == s, f"provider {p}: stored sequence {s}, model {model[p][0]}"
            assert model[p][1] > now, "an expired offer is still listed"
        if outcome.is_new:
            assert stored.get(provider) == seq, "a newly accepted offer is not listed"
        # Eviction (the only way a live offer may vanish) happens only when the directory is full.
        evicted = [
            p for p, v in model.items() if v[1] > now and now - v[2] <= 8000 and p not in stored
        ]
        if evicted:
            assert len(stored) == offers_max, f"providers {evicted} vanished below the bound"
        for p in evicted:
            del model[p]
