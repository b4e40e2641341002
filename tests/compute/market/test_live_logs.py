"""Live logs through the whole market in one process: real meshes on loopback, a real ledger,
a real job process that waits for the test, so "before the job ended" is certain."""

from __future__ import annotations

from pathlib import Path

import trio

from compute.market import JobState, JobSubmission, LogEvent, Requirements
from compute.market._exchange import exec_id
from tests.compute.market.cluster import open_cluster

GATED = (
    "sh",
    "-c",
    "echo one; echo err-one >&2; while [ ! -e go ]; do sleep 0.02; done; echo two",
)
"""Writes a line to each stream, then waits for the test to create ``go`` in its directory."""


async def read_until(
    events: trio.MemoryReceiveChannel[LogEvent], job_id: bytes, want: dict[str, bytes]
) -> dict[str, bytes]:
    got = {"stdout": b"", "stderr": b""}
    with trio.fail_after(60):
        async for event in events:
            if event.job_id != job_id or not event.stream:
                continue
            assert event.offset == len(got[event.stream]), f"a gap or a repeat: {event}"
            got[event.stream] += event.data
            if all(got[s] == w for s, w in want.items()):
                return got
    raise AssertionError(f"the events ended before {want}: {got}")


async def test_live_logs_cross_the_mesh_while_the_job_runs_then_the_sealed_ones_are_read(
    tmp_path: Path,
) -> None:
    async with open_cluster(tmp_path, providers=(("RTX4090:1", 30),)) as cluster:
        requester = cluster.requester
        provider = cluster.nodes[1]
        events = requester.market.subscribe_logs()
        record = await requester.market.submit(
            JobSubmission(
                argv=GATED,
                requirements=Requirements(gpus=1),
                max_price_per_gpu_second=100,
                max_wall_ms=30_000,
            )
        )
        view = await requester.market.logs(record.job_id)  # the opt-in: follow it
        assert view.source == "none" and not view.ended, view
        await read_until(events, record.job_id, {"stdout": b"one\n", "stderr": b"err-one\n"})
        running = requester.market.get(record.job_id)
        assert running.result is None and not running.state.terminal, running.to_json()
        view = await requester.market.logs(record.job_id, stdout_offset=1)
        assert (view.source, view.stdout, view.stdout_size) == ("live", b"ne\n", 4), view
        assert provider.provider is not None
        job_dir = provider.provider.executor.job_dir(exec_id(running.attempt_job_id))
        (job_dir / "work" / "go").touch()
        await cluster.wait_state(requester, record.job_id, {JobState.DONE}, 60)
        view = await requester.market.logs(record.job_id)
        assert (view.source, view.ended) == ("sealed", True), view
        assert (view.stdout, view.stderr) == (b"one\ntwo\n", b"err-one\n"), view
        stats = requester.market.statistics()
        assert isinstance(stats["log_pulls"], int) and stats["log_pulls"] > 0, stats
