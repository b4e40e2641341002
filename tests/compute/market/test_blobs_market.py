"""Inputs as blobs in the market, over a real cluster (libp2p meshes, LocalChain, real jobs):
files handed over by path, the provider's size and disk checks, and the sweep."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING

import pytest
import trio

import ledger
from compute.market import (
    PROTOCOL_AWARD,
    InvalidSubmission,
    JobState,
    MarketConfig,
    NetError,
    Requirements,
    Role,
)
from compute.market._blobs import blob_root
from compute.market.types import InputRef, JobManifest
from p2p.testing import wait_until
from tests.compute.market.cluster import open_cluster
from tests.compute.market.test_faults import _hostile_award
from tests.compute.market.test_market import copy_job

if TYPE_CHECKING:
    from pathlib import Path

    from compute.market import JobStore

MIB = 1024 * 1024


def store_empty(store: JobStore | None) -> bool:
    assert store is not None
    return not store.inputs.roots() and not store.inputs.partial_roots()


async def test_an_input_file_given_by_path_runs_and_is_swept_on_both_sides(
    tmp_path: Path,
) -> None:
    source = tmp_path / "in.bin"
    data = hashlib.sha256(b"x").digest() * (3 * MIB // 32 + 5)  # 4 chunks, the last short
    source.write_bytes(data)
    async with open_cluster(tmp_path, providers=(("RTX4090:1", 30),)) as cluster:
        requester, provider = cluster.requester, cluster.nodes[1]
        job = copy_job(
            b"",
            inputs=(),
            input_paths=(("in.txt", str(source)),),
            argv=("sh", "-c", 'sha256sum in.txt > "$GPUMESH_OUTPUT_DIR/out.txt"'),
            # Less disk than the input: the inputs do not count against what the job writes.
            requirements=Requirements(gpus=1, disk_bytes=MIB),
        )
        record = await requester.market.submit(job)
        assert requester.store is not None
        assert requester.store.inputs.has(blob_root(data)), "the input was not stored at submit"
        await trio.to_thread.run_sync(source.write_bytes, b"changed after the submit")
        done = await cluster.wait_state(requester, record.job_id, {JobState.DONE}, 60)
        view = await requester.market.result(done.job_id)
        text = view.outputs["out.txt"]  # small: inline
        assert text.split()[0].decode() == hashlib.sha256(data).hexdigest(), (
            "the job saw other bytes than the file submitted"
        )
        for node in (requester, provider):
            await wait_until(
                lambda node=node: store_empty(node.store), 20, "the input blobs to be swept"
            )


async def test_bad_input_paths_are_refused_at_submit(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * 2048)
    async with open_cluster(tmp_path, providers=(("RTX4090:1", 30),)) as cluster:
        market = cluster.requester.market
        for paths, reason in (
            ((("a", "relative/path"),), "not absolute"),
            ((("a", str(tmp_path / "missing")),), "No such file"),
        ):
            with pytest.raises(InvalidSubmission, match=reason):
                await market.submit(copy_job(b"", inputs=(), input_paths=paths))
        ctx = market.requester.ctx
        ctx.config = dataclasses.replace(ctx.config, inputs_bytes_max=1024)
        with pytest.raises(InvalidSubmission, match="limit is 1024"):
            await market.submit(copy_job(b"", inputs=(), input_paths=(("a", str(big)),)))
        assert market.list() == [], "a refused submission left a job behind"


async def test_the_provider_checks_declared_sizes_and_its_free_disk(tmp_path: Path) -> None:
    async with open_cluster(tmp_path, providers=(("RTX4090:1", 30),)) as cluster:
        requester, provider = cluster.requester, cluster.nodes[1]
        assert provider.store is not None and provider.provider is not None
        lying = JobManifest(("true",), (), (InputRef("in.bin", blob_root(b"x" * 10), 10),))
        award = _hostile_award(cluster, lying)  # declares inputs_bytes=0
        with pytest.raises(NetError, match="not the size the request declared"):
            await requester.net.request(
                provider.net.local_peer_id, PROTOCOL_AWARD, ledger.encode(award), 10
            )
        # A provider whose disk is full neither takes an award nor bids.
        provider.store.inputs._free = lambda: 0
        empty = JobManifest(("true",), (), ())
        with pytest.raises(NetError, match="no room for the inputs"):
            await requester.net.request(
                provider.net.local_peer_id,
                PROTOCOL_AWARD,
                ledger.encode(_hostile_award(cluster, empty)),
                10,
            )
        assert not provider.provider.allocator.allocations(), "a slot went to a refused award"
        record = await requester.market.submit(copy_job(b"hi\n"))
        await wait_until(
            lambda: requester.market.get(record.job_id).bid_rounds >= 1,
            30,
            "a bid round with no bid",
        )
        assert requester.market.get(record.job_id).bids == (), "a provider with no disk bid"
        assert provider.market.list(Role.PROVIDER) == []
        await requester.market.cancel(record.job_id)


@pytest.mark.parametrize("restarted", ["provider", "requester"])
async def test_a_side_restarted_mid_input_fetch_resumes_it(tmp_path: Path, restarted: str) -> None:
    """The provider resumes from its partial file; a restarted requester (a new store over the
    same directory) serves the rest. Either way no chunk is fetched twice."""
    source = tmp_path / "in.bin"
    data = b"".join(hashlib.sha256(bytes([i])).digest() * (MIB // 32) for i in range(8))
    source.write_bytes(data)
    config = MarketConfig.for_tests(attempt_slack_ms=60_000)
    async with open_cluster(tmp_path, providers=(("RTX4090:1", 30),), config=config) as cluster:
        requester, provider = cluster.requester, cluster.nodes[1]
        assert requester.store is not None
        blobs = requester.store.inputs
        serve = blobs.serve_chunk
        gate = trio.Event()
        served = []

        async def gated(root: bytes, index: int) -> bytes:
            # Three chunks go out; the rest wait until the side has been restarted.
            if len(served) >= 3:
                await gate.wait()
            served.append(index)
            return await serve(root, index)

        blobs.serve_chunk = gated  # type: ignore[method-assign]
        job = copy_job(
            b"",
            inputs=(),
            input_paths=(("in.txt", str(source)),),
            argv=("sh", "-c", 'sha256sum in.txt > "$GPUMESH_OUTPUT_DIR/out.txt"'),
            max_wall_ms=20_000,
        )
        record = await requester.market.submit(job)
        await wait_until(
            lambda: provider.market.statistics().get("blob_chunks_fetched", 0) >= 3,
            30,
            "the provider to hold three chunks",
        )
        node = provider if restarted == "provider" else requester
        await cluster.stop_service(node)
        gate.set()
        await cluster.start_service(node)
        done = await cluster.wait_state(requester, record.job_id, {JobState.DONE}, 90)
        view = await requester.market.result(done.job_id)
        assert view.outputs["out.txt"].split()[0].decode() == hashlib.sha256(data).hexdigest()
        stats = provider.market.statistics()
        if restarted == "provider":
            resumed = stats.get("blob_chunks_resumed", 0)
            assert resumed >= 3, f"the restarted provider fetched again what it had ({resumed})"
        else:
            assert stats.get("blob_chunks_fetched") == 8, f"a chunk was fetched twice: {stats}"


async def test_one_file_may_fill_the_jobs_disk(tmp_path: Path) -> None:
    async with open_cluster(tmp_path, providers=(("RTX4090:1", 30),)) as cluster:
        requester = cluster.requester
        probe = "import resource; print(resource.getrlimit(resource.RLIMIT_FSIZE)[0])"
        job = copy_job(
            b"",
            inputs=(),
            argv=("sh", "-c", f'python3 -c "{probe}" > "$GPUMESH_OUTPUT_DIR/out.txt"'),
            requirements=Requirements(gpus=1, disk_bytes=3 * 1024 * MIB),
        )
        record = await requester.market.submit(job)
        done = await cluster.wait_state(requester, record.job_id, {JobState.DONE}, 60)
        view = await requester.market.result(done.job_id)
        limit = int(view.outputs["out.txt"])
        assert limit == 3 * 1024 * MIB, f"RLIMIT_FSIZE is {limit}, not the job's 3 GiB disk cap"
