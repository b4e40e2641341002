"""Live logs: a running job's stdout and stderr, pulled by the requester from its provider.

Pull, not push: while a followed job runs, the requester asks ``PROTOCOL_LOG_TAIL`` for the
bytes past the offsets it already holds, about every ``log_pull_interval_ms`` (at once again
while it is catching up). The requester's offsets are the whole state, so a cut connection
or a restart of either side resumes where it stopped, and the transport is the request /
response of every other market protocol (the seeded simulation's ``ctx.request`` too).

Bounds: one answer carries at most ``log_chunk_bytes_max`` of each stream; a provider answers
one attempt at most ``log_tail_requests_per_s`` times a second (burst ``log_tail_burst``) and
only to the peer that awarded it; the requester holds at most ``live_log_bytes_max`` of each
stream for at most ``live_tails_max`` jobs, in memory.

Privacy and trust (the decision): live logs are plaintext the provider hands over before it
is paid, and nothing checks them against the sealed outputs. So they are the requester's
opt-in: a requester pulls a job's live logs only once someone asked for them (``job_logs``,
``gpumesh job logs -f``, ``job submit --wait``), and never otherwise. A provider cannot tell
log bytes from results; what it gives out early is paid for anyway, as a requester's cancel
pays the provider pro rata for the time run. The authoritative logs stay the ones inside the
sealed bundle: once the requester has opened it, every read of the logs comes from there
(``source: "sealed"``), and the live tail only fills the time before.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

import trio

import ledger
from compute.market._exchange import exec_id
from compute.market._wire import PROTOCOL_LOG_TAIL, decode
from compute.market.exceptions import MarketError, NetError, UnknownJob
from compute.market.types import JobState, log_bytes_max

if TYPE_CHECKING:
    from compute import Executor
    from compute.market._context import Context, JobBook
    from compute.market.types import JobRecord

log = logging.getLogger("gpumesh.compute.market")

log_chunk_bytes_max = 64 * 1024
"""Most bytes of each stream one ``PROTOCOL_LOG_TAIL`` answer carries."""
log_tail_request_bytes_max = 256
log_tail_answer_bytes_max = 2 * log_chunk_bytes_max + 1024
log_pull_interval_ms = 500
"""How often a requester asks for new bytes of a followed job that has caught up."""
log_pull_gap_ms = 120
"""Least time between two pulls of one job (while catching up): under the provider's rate."""
log_tail_requests_per_s = 10.0
"""Per attempt, at the provider: beyond it (after the burst) a request is refused."""
log_tail_burst = 10
log_rate_entries_max = 4096
live_tails_max = 32
"""Jobs whose live logs one requester holds (and pulls) at once."""
live_log_bytes_max = log_bytes_max
"""Most of each stream a requester holds of a live tail (the job record keeps as much)."""
log_subscribers_max = 16
log_event_queue_max = 1024
streams = ("stdout", "stderr")


@dataclasses.dataclass(frozen=True, slots=True)
class LogTailRequest:
    """Requester -> provider: each stream's bytes of an attempt from these offsets, at most
    ``bytes_max`` of each (the provider lowers it to ``log_chunk_bytes_max``)."""

    attempt_job_id: bytes
    stdout_offset: int
    stderr_offset: int
    bytes_max: int


@dataclasses.dataclass(frozen=True, slots=True)
class LogTailChunk:
    """Provider -> requester: the bytes asked for, as far as the job has written them."""

    attempt_job_id: bytes
    run_started_ms: int
    """When the run these bytes come from started (0: not started). A re-run after the
    provider restarted is a new run whose streams start again at 0."""
    stdout_offset: int
    stdout: bytes
    stdout_size: int
    """Bytes the run wrote to stdout so far (0 when not known: no run here now)."""
    stderr_offset: int
    stderr: bytes
    stderr_size: int
    ended: bool
    """The run is over: no byte past ``*_size`` will come."""


@dataclasses.dataclass(frozen=True, slots=True)
class LogsView:
    """What a requester holds of a job's logs, from two offsets (``Requester.logs``)."""

    job_id: bytes
    state: str
    source: str
    """``"sealed"``: from the checked, paid-for bundle; ``"live"``: pulled while it ran
    (unchecked); ``"none"``: nothing yet."""
    generation: int
    """Bumped when the tail starts over (a new attempt, or a re-run after a restart): a
    follower then reads again from offset 0."""
    stdout_offset: int
    stdout: bytes
    stdout_size: int
    stderr_offset: int
    stderr: bytes
    stderr_size: int
    ended: bool
    """No byte past the sizes will come (the job ended, or its sealed logs are in)."""


