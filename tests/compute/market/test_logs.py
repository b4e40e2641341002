"""Live logs (``compute.market._logs``): the provider's bounded answers and the requester's
pulled tail, wired back to back in one trio run under a mock clock (no network)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import ledger
from compute import LogTail
from compute.market import (
    JobRecord,
    JobRequest,
    JobState,
    MarketError,
    NetError,
    Requirements,
    _logs,
)
from compute.market._logs import (
    LogTailChunk,
    LogTailRequest,
    ProviderLogs,
    RequesterLogs,
    log_chunk_bytes_max,
)
from compute.market._wire import PROTOCOL_LOG_TAIL
from compute.market.types import Role, RunResult, Stamp
from ledger.testing import key_for
from p2p.testing import wait_until

CHAIN = "market-logs"
REQUESTER_PEER = "requester-peer"
PROVIDER_PEER = "provider-peer"
u63 = st.integers(min_value=0, max_value=2**63 - 1)


def make_request() -> JobRequest:
    return ledger.sign_object(
        JobRequest(
            chain_id=CHAIN,
            created_ms=1,
            requirements=Requirements(),
            max_price_per_gpu_second=1,
            max_wall_ms=60_000,
            deadline_ms=10**12,
            bid_window_ms=1,
            manifest_digest=ledger.digest(b"manifest"),
            inputs_bytes=0,
        ),
        key_for(1, CHAIN),
        CHAIN,
    )


class Book:
    """The slice of ``JobBook`` the live logs read."""

    def __init__(self) -> None:
        self.records: dict[bytes, JobRecord] = {}

    def get(self, key: bytes) -> JobRecord | None:
        return self.records.get(key)

    def __getitem__(self, key: bytes) -> JobRecord:
        return self.records[key]

    def put(self, key: bytes, record: JobRecord) -> None:
        self.records[key] = record


class FakeExecutor:
    """A running job's streams, written by the test."""

    def __init__(self) -> None:
        self.streams = {"stdout": bytearray(), "stderr": bytearray()}
        self.running = True

    def log_tail(self, job_id: str, stream: str, offset: int, bytes_max: int) -> LogTail:
        if not self.running:
            return LogTail(b"", offset, 0, running=False)
        buffer = self.streams[stream]
        return LogTail(bytes(buffer[offset : offset + bytes_max]), offset, len(buffer), True)


@dataclasses.dataclass
class Pair:
    """One requester and one provider of one job, their requests going straight across."""

    provider: ProviderLogs
    requester: RequesterLogs
    provider_book: Book
    requester_book: Book
    executor: FakeExecutor
    job_id: bytes
    requests: list[LogTailRequest] = dataclasses.field(default_factory=list)
    answers: list[LogTailChunk] = dataclasses.field(default_factory=list)
    cut: int = 0
    """Requests still to fail (a cut connection)."""

    @property
    def record(self) -> JobRecord:
        return self.requester_book[self.job_id]

    def set_requester(self, **changes: Any) -> None:
        self.requester_book.put(self.job_id, dataclasses.replace(self.record, **changes))

    def set_provider(self, **changes: Any) -> None:
        current = self.provider_book[self.job_id]
        self.provider_book.put(self.job_id, dataclasses.replace(current, **changes))


def open_pair(nursery: trio.Nursery, *, started_ms: int = 1_000) -> Pair:
    request = make_request()
    job_id = ledger.hash_of(request)
    provider_book, requester_book = Book(), Book()
    executor = FakeExecutor()
    common = {"job_id": job_id, "request": request, "attempt_job_id": job_id}
    provider_book.put(
        job_id,
        JobRecord(
            role=Role.PROVIDER,
            state=JobState.RUNNING,
            counterparty_peer_id=REQUESTER_PEER,
            stamps=(Stamp(JobState.RUNNING, started_ms),),
            **common,  # type: ignore[arg-type]
        ),
    )
    requester_book.put(
        job_id,
        JobRecord(
            role=Role.REQUESTER,
            state=JobState.RUNNING,
            counterparty_peer_id=PROVIDER_PEER,
            **common,  # type: ignore[arg-type]
        ),
    )
    pair: Pair

    async def send(peer_id: str, protocol: str, payload: bytes) -> bytes:
        assert peer_id == PROVIDER_PEER and protocol == PROTOCOL_LOG_TAIL
        pair.requests.append(ledger.decode(LogTailRequest, payload))
        if pair.cut:
            pair.cut -= 1
            raise NetError("connection reset")
        answer = await pair.provider.on_log_tail(REQUESTER_PEER, payload)
        pair.answers.append(ledger.decode(LogTailChunk, answer, max_bytes=1 << 20))
        return answer

    provider_ctx = SimpleNamespace(clock_ms=lambda: int(trio.current_time() * 1000))
    requester_ctx = SimpleNamespace(nursery=nursery, request=send)
    provider = ProviderLogs(provider_ctx, provider_book, executor)  # type: ignore[arg-type]
    requester = RequesterLogs(requester_ctx, requester_book)  # type: ignore[arg-type]
    pair = Pair(provider, requester, provider_book, requester_book, executor, job_id)
    return pair


