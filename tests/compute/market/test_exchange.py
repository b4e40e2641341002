"""The fair exchange over real nodes: what the requester holds before it pays, and the slash a
wrong key earns (a provider whose receipt reveals a key that does not open its outputs)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from compute.market import JobState
from compute.market._exchange import RequesterExchange
from compute.market._wire import PROTOCOL_LOGS, PROTOCOL_OUTPUT, PROTOCOL_OUTPUTS
from compute.market.exceptions import NetError
from tests.compute.market.cluster import open_cluster
from tests.compute.market.test_market import copy_job

if TYPE_CHECKING:
    from pathlib import Path

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
