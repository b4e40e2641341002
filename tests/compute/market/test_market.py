"""The job market end to end: real meshes on loopback, a real ledger, real job processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from compute.market import (
    JobState,
    JobSubmission,
    Requirements,
    Role,
    Unsatisfiable,
)
from ledger import TradeStatus
from tests.compute.market.cluster import BALANCE, open_cluster

GiB = 1024**3
COPY_JOB = (
    "sh",
    "-c",
    'cat in.txt > "$GPUMESH_OUTPUT_DIR/out.txt"; echo "gpus=$CUDA_VISIBLE_DEVICES"; echo warn >&2',
)


def copy_job(text: bytes, **changes: object) -> JobSubmission:
    values: dict[str, object] = {
        "argv": COPY_JOB,
        "inputs": (("in.txt", text),),
        "requirements": Requirements(gpus=1, min_vram_bytes=16 * GiB),
        "max_price_per_gpu_second": 100,
        "max_wall_ms": 5_000,
    }
    values.update(changes)
    return JobSubmission(**values)  # type: ignore[arg-type]


async def test_jobs_complete_and_settle_with_money_adding_up(tmp_path: Path) -> None:
    async with open_cluster(tmp_path) as cluster:
        requester = cluster.requester
        supply_before = cluster.chain.state.total_supply()
        started = trio.current_time()
        records = [
            await requester.market.submit(copy_job(b"cheapest job\n")),
            await requester.market.submit(
                copy_job(b"a100 job\n", requirements=Requirements(gpus=1, model="A100-80GB"))
            ),
            await requester.market.submit(copy_job(b"least loaded\n", strategy="least-loaded")),
        ]
        done = [await cluster.wait_state(requester, r.job_id, {JobState.DONE}, 60) for r in records]
        elapsed = trio.current_time() - started
        providers = {r.terms.provider for r in done if r.terms is not None}
        assert cluster.nodes[3].key.address in providers, "the A100 job must go to the A100 node"
        for record, text in zip(
            done, [b"cheapest job\n", b"a100 job\n", b"least loaded\n"], strict=True
        ):
            result = await requester.market.result(record.job_id)
            assert result.outputs == {"out.txt": text}, f"wrong outputs: {result.outputs}"
            assert result.stdout.startswith(b"gpus=GPU-"), f"job saw no GPU: {result.stdout!r}"
            assert result.stderr == b"warn\n", f"stderr not carried: {result.stderr!r}"
            trade = cluster.chain.trade(record.attempt_job_id)
            assert trade is not None and trade.status is TradeStatus.SETTLED, f"trade: {trade}"
            assert record.cost == trade.paid, "the record's cost is what the chain paid"
            stamps = record.to_json()["timestamps"]
            assert isinstance(stamps, dict)
            for state in ("bidding", "awarded", "locked", "settling", "done"):
                assert state in stamps, f"no {state} timestamp in {stamps}"
        # Money: what providers earned is what the requester spent, and nothing was minted.
        state = cluster.chain.state
        spent = BALANCE - state.account(requester.key.address).balance
        assert state.account(requester.key.address).locked == 0, "escrow left locked"
        earned = sum(state.account(n.key.address).earned for n in cluster.nodes[1:])
        assert spent == earned == sum(r.cost for r in done), (
            f"spent {spent}, earned {earned}, costs {[r.cost for r in done]}"
        )
        assert state.total_supply() == supply_before, "supply changed"
        for node in cluster.nodes[1:]:
            for record in node.market.list(Role.PROVIDER):
                assert record.state is JobState.DONE, f"provider record {record.to_json()}"
        print(f"3 jobs submit-to-done {elapsed:.2f} s")


async def test_unsatisfiable_job_fails_fast_naming_the_requirement(tmp_path: Path) -> None:
    async with open_cluster(tmp_path) as cluster:
        market = cluster.requester.market
        with pytest.raises(Unsatisfiable, match=r">= 2 GPUs with >= 80 GB VRAM; best: ") as info:
            await market.submit(
                copy_job(b"x", requirements=Requirements(gpus=2, min_vram_bytes=80 * GiB))
            )
        assert "A100-80GB 80 GB x1" in str(info.value), f"best offer not named: {info.value}"
        with pytest.raises(Unsatisfiable, match="too expensive: cheapest 30"):
            await market.submit(copy_job(b"x", max_price_per_gpu_second=10))
        with pytest.raises(Unsatisfiable, match="model H100"):
            await market.submit(copy_job(b"x", requirements=Requirements(gpus=1, model="H100")))
        assert market.list() == [], "a refused submission must leave no job behind"