@dataclasses.dataclass(frozen=True, slots=True)
class LogEvent:
    """New bytes of one stream of a followed job (``stream`` "" with ``ended``: it ended;
    ``stream`` "" otherwise: its tail started over, see ``generation``)."""

    job_id: bytes
    generation: int
    stream: str
    offset: int
    data: bytes
    ended: bool
    state: str


def _run_started_ms(record: JobRecord) -> int:
    return max((s.at_ms for s in record.stamps if s.state is JobState.RUNNING), default=0)


class ProviderLogs:
    """The provider's side: answers ``PROTOCOL_LOG_TAIL`` for its own jobs' requesters."""

    def __init__(self, ctx: Context, book: JobBook, executor: Executor) -> None:
        self._ctx = ctx
        self._book = book
        self._executor = executor
        self._rates: OrderedDict[bytes, tuple[float, int]] = OrderedDict()
        """Per attempt: (tokens, at_ms) of its request bucket."""

    def _admit(self, aid: bytes) -> bool:
        now = self._ctx.clock_ms()
        tokens, at_ms = self._rates.pop(aid, (float(log_tail_burst), now))
        tokens = min(float(log_tail_burst), tokens + (now - at_ms) * log_tail_requests_per_s / 1000)
        admitted = tokens >= 1.0
        self._rates[aid] = (tokens - 1.0 if admitted else tokens, now)
        while len(self._rates) > log_rate_entries_max:
            self._rates.popitem(last=False)
        return admitted

    async def on_log_tail(self, peer_id: str, data: bytes) -> bytes:
        ask = decode(LogTailRequest, data, log_tail_request_bytes_max)
        if min(ask.stdout_offset, ask.stderr_offset, ask.bytes_max) < 0:
            raise NetError("log offsets and bytes_max must be >= 0")
        record = self._book.get(ask.attempt_job_id)
        if record is None or record.counterparty_peer_id != peer_id:
            raise NetError("no such job of yours here")
        if not self._admit(ask.attempt_job_id):
            raise NetError(f"more than {log_tail_requests_per_s:g} log requests a second")
        room = min(ask.bytes_max, log_chunk_bytes_max)
        offsets = (ask.stdout_offset, ask.stderr_offset)
        parts: list[tuple[bytes, int]] = []
        ended = record.state.terminal
        if record.result is not None:
            # The run is over and measured: its logs are what the sealed bundle carries.
            ended = True
            for offset, whole in zip(
                offsets, (record.result.stdout, record.result.stderr), strict=True
            ):
                parts.append((whole[offset : offset + room], len(whole)))
        elif record.state is JobState.RUNNING:
            for offset, stream in zip(offsets, streams, strict=True):
                tail = self._executor.log_tail(exec_id(record.attempt_job_id), stream, offset, room)
                parts.append((tail.data, tail.size))
        else:
            parts = [(b"", 0), (b"", 0)]
        chunk = LogTailChunk(
            attempt_job_id=record.attempt_job_id,
            run_started_ms=_run_started_ms(record),
            stdout_offset=ask.stdout_offset,
            stdout=parts[0][0],
            stdout_size=parts[0][1],
            stderr_offset=ask.stderr_offset,
            stderr=parts[1][0],
            stderr_size=parts[1][1],
            ended=ended,
        )
        return ledger.encode(chunk)


@dataclasses.dataclass
class _Tail:
    attempt_job_id: bytes
    generation: int
    run_started_ms: int = 0
    stdout: bytearray = dataclasses.field(default_factory=bytearray)
    stderr: bytearray = dataclasses.field(default_factory=bytearray)
    complete: bool = False
    """The provider said the run ended and every byte of it is here."""

    def buffer(self, stream: str) -> bytearray:
        return self.stdout if stream == "stdout" else self.stderr


