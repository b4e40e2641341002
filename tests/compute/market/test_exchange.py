"""The fair exchange over real nodes: what the requester holds before it pays, and the slash a
wrong key earns (a provider whose receipt reveals a key that does not open its outputs)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from compute.market import JobState, _bundle
from compute.market._exchange import RequesterExchange
from compute.market._wire import (
    PROTOCOL_LOGS,
    PROTOCOL_OUTPUT,
    PROTOCOL_OUTPUTS,
    PROTOCOL_SEALED_CHUNKS,
)
from compute.market.exceptions import NetError
from p2p.testing import wait_until
from tests.compute.market.cluster import open_cluster
from tests.compute.market.test_market import copy_job

if TYPE_CHECKING:
    import ledger
    from compute.market.types import JobRecord


async def test_a_wrong_key_is_caught_and_slashed_by_the_requester(tmp_path: Path) -> None:
    async with open_cluster(tmp_path, providers=(("RTX4090:1", 30),)) as cluster:
        requester, provider = cluster.requester, cluster.nodes[1]
        role = provider.market.provider
        assert role is not None
        exchange = role.exchange
        honest_build = exchange.build_receipt

        def wrong_key(record: JobRecord, nonce: int) -> ledger.Transaction:
            tx = honest_build(record, nonce)
            return exchange.ctx.sign(dataclasses.replace(tx, key=bytes(32)))

        exchange.build_receipt = wrong_key  # type: ignore[method-assign]
        record = await requester.market.submit(copy_job(b"sealed\n"))
        record = await cluster.wait_state(requester, record.job_id, {JobState.OUTPUT_MISMATCH}, 60)
        assert "does not open output chunk 0" in record.error, record.error
        assert "slashed" in record.error, record.error
        trade = cluster.chain.trade(record.attempt_job_id)
        assert trade is not None and trade.slashed, f"the trade does not show the slash: {trade}"
        account = cluster.chain.account(provider.key.address)
        assert (account.completed, account.slashed) == (1, 1), account


async def test_the_requester_is_never_served_plaintext_before_it_pays(tmp_path: Path) -> None:
    async with open_cluster(tmp_path, providers=(("RTX4090:1", 30),)) as cluster:
        requester, provider = cluster.requester, cluster.nodes[1]
        asked: list[bytes] = []
        seen: list[tuple[str, bytes]] = []
        peer = provider.net.local_peer_id

        async def probe(self: RequesterExchange, record: JobRecord) -> None:
            # Everything a requester could ask the provider for while the trade is open.
            aid = record.attempt_job_id
            asked.append(aid)
            for protocol in (PROTOCOL_OUTPUTS, PROTOCOL_OUTPUT, PROTOCOL_LOGS):
                try:
                    seen.append((protocol, await self.ctx.request(peer, protocol, aid)))
                except NetError:
                    continue
            await RequesterExchange.fetch_and_ack(self, record)

        exchange = requester.market.requester.exchange
        exchange.fetch_and_ack = probe.__get__(exchange)  # type: ignore[method-assign]
        record = await requester.market.submit(copy_job(b"secret result\n"))
        record = await cluster.wait_state(requester, record.job_id, {JobState.DONE}, 60)
        result = await requester.market.result(record.job_id)
        assert result.outputs == {"out.txt": b"secret result\n"}, result.outputs
        assert asked, "the requester never looked before paying"
        for protocol, data in seen:
            assert b"secret result" not in data and b"warn" not in data, f"{protocol} leaked"


async def test_a_cut_fetch_of_large_outputs_resumes_with_the_ranges_it_has(
    tmp_path: Path,
) -> None:
    async with open_cluster(tmp_path, providers=(("RTX4090:1", 30),)) as cluster:
        requester, provider = cluster.requester, cluster.nodes[1]
        exchange = requester.market.requester.exchange
        served: list[int] = []
        honest_request = exchange.ctx.request

        async def flaky(peer_id: str, protocol: str, payload: bytes) -> bytes:
            # The connection "drops" once, after a few ranges came.
            if protocol == PROTOCOL_SEALED_CHUNKS:
                served.append(1)
                if len(served) == 4:
                    raise NetError("connection reset (test)")
            return await honest_request(peer_id, protocol, payload)

        exchange.ctx.request = flaky  # type: ignore[method-assign]
        script = 'head -c 6000000 /dev/zero | tr "\\0" "x" > "$GPUMESH_OUTPUT_DIR/big.txt"'
        record = await requester.market.submit(copy_job(b"", argv=("sh", "-c", script)))
        record = await cluster.wait_state(requester, record.job_id, {JobState.DONE}, 90)
        counters = exchange.ctx.counters
        ranges = -(-6_000_000 // (1024 * 1024))
        assert counters.get("outputs_fetches_resumed", 0) >= 1, counters
        fetched = counters.get("outputs_ranges_fetched", 0)
        assert fetched <= ranges + 1, f"{fetched} ranges fetched for {ranges}: it started over"
        result = await requester.market.result(record.job_id)
        assert result.outputs == {}, "6 MB of outputs do not come inline"
        big = Path(result.output_dir) / "big.txt"
        assert big.read_bytes() == b"x" * 6_000_000, "the opened output differs"
        sealed = exchange.fetch_dir(record.attempt_job_id)
        assert not sealed.exists(), "the ciphertext is deleted once opened"
        role = provider.market.provider
        assert role is not None
        assert (role.exchange.sealed_dir(record.attempt_job_id) / "roots").exists(), "kept"
        stray = big.parent.parent.parent / ("ab" * 32) / "sealed"
        stray.mkdir(parents=True)
        assert exchange.sweep() == 1 and not stray.exists(), "a folder of no job is swept"
        assert big.exists(), "a done job's outputs stay"


async def test_a_requester_restarted_mid_fetch_resumes_from_its_partial_file(
    tmp_path: Path,
) -> None:
    async with open_cluster(tmp_path, providers=(("RTX4090:1", 30),)) as cluster:
        requester = cluster.requester
        net = requester.net
        honest_request = net.request
        asked: list[int] = []
        stuck = trio.Event()

        async def stalling(peer_id: str, protocol: str, payload: bytes, timeout_s: float) -> bytes:
            if protocol == PROTOCOL_SEALED_CHUNKS:
                asked.append(1)
                if len(asked) >= 4:  # the rest hangs until the service is stopped
                    stuck.set()
                    await trio.sleep_forever()
            return await honest_request(peer_id, protocol, payload, timeout_s)

        net.request = stalling  # type: ignore[method-assign]
        script = 'head -c 9000000 /dev/zero | tr "\\0" "y" > "$GPUMESH_OUTPUT_DIR/big.txt"'
        record = await requester.market.submit(copy_job(b"", argv=("sh", "-c", script)))
        with trio.fail_after(60):
            await stuck.wait()
        await cluster.stop_service(requester)
        net.request = honest_request  # type: ignore[method-assign]
        await cluster.start_service(requester)
        record = await cluster.wait_state(requester, record.job_id, {JobState.DONE}, 90)
        counters = requester.market.requester.exchange.ctx.counters
        assert counters.get("outputs_fetches_resumed", 0) == 1, counters
        assert counters.get("outputs_ranges_resumed", 0) >= 1, counters
        result = await requester.market.result(record.job_id)
        assert (Path(result.output_dir) / "big.txt").read_bytes() == b"y" * 9_000_000


async def test_a_requester_without_disk_for_the_outputs_says_so_and_fetches_once_it_has(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = [True]
    honest_check = _bundle.check_free_disk

    def check(directory: Path, needed: int, what: str) -> None:
        if full[0] and "-blobs" in str(directory):  # the requester's outputs, not the seal
            raise _bundle.DiskFull(f"not enough free disk for {what} (test)")
        honest_check(directory, needed, what)

    monkeypatch.setattr(_bundle, "check_free_disk", check)
    async with open_cluster(tmp_path, providers=(("RTX4090:1", 30),)) as cluster:
        requester = cluster.requester
        record = await requester.market.submit(copy_job(b"fits later\n"))

        def said() -> bool:
            return "not enough free disk" in requester.market.get(record.job_id).error

        await wait_until(said, 60, "the requester to record the full disk")
        exchange = requester.market.requester.exchange
        aid = requester.market.get(record.job_id).attempt_job_id
        assert not exchange.fetch_dir(aid).exists(), "a fetch that did not fit left files"
        full[0] = False
        record = await cluster.wait_state(requester, record.job_id, {JobState.DONE}, 60)
        result = await requester.market.result(record.job_id)
        assert result.outputs == {"out.txt": b"fits later\n"}, result.outputs