async def wait_for(what: str, predicate: Any, timeout_s: float = 60) -> None:
    await wait_until(predicate, timeout_s, what)  # mock time: no wall-clock wait


def gather(events: list[Any], stream: str) -> bytes:
    data = bytearray()
    for event in events:
        if event.stream == stream:
            assert event.offset == len(data), f"event at {event.offset}, expected {len(data)}"
            data += event.data
    return bytes(data)


async def collect(receive: trio.MemoryReceiveChannel[Any], into: list[Any]) -> None:
    async for event in receive:
        into.append(event)


async def test_a_followed_job_streams_in_bounded_chunks_then_reads_come_from_the_sealed_logs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        pair = open_pair(nursery)
        events: list[Any] = []
        nursery.start_soon(collect, pair.requester.subscribe(), events)
        big = bytes(range(256)) * 800  # 200 KiB: four chunks
        pair.executor.streams["stdout"] += b"first line\n"
        view = pair.requester.read(pair.job_id)
        assert (view.source, view.ended, view.stdout) == ("none", False, b""), view
        await wait_for("the first line", lambda: gather(events, "stdout") == b"first line\n")
        pair.executor.streams["stdout"] += big
        pair.executor.streams["stderr"] += b"warn\n"
        await wait_for("everything", lambda: len(gather(events, "stdout")) == 11 + len(big))
        assert gather(events, "stdout") == b"first line\n" + big
        await wait_for("stderr", lambda: gather(events, "stderr") == b"warn\n")
        assert all(max(len(a.stdout), len(a.stderr)) <= log_chunk_bytes_max for a in pair.answers)
        # A reader picks up from its own offsets.
        view = pair.requester.read(pair.job_id, stdout_offset=5, stderr_offset=2, bytes_max=6)
        assert (view.source, view.stdout, view.stderr) == ("live", b" line\n", b"rn\n"), view
        assert (view.stdout_size, view.stderr_size, view.ended) == (11 + len(big), 5, False)
        # The job ends; once the sealed logs are opened they are what every read shows.
        pair.executor.running = False
        result = RunResult("succeeded", "exited 0", 0, 10, b"", (), b"sealed out\n", b"")
        pair.set_requester(state=JobState.SETTLING, result=result)
        await wait_for("the end event", lambda: any(e.ended for e in events))
        view = pair.requester.read(pair.job_id)
        assert (view.source, view.stdout, view.ended) == ("sealed", b"sealed out\n", True), view
        nursery.cancel_scope.cancel()


