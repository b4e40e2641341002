"""Nothing a peer sends stops a node: hostile manifests, crashing jobs, broken handlers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

import ledger
import p2p
from compute.market import (
    PROTOCOL_AWARD,
    PROTOCOL_BID,
    Award,
    Bid,
    InvalidManifest,
    InvalidSubmission,
    JobManifest,
    JobRequest,
    JobState,
    NetError,
    Requirements,
    Role,
)
from compute.market._checks import check_input_names, check_manifest
from compute.market.types import InputRef
from p2p.testing import wait_until
from tests.compute.market.cluster import CHAIN_ID, now_ms, open_cluster
from tests.compute.market.test_market import copy_job

if TYPE_CHECKING:
    from pathlib import Path

    from tests.compute.market.cluster import Cluster

HOSTILE_NAMES = [
    "out",
    "out/x",
    "../escape",
    "a/../../b",
    "/etc/passwd",
    "a//b",
    "./a",
    "a/.",
    "",
    "x" * 2000,
    "a\0b",
    "/".join(["d"] * 40),
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_unsafe_input_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidManifest):
        check_input_names((name,))


def test_input_names_must_be_unique_and_not_nest() -> None:
    check_input_names(("in.txt", "data/a.bin", "data/b.bin", "outside", "out.txt"))
    with pytest.raises(InvalidManifest, match="twice"):
        check_input_names(("a", "a"))
    with pytest.raises(InvalidManifest, match="under another input"):
        check_input_names(("a", "a/b"))


def _manifest(argv: tuple[str, ...], *names: str) -> JobManifest:
    return JobManifest(argv, (), tuple(InputRef(n, ledger.digest(b""), 0) for n in names))


def test_a_bad_manifest_is_refused() -> None:
    check_manifest(_manifest(("true",), "in.txt"), 1024)
    with pytest.raises(InvalidManifest, match=r"1\.\.256 arguments"):
        check_manifest(_manifest(()), 1024)
    with pytest.raises(InvalidManifest, match="output directory"):
        check_manifest(_manifest(("true",), "out"), 1024)
    big = JobManifest(("true",), (), (InputRef("a", ledger.digest(b""), 2048),))
    with pytest.raises(InvalidManifest, match="limit is 1024"):
        check_manifest(big, 1024)
    reserved = JobManifest(("true",), (("GPUMESH_OUTPUT_DIR", "/"),), ())
    with pytest.raises(InvalidManifest, match="not allowed"):
        check_manifest(reserved, 1024)


def _hostile_award(cluster: Cluster, manifest: JobManifest) -> Award:
    """An award from the (funded) requester's key that skipped every requester-side check."""
    key = cluster.requester.key
    provider = cluster.nodes[1].key.address
    request = ledger.sign_object(
        JobRequest(
            chain_id=CHAIN_ID,
            created_ms=now_ms(),
            requirements=Requirements(gpus=1),
            max_price_per_gpu_second=100,
            max_wall_ms=5_000,
            deadline_ms=now_ms() + 60_000,
            bid_window_ms=1_000,
            manifest_digest=ledger.hash_of(manifest),
            inputs_bytes=0,
        ),
        key,
        CHAIN_ID,
    )
    job_id = ledger.hash_of(request)
    return ledger.sign_object(
        Award(
            job_id=job_id,
            request=request,
            attempt=0,
            attempt_job_id=job_id,
            provider=provider,
            price_per_gpu_second=30,
            gpus=1,
            max_cost=request.max_cost(30),
            deadline_ms=now_ms() + 30_000,
            manifest=manifest,
            group_id=job_id,
        ),
        key,
        CHAIN_ID,
    )


