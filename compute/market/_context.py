"""What both roles share: the node's seams (``Context``), job events, and one role's records
and drivers (``JobBook``, ``Drivers``).

Each role owns its own ``JobBook`` (the requester's keyed by job id, the provider's by attempt
id), so no structure here is keyed by a role. Every change to a record is persisted in one
synced batch before anyone hears of it, then published to the event subscribers.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, TypeVar

import trio

import ledger
from compute.exceptions import ComputeError
from compute.market._wire import first_message
from compute.market.exceptions import ChainRejected, MarketError
from compute.market.types import JobRecord, JobState, Stamp

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Sequence

    from compute import ImageStore, OfferDirectory
    from compute.abc import ClockMs
    from compute.market._store import JobStore
    from compute.market.abc import ChainAPI, MarketNetAPI
    from compute.market.types import JobManifest, MarketConfig, Role

log = logging.getLogger("gpumesh.compute.market")
S = TypeVar("S", bound=Any)

event_queue_max = 256
event_subscribers_max = 16
tx_submit_attempts_max = 3
chain_poll_s = 1.0
"""Upper bound on one wait for a block: a driver re-checks its condition at least this often."""


class Events:
    """Every job state change, to a bounded number of bounded subscribers."""

    def __init__(self, counters: dict[str, int]) -> None:
        self._subscribers: list[trio.MemorySendChannel[JobRecord]] = []
        self._counters = counters

    def subscribe(self) -> trio.MemoryReceiveChannel[JobRecord]:
        self._subscribers = [s for s in self._subscribers if not _closed(s)]
        if len(self._subscribers) >= event_subscribers_max:
            raise MarketError(f"at most {event_subscribers_max} event subscribers")
        send, receive = trio.open_memory_channel[JobRecord](event_queue_max)
        self._subscribers.append(send)
        return receive

    def emit(self, record: JobRecord) -> None:
        for send in self._subscribers:
            try:
                send.send_nowait(record)
            except trio.WouldBlock:
                self._counters["events_dropped"] += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass


def _closed(send: trio.MemorySendChannel[JobRecord]) -> bool:
    try:
        return send.statistics().open_receive_channels == 0
    except trio.ClosedResourceError:
        return True


@dataclasses.dataclass
class Context:
    """The node's seams and settings, shared by both roles."""

    key: ledger.SigningKey
    chain_id: str
    net: MarketNetAPI
    chain: ChainAPI
    store: JobStore
    directory: OfferDirectory
    config: MarketConfig
    clock_ms: ClockMs
    counters: dict[str, int]
    events: Events
    nursery: trio.Nursery | None = None
    """The service's nursery while it runs (drivers and helper tasks start in it)."""
    images: ImageStore | None = None
    """The node's image store: the images its jobs name (``_imagemesh``); None: no images."""

    @property
    def address(self) -> bytes:
        return self.key.address

    def sign(self, obj: S) -> S:
        return ledger.sign_object(obj, self.key, self.chain_id)

    def fee(self) -> int:
        """The fee every market transaction pays: the config's, at least the chain's minimum."""
        return max(self.config.fee, self.chain.params().fee_min)

    async def request(self, peer_id: str, protocol: str, payload: bytes) -> bytes:
        return await self.net.request(peer_id, protocol, payload, self.config.request_timeout_s)

    async def wait_block(self) -> None:
        with trio.move_on_after(chain_poll_s):
            await self.chain.wait_new_block()

    async def submit_and_commit(
        self, build: Callable[[int], ledger.Transaction], on_submitted: Callable[[bytes], None]
    ) -> tuple[bool, str]:
        """Submit a tx and wait for it to commit: ``(ok, error)``. Resubmits (bounded) if the
        mempool drops it; raises ``ChainRejected`` if the mempool refuses it outright."""
        for _ in range(tx_submit_attempts_max):
            txh = await self.chain.submit(build)
            on_submitted(txh)
            while True:
                status = self.chain.tx_result(txh)
                if status is None:
                    break
                committed, ok, error = status
                if committed:
                    return ok, error
                await self.wait_block()
        raise ChainRejected(f"the transaction was dropped {tx_submit_attempts_max} times")

    def start_soon(self, fn: Callable[[], Awaitable[None]]) -> None:
        """A helper task in the service's nursery (none before ``run`` or after it ends)."""
        if self.nursery is not None:
            self.nursery.start_soon(fn)