async def test_a_cut_connection_resumes_from_the_offsets_held_without_a_byte_twice(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        pair = open_pair(nursery)
        events: list[Any] = []
        nursery.start_soon(collect, pair.requester.subscribe(), events)
        pair.executor.streams["stdout"] += b"a\n"
        pair.requester.follow(pair.job_id)
        await wait_for("a", lambda: gather(events, "stdout") == b"a\n")
        pair.cut = 3
        pair.executor.streams["stdout"] += b"b\n"
        await wait_for("the cut", lambda: pair.cut == 0)
        await wait_for("b", lambda: gather(events, "stdout") == b"a\nb\n")
        assert pair.requester.counters["log_pull_failures"] == 3
        offsets = [r.stdout_offset for r in pair.requests]
        assert offsets.count(2) == 4, f"the cut pulls and the next one ask from 2: {offsets}"
        await wait_for("a pull from 4", lambda: pair.requests[-1].stdout_offset == 4)
        nursery.cancel_scope.cancel()


async def test_a_rerun_on_the_provider_starts_a_new_generation_from_zero(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        pair = open_pair(nursery)
        events: list[Any] = []
        nursery.start_soon(collect, pair.requester.subscribe(), events)
        pair.executor.streams["stdout"] += b"run one\n"
        pair.requester.follow(pair.job_id)
        await wait_for("run one", lambda: gather(events, "stdout") == b"run one\n")
        # The provider restarted and runs the job again: its streams start over.
        pair.set_provider(stamps=(Stamp(JobState.RUNNING, 1_000), Stamp(JobState.RUNNING, 9_000)))
        pair.executor.streams["stdout"] = bytearray(b"run two\n")
        await wait_for("the restart", lambda: pair.requester.read(pair.job_id).generation == 2)
        restart = [e for e in events if e.stream == "" and not e.ended]
        assert len(restart) == 1 and restart[0].generation == 2, events
        after = events.index(restart[0]) + 1
        await wait_for("run two", lambda: gather(events[after:], "stdout") == b"run two\n")
        assert pair.requester.read(pair.job_id).stdout == b"run two\n"
        nursery.cancel_scope.cancel()


async def test_the_live_tail_is_capped(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_logs, "live_log_bytes_max", 100)
    async with trio.open_nursery() as nursery:
        pair = open_pair(nursery)
        pair.executor.streams["stdout"] += b"x" * 1000
        pair.requester.follow(pair.job_id)
        await wait_for("the cap", lambda: len(pair.requester.read(pair.job_id).stdout) == 100)
        pulls = len(pair.requests)
        await trio.sleep(5)
        assert len(pair.requester.read(pair.job_id).stdout) == 100, "the tail grew past its cap"
        assert all(r.bytes_max <= 100 for r in pair.requests[pulls:])
        assert len(pair.requests) > pulls, "stderr has room: the pulls go on"
        pair.executor.streams["stderr"] += b"e" * 1000
        await wait_for("both caps", lambda: len(pair.requester.read(pair.job_id).stderr) == 100)
        pulls = len(pair.requests)
        await trio.sleep(5)
        assert len(pair.requests) == pulls, "both streams are full: no more pulls"
        nursery.cancel_scope.cancel()


async def test_a_requester_follows_a_bounded_number_of_jobs(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_logs, "live_tails_max", 1)
    async with trio.open_nursery() as nursery:
        pair = open_pair(nursery)
        pair.requester.follow(pair.job_id)
        other = dataclasses.replace(pair.record, job_id=b"\x01" * 32, attempt_job_id=b"\x01" * 32)
        pair.requester_book.put(other.job_id, other)
        with pytest.raises(MarketError, match="followed for 1 jobs"):
            pair.requester.follow(other.job_id)
        nursery.cancel_scope.cancel()


async def test_the_provider_answers_only_its_requester_bounded_and_rate_limited(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        pair = open_pair(nursery)
        pair.executor.streams["stdout"] += b"y" * (3 * log_chunk_bytes_max)
        ask = ledger.encode(LogTailRequest(pair.job_id, 0, 0, 10 * log_chunk_bytes_max))
        with pytest.raises(NetError, match="no such job of yours"):
            await pair.provider.on_log_tail("someone-else", ask)
        unknown = ledger.encode(LogTailRequest(b"\x02" * 32, 0, 0, 10))
        with pytest.raises(NetError, match="no such job of yours"):
            await pair.provider.on_log_tail(REQUESTER_PEER, unknown)
        with pytest.raises(NetError, match=">= 0"):
            await pair.provider.on_log_tail(
                REQUESTER_PEER, ledger.encode(LogTailRequest(pair.job_id, -1, 0, 10))
            )
        with pytest.raises(NetError, match="malformed"):
            await pair.provider.on_log_tail(REQUESTER_PEER, b"\xff" * 300)
        answers = []
        for _ in range(_logs.log_tail_burst):
            answer = await pair.provider.on_log_tail(REQUESTER_PEER, ask)
            answers.append(ledger.decode(LogTailChunk, answer, max_bytes=1 << 20))
        assert all(len(a.stdout) == log_chunk_bytes_max for a in answers), "not capped"
        assert answers[0].stdout_size == 3 * log_chunk_bytes_max and not answers[0].ended
        with pytest.raises(NetError, match="log requests a second"):
            await pair.provider.on_log_tail(REQUESTER_PEER, ask)
        await trio.sleep(1)
        await pair.provider.on_log_tail(REQUESTER_PEER, ask)
        # Once the run is measured its logs come from the record, and it says it ended.
        result = RunResult("succeeded", "exited 0", 0, 10, b"", (), b"final\n", b"e\n")
        pair.set_provider(state=JobState.SETTLING, result=result)
        await trio.sleep(1)
        chunk = ledger.decode(
            LogTailChunk, await pair.provider.on_log_tail(REQUESTER_PEER, ask), max_bytes=1 << 20
        )
        assert (chunk.stdout, chunk.stderr, chunk.ended) == (b"final\n", b"e\n", True), chunk
        nursery.cancel_scope.cancel()


@given(
    st.builds(LogTailRequest, st.binary(max_size=32), u63, u63, u63),
    st.builds(
        LogTailChunk,
        st.binary(max_size=32),
        u63,
        u63,
        st.binary(max_size=64),
        u63,
        u63,
        st.binary(max_size=64),
        u63,
        st.booleans(),
    ),
)
def test_the_log_messages_round_trip_the_codec(ask: LogTailRequest, chunk: LogTailChunk) -> None:
    assert ledger.decode(LogTailRequest, ledger.encode(ask)) == ask
    assert ledger.decode(LogTailChunk, ledger.encode(chunk)) == chunk