async def test_hostile_jobs_never_stop_the_provider(tmp_path: Path) -> None:
    async with open_cluster(tmp_path, providers=(("RTX4090:1", 30),)) as cluster:
        requester = cluster.requester
        provider = cluster.nodes[1]
        assert provider.provider is not None
        # At submit: the requester's own checks refuse each crash of the issue.
        for inputs in ((("out", b"x"),), (("../x", b"x"),), (("a", b"1"), ("a/b", b"2"))):
            with pytest.raises(InvalidSubmission):
                await requester.market.submit(copy_job(b"", inputs=inputs))
        with pytest.raises(InvalidSubmission, match="arguments"):
            await requester.market.submit(copy_job(b"", argv=()))
        assert requester.market.list() == [], "a refused submission left a job behind"
        # A requester that skips those checks: the provider refuses before taking a slot.
        for manifest in (
            _manifest(("true",), "out"),
            _manifest(("true",), "../../etc/x"),
            _manifest(()),
        ):
            award = _hostile_award(cluster, manifest)
            with pytest.raises(NetError, match="bad manifest"):
                await requester.net.request(
                    provider.net.local_peer_id, PROTOCOL_AWARD, ledger.encode(award), 10
                )
            assert not provider.provider.allocator.allocations(), "a slot went to a bad manifest"
        assert provider.market.list(Role.PROVIDER) == [], "a refused award left a job behind"
        # A program that does not exist fails that job with a reason; the service goes on.
        missing = await requester.market.submit(
            copy_job(b"", argv=("gpumesh-no-such-program",), inputs=(), max_wall_ms=2_000)
        )
        side = await cluster.wait_state(
            provider, missing.attempt_job_id, {JobState.FAILED}, 30, role=Role.PROVIDER
        )
        assert "gpumesh-no-such-program" in side.error or "cannot start" in side.error, (
            f"the failure names no reason: {side.error!r}"
        )
        assert not provider.provider.allocator.allocations(), "the failed job kept its slot"
        await wait_until(
            lambda: any(g.free_slots for o in requester.directory.offers(now_ms()) for g in o.gpus),
            30,
            "the provider offers its freed slot again",
        )
        good = await requester.market.submit(copy_job(b"still serving\n"))
        good = await cluster.wait_state(requester, good.job_id, {JobState.DONE}, 60)
        result = await requester.market.result(good.job_id)
        assert result.outputs == {"out.txt": b"still serving\n"}, f"outputs {result.outputs}"
        await cluster.wait_state(
            requester, missing.job_id, {JobState.REFUNDED, JobState.FAILED}, 60
        )
        assert cluster.chain.account(requester.key.address).locked == 0, "escrow left locked"


async def test_bids_count_only_from_staked_providers_that_keep_to_their_offers(
    tmp_path: Path,
) -> None:
    # Provider 2 asks 50, above the job's max of 40: it does not bid, so its key is free to lie.
    providers = (("RTX4090:1", 30), ("RTX4090:1", 50))
    async with open_cluster(tmp_path, providers=providers) as cluster:
        requester = cluster.requester
        provider = cluster.nodes[1]
        job = copy_job(b"x\n", bid_window_ms=20_000, max_price_per_gpu_second=40)
        record = await requester.market.submit(job)
        await wait_until(lambda: bool(requester.market.bids(record.job_id)), 30, "a first bid")

        async def bid(key: ledger.SigningKey, **changes: object) -> None:
            values: dict[str, object] = {
                "job_id": record.job_id,
                "price_per_gpu_second": 30,
                "gpus": 1,
                "model": "RTX4090",
                "expected_start_ms": now_ms(),
                "free_slots": 1,
                "reservation_expiry_ms": now_ms() + 3_000,
            }
            values.update(changes)
            signed = ledger.sign_object(Bid(**values), key, CHAIN_ID)  # type: ignore[arg-type]
            await provider.net.request(
                requester.net.local_peer_id, PROTOCOL_BID, ledger.encode(signed), 10
            )

        stranger = ledger.SigningKey.generate()  # no offer, no bond
        with pytest.raises(NetError, match="no live offer"):
            await bid(stranger, price_per_gpu_second=1, expected_start_ms=0)
        expensive = cluster.nodes[2].key
        with pytest.raises(NetError, match="contradicts its offer"):
            await bid(expensive, price_per_gpu_second=35)
        bids = requester.market.bids(record.job_id)
        assert [b.signer for b in bids] == [provider.key.address], f"a refused bid was kept: {bids}"


async def test_forged_job_requests_count_toward_the_senders_ban_score(tmp_path: Path) -> None:
    async with open_cluster(tmp_path, providers=(("RTX4090:1", 30),)) as cluster:
        requester = cluster.requester
        provider = cluster.nodes[1]
        stranger = ledger.SigningKey.generate()
        forged = ledger.sign_object(
            JobRequest(
                chain_id=CHAIN_ID,
                created_ms=now_ms(),
                requirements=Requirements(gpus=1),
                max_price_per_gpu_second=100,
                max_wall_ms=5_000,
                deadline_ms=now_ms() + 60_000,
                bid_window_ms=1_000,
                manifest_digest=ledger.hash_of(_manifest(("true",))),
                inputs_bytes=0,
            ),
            stranger,  # not the gossip sender: nobody honest relays this
            CHAIN_ID,
        )
        seen = provider.market.statistics()["requests_seen"]
        await requester.net.publish("jobs", JobRequest.TYPE_TAG, ledger.encode(forged))
        await requester.net.publish("jobs", JobRequest.TYPE_TAG, b"\x93not a request")
        peer = p2p.PeerId(requester.net.local_peer_id)
        await wait_until(
            lambda: provider.mesh.ban_score(peer) > 1.5, 20, "both rejections scored the sender"
        )
        assert provider.market.statistics()["requests_seen"] == seen, "a forged request got in"
