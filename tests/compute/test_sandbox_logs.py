"""The executor's live tail: a running job's stdout and stderr read from offsets, bounded."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import compute
from compute.types import JobId

JOB = JobId("live-logs-job")
GATE = (
    "echo one; echo err-one >&2; "
    "while [ ! -e go ]; do sleep 0.02; done; "
    "echo two; echo err-two >&2; "
    "while [ ! -e end ]; do sleep 0.02; done"
)
"""Writes a line to each stream, waits for the test to create ``go``, writes another, and
ends when the test creates ``end``."""


@pytest.fixture
def executor() -> Iterator[compute.Executor]:
    root = Path(tempfile.mkdtemp(prefix="gpumesh-logs-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    ex = compute.Executor(root / "jobs", sandbox="process", job_uids=None)
    yield ex
    ex.close()
    shutil.rmtree(root)


async def wait_for_tail(
    ex: compute.Executor, stream: str, offset: int, want: bytes
) -> compute.LogTail:
    with trio.fail_after(20):
        while True:
            tail = ex.log_tail(JOB, stream, offset, 1024)
            if want in tail.data:
                return tail
            await trio.sleep(0.02)


async def test_the_tail_shows_output_while_the_job_runs_and_stops_at_its_end(
    executor: compute.Executor,
) -> None:
    spec = compute.JobSpec(argv=("sh", "-c", GATE))
    results: list[compute.JobResult] = []

    async def run() -> None:
        results.append(await executor.run(JOB, spec))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        out = await wait_for_tail(executor, "stdout", 0, b"one\n")
        assert out.running and out.offset == 0 and out.size == 4, out
        err = await wait_for_tail(executor, "stderr", 0, b"err-one\n")
        assert err.data == b"err-one\n" and err.running, err
        assert not results, "the job ended before it was let go: the tail was not live"
        # From an offset, bounded: the bytes past what the reader holds, no more than asked.
        assert executor.log_tail(JOB, "stdout", 1, 2).data == b"ne"
        assert executor.log_tail(JOB, "stdout", 4, 1024).data == b""
        (executor.job_dir(JOB) / "work" / "go").touch()
        rest = await wait_for_tail(executor, "stdout", 4, b"two\n")
        assert rest.data == b"two\n" and rest.offset == 4 and rest.running, rest
        (executor.job_dir(JOB) / "work" / "end").touch()
    assert results[0].stdout == b"one\ntwo\n", results[0]
    assert results[0].stderr == b"err-one\nerr-two\n", results[0]
    ended = executor.log_tail(JOB, "stdout", 0, 1024)
    assert not ended.running and ended.data == b"", "a finished job must show as not running"


def test_a_job_not_running_here_has_no_tail(executor: compute.Executor) -> None:
    tail = executor.log_tail(JobId("nobody"), "stderr", 10, 100)
    assert (tail.data, tail.offset, tail.size, tail.running) == (b"", 10, 0, False)
    with pytest.raises(ValueError, match="stream"):
        executor.log_tail(JOB, "stdin", 0, 1)
    with pytest.raises(ValueError, match=">= 0"):
        executor.log_tail(JOB, "stdout", -1, 1)