class RequesterLogs:
    """The requester's side: pulls the live logs of followed jobs, keeps them (bounded),
    answers reads from offsets and tells subscribers of every new chunk."""

    def __init__(self, ctx: Context, book: JobBook) -> None:
        self._ctx = ctx
        self._book = book
        self._tails: OrderedDict[bytes, _Tail] = OrderedDict()
        self._pulling: set[bytes] = set()
        self._subscribers: list[trio.MemorySendChannel[LogEvent]] = []
        self.counters = {"log_pulls": 0, "log_pull_failures": 0, "log_events_dropped": 0}

    # ---- reads ----

    def read(
        self, job_id: bytes, stdout_offset: int = 0, stderr_offset: int = 0, bytes_max: int = 0
    ) -> LogsView:
        """The job's logs from two offsets (at most ``bytes_max`` of each, 0: all held); a
        job still running is followed from now on (its live logs are pulled)."""
        if min(stdout_offset, stderr_offset, bytes_max) < 0:
            raise MarketError("log offsets and bytes_max must be >= 0")
        record = self._book.get(job_id)
        if record is None:
            raise UnknownJob(job_id.hex())
        room = bytes_max or live_log_bytes_max
        tail = self._tails.get(job_id)
        generation = tail.generation if tail is not None else 0
        ended = record.state.terminal or record.result is not None
        if record.result is not None:
            source = "sealed"
            whole = (record.result.stdout, record.result.stderr)
        elif tail is not None:
            source = "live"
            whole = (bytes(tail.stdout), bytes(tail.stderr))
        else:
            source = "none"
            whole = (b"", b"")
        if not ended:
            self.follow(job_id)
        return LogsView(
            job_id=job_id,
            state=record.state.label,
            source=source,
            generation=generation,
            stdout_offset=stdout_offset,
            stdout=whole[0][stdout_offset : stdout_offset + room],
            stdout_size=len(whole[0]),
            stderr_offset=stderr_offset,
            stderr=whole[1][stderr_offset : stderr_offset + room],
            stderr_size=len(whole[1]),
            ended=ended,
        )

    def subscribe(self) -> trio.MemoryReceiveChannel[LogEvent]:
        """Every new chunk of every followed job from now on (a slow subscriber misses some:
        it reads them again with ``read`` from its offsets)."""
        self._subscribers = [s for s in self._subscribers if not _closed(s)]
        if len(self._subscribers) >= log_subscribers_max:
            raise MarketError(f"at most {log_subscribers_max} log subscribers")
        send, receive = trio.open_memory_channel[LogEvent](log_event_queue_max)
        self._subscribers.append(send)
        return receive

    def _emit(self, event: LogEvent) -> None:
        for send in self._subscribers:
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                self.counters["log_events_dropped"] += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    # ---- following ----

    def follow(self, job_id: bytes) -> None:
        """Pull the job's live logs until it ends (the requester's opt-in; idempotent)."""
        if job_id in self._pulling or self._ctx.nursery is None:
            return
        record = self._book.get(job_id)
        if record is None or record.state.terminal or record.result is not None:
            return
        if job_id not in self._tails:
            self._make_room()
            self._tails[job_id] = _Tail(record.attempt_job_id, generation=1)
        self._tails.move_to_end(job_id)
        self._pulling.add(job_id)
        self._ctx.nursery.start_soon(self._pull, job_id)

    def _make_room(self) -> None:
        while len(self._tails) >= live_tails_max:
            idle = next((k for k in self._tails if k not in self._pulling), None)
            if idle is None:
                raise MarketError(f"live logs are followed for {live_tails_max} jobs already")
            del self._tails[idle]

    async def _pull(self, job_id: bytes) -> None:
        try:
            await self._pull_until_end(job_id)
        finally:
            self._pulling.discard(job_id)

    async def _pull_until_end(self, job_id: bytes) -> None:
        while True:
            record = self._book.get(job_id)
            if record is None:
                return
            if record.state.terminal or record.result is not None:
                break
            tail = self._tails.get(job_id)
            if tail is None:
                return  # evicted: nobody follows it any more
            more = False
            live = (JobState.LOCKED, JobState.RUNNING, JobState.SETTLING)
            if record.state in live and record.counterparty_peer_id and not tail.complete:
                more = await self._pull_once(job_id, record, tail)
            await trio.sleep((log_pull_gap_ms if more else log_pull_interval_ms) / 1000)
        record = self._book[job_id]
        tail = self._tails.get(job_id)
        self._emit(
            LogEvent(
                job_id=job_id,
                generation=tail.generation if tail is not None else 0,
                stream="",
                offset=0,
                data=b"",
                ended=True,
                state=record.state.label,
            )
        )

    async def _pull_once(self, job_id: bytes, record: JobRecord, tail: _Tail) -> bool:
        """One request for new bytes; True when there is more to fetch at once."""
        if tail.attempt_job_id != record.attempt_job_id:
            tail = self._restart(job_id, record.attempt_job_id, 0, record.state.label)
        rooms = [live_log_bytes_max - len(tail.buffer(s)) for s in streams]
        if max(rooms) <= 0:
            tail.complete = True  # both streams hold their cap: the sealed logs have the rest
            return False
        ask = LogTailRequest(
            attempt_job_id=record.attempt_job_id,
            stdout_offset=len(tail.stdout),
            stderr_offset=len(tail.stderr),
            bytes_max=min(log_chunk_bytes_max, max(rooms)),
        )
        self.counters["log_pulls"] += 1
        try:
            data = await self._ctx.request(
                record.counterparty_peer_id, PROTOCOL_LOG_TAIL, ledger.encode(ask)
            )
            chunk = decode(LogTailChunk, data, log_tail_answer_bytes_max)
            _check_chunk(ask, chunk)
        except NetError as exc:
            # Best effort: the next pull asks again from the same offsets.
            self.counters["log_pull_failures"] += 1
            log.debug("live logs of %s: %s", job_id.hex()[:16], exc)
            return False
        return self._apply(job_id, record, tail, ask, chunk)

    def _restart(self, job_id: bytes, aid: bytes, run_started_ms: int, state: str) -> _Tail:
        old = self._tails[job_id]
        tail = _Tail(aid, generation=old.generation + 1, run_started_ms=run_started_ms)
        self._tails[job_id] = tail
        self._emit(LogEvent(job_id, tail.generation, "", 0, b"", ended=False, state=state))
        return tail

    def _apply(
        self,
        job_id: bytes,
        record: JobRecord,
        tail: _Tail,
        ask: LogTailRequest,
        chunk: LogTailChunk,
    ) -> bool:
        if chunk.run_started_ms == 0:
            return False  # no run there yet (inputs still coming, or between runs)
        if tail.run_started_ms != chunk.run_started_ms:
            if tail.run_started_ms != 0 or ask.stdout_offset or ask.stderr_offset:
                # Another run than the bytes held (the provider re-ran it after a restart).
                self._restart(job_id, tail.attempt_job_id, chunk.run_started_ms, record.state.label)
                return True
            tail.run_started_ms = chunk.run_started_ms
        more = False
        for stream, data, size in (
            ("stdout", chunk.stdout, chunk.stdout_size),
            ("stderr", chunk.stderr, chunk.stderr_size),
        ):
            buffer = tail.buffer(stream)
            data = data[: live_log_bytes_max - len(buffer)]
            if data:
                offset = len(buffer)
                buffer += data
                self._emit(
                    LogEvent(
                        job_id, tail.generation, stream, offset, data, False, record.state.label
                    )
                )
            if size > len(buffer) and len(buffer) < live_log_bytes_max:
                more = True
        if chunk.ended and not more:
            tail.complete = True
        return more


def _check_chunk(ask: LogTailRequest, chunk: LogTailChunk) -> None:
    """A provider's answer must be for what was asked, within the size asked."""
    if chunk.attempt_job_id != ask.attempt_job_id:
        raise NetError("the log chunk is for another attempt")
    if (chunk.stdout_offset, chunk.stderr_offset) != (ask.stdout_offset, ask.stderr_offset):
        raise NetError("the log chunk is from other offsets than asked")
    if max(len(chunk.stdout), len(chunk.stderr)) > ask.bytes_max:
        raise NetError("the log chunk is larger than asked")
    if chunk.run_started_ms < 0 or min(chunk.stdout_size, chunk.stderr_size) < 0:
        raise NetError("the log chunk has a negative size or start")


def _closed(send: trio.MemorySendChannel[LogEvent]) -> bool:
    try:
        return send.statistics().open_receive_channels == 0
    except trio.ClosedResourceError:
        return True