class JobBook:
    """The records of one role, in memory and in the job store."""

    def __init__(
        self,
        role: Role,
        ctx: Context,
        on_finish: Callable[[JobRecord, JobState], dict[str, object]] | None = None,
    ) -> None:
        self.role = role
        self._ctx = ctx
        self._on_finish = on_finish
        self._jobs: dict[bytes, JobRecord] = {}
        for record in ctx.store.records(role):
            self._jobs[ctx.store.record_key(record)] = record

    def get(self, key: bytes) -> JobRecord | None:
        return self._jobs.get(key)

    def __getitem__(self, key: bytes) -> JobRecord:
        return self._jobs[key]

    def __contains__(self, key: bytes) -> bool:
        return key in self._jobs

    def records(self) -> Iterator[JobRecord]:
        return iter(list(self._jobs.values()))

    def unfinished(self) -> list[bytes]:
        return [key for key, r in self._jobs.items() if not r.state.terminal]

    def matching(self, predicate: Callable[[JobRecord], bool]) -> list[bytes]:
        return [key for key, r in self._jobs.items() if predicate(r)]

    def add(
        self, record: JobRecord, *, manifest: JobManifest | None = None, blobs: Sequence[bytes] = ()
    ) -> JobRecord:
        """Persist a new record (with its manifest and blobs) in one batch, then publish it."""
        assert record.role is self.role
        self._ctx.store.put(record, manifest=manifest, blobs=blobs)
        self._jobs[self._ctx.store.record_key(record)] = record
        self._ctx.events.emit(record)
        return record

    def update(self, record: JobRecord, **changes: object) -> JobRecord:
        """Persist ``record`` with ``changes`` (stamping a new state), then publish it."""
        key = self._ctx.store.record_key(record)
        current = self._jobs.get(key, record)
        new = dataclasses.replace(current, **changes)  # type: ignore[arg-type]
        if new.state is not current.state:
            stamp = Stamp(new.state, self._ctx.clock_ms())
            new = dataclasses.replace(new, stamps=(*new.stamps, stamp))
        self._ctx.store.put(new)
        self._jobs[key] = new
        self._ctx.events.emit(new)
        return new

    def finish(self, record: JobRecord, state: JobState, error: str = "") -> JobRecord:
        """End a job in ``state`` (terminal), keeping the first error recorded."""
        assert state.terminal
        extra = {} if self._on_finish is None else self._on_finish(record, state)
        return self.update(record, state=state, error=error or record.error, **extra)

    def count(self, predicate: Callable[[JobRecord], bool]) -> int:
        return sum(1 for r in self._jobs.values() if predicate(r))


class Drivers:
    """One task per unfinished job, each behind its own fault barrier."""

    def __init__(
        self, book: JobBook, ctx: Context, drive: Callable[[bytes], Awaitable[None]]
    ) -> None:
        self._book = book
        self._ctx = ctx
        self._drive = drive
        self._scopes: dict[bytes, trio.CancelScope] = {}

    def start(self, key: bytes, *, replace: bool = False) -> None:
        nursery = self._ctx.nursery
        if nursery is None:
            return  # run() starts the drivers of every unfinished job
        if key in self._scopes:
            if not replace:
                return
            self._scopes[key].cancel()
        scope = trio.CancelScope()
        self._scopes[key] = scope
        nursery.start_soon(self._run, key, scope)

    def cancel(self, key: bytes) -> None:
        scope = self._scopes.get(key)
        if scope is not None:
            scope.cancel()

    async def _run(self, key: bytes, scope: trio.CancelScope) -> None:
        # The fault barrier of one job: whatever a peer made it do, an exception ends this
        # job (with the reason) and never the service. Cancellation passes through.
        with scope:
            try:
                await self._drive(key)
            except* (MarketError, ComputeError) as group:
                reason = first_message(group)
                log.warning("job %s failed: %s", key.hex()[:16], reason)
                self._fail(key, reason)
            except* Exception as group:
                self._ctx.counters["job_faults"] += 1
                log.error("job %s hit an unexpected error", key.hex()[:16], exc_info=group)
                self._fail(key, f"internal error: {first_message(group)}")
        if self._scopes.get(key) is scope:
            del self._scopes[key]

    def _fail(self, key: bytes, reason: str) -> None:
        record = self._book.get(key)
        if record is not None and not record.state.terminal:
            self._book.finish(record, JobState.FAILED, reason)
