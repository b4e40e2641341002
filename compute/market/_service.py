"""``MarketService``: the one service the node composes, a thin shell over the two roles.

The requester side (``_requester.Requester``) is always there; the provider side
(``_provider.Provider``) when the node provides. Each role has its own records, drivers and
stream handlers; this module wires their handlers (behind the request fault barrier), starts
the drivers of every unfinished job, and answers the public API by delegating to a role.
A subclass may swap a role's class (``requester_cls``, ``provider_cls``) to change one step.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from compute import wall_clock_ms
from compute.market._context import Context, Events
from compute.market._imagemesh import images_in_use
from compute.market._protocol import attempt_job_id
from compute.market._provider import Provider, ProviderSide
from compute.market._requester import Requester
from compute.market._transfers import keep_inputs_swept
from compute.market._wire import (
    JOBS_PURPOSE,
    PROTOCOL_AWARD,
    PROTOCOL_BID,
    PROTOCOL_CANCEL,
    PROTOCOL_INPUT,
    PROTOCOL_LOGS,
    PROTOCOL_OUTPUT,
    PROTOCOL_OUTPUTS,
    PROTOCOL_STATUS,
    guarded,
)
from compute.market.exceptions import NetError, UnknownJob
from compute.market.types import Role

if TYPE_CHECKING:
    import builtins
    from collections.abc import Awaitable, Callable

    from trio._core._run import TaskStatus

    import ledger
    from compute import ImageStore, OfferDirectory
    from compute.abc import ClockMs
    from compute.market._logs import LogEvent, LogsView
    from compute.market._store import JobStore
    from compute.market.abc import ChainAPI, MarketNetAPI
    from compute.market.types import (
        Bid,
        JobRecord,
        JobResultView,
        JobSubmission,
        MarketConfig,
    )

__all__ = [
    "JOBS_PURPOSE",
    "PROTOCOL_AWARD",
    "PROTOCOL_BID",
    "PROTOCOL_CANCEL",
    "PROTOCOL_INPUT",
    "PROTOCOL_LOGS",
    "PROTOCOL_OUTPUT",
    "PROTOCOL_OUTPUTS",
    "PROTOCOL_STATUS",
    "MarketService",
    "ProviderSide",
    "attempt_job_id",
]

log = logging.getLogger("gpumesh.compute.market")


class MarketService:
    """The job market on one node: requester side always, provider side with ``provider``."""

    requester_cls: type[Requester] = Requester
    provider_cls: type[Provider] = Provider

    def __init__(
        self,
        key: ledger.SigningKey,
        chain_id: str,
        net: MarketNetAPI,
        chain: ChainAPI,
        store: JobStore,
        directory: OfferDirectory,
        provider: ProviderSide | None,
        config: MarketConfig,
        *,
        clock_ms: ClockMs = wall_clock_ms,
        images: ImageStore | None = None,
    ) -> None:
        counters = {
            "requests_seen": 0,
            "requests_rejected": 0,
            "bids_sent": 0,
            "bids_received": 0,
            "bids_rejected": 0,
            "events_dropped": 0,
            "job_faults": 0,
            "handler_faults": 0,
        }
        self._counters = counters
        self._ctx = Context(
            key=key,
            chain_id=chain_id,
            net=net,
            chain=chain,
            store=store,
            directory=directory,
            config=config,
            clock_ms=clock_ms,
            counters=counters,
            events=Events(counters),
            images=images,
        )
        self.requester = self.requester_cls(self._ctx)
        self.provider = None if provider is None else self.provider_cls(self._ctx, provider)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ctx = self._ctx
        handlers = self.requester.handlers()
        if self.provider is not None:
            handlers.update(self.provider.handlers())
        try:
            async with trio.open_nursery() as nursery:
                ctx.nursery = nursery
                for protocol, handler in handlers.items():
                    barrier = guarded(protocol, handler, self._counters)
                    ctx.net.set_handler(protocol, self._in_service(protocol, barrier))
                if self.provider is not None:
                    nursery.start_soon(self.provider.requests_loop)
                    nursery.start_soon(self.provider.keep_bonded)
                # Inputs go once no unfinished job names them (also those of jobs that
                # ended while this node was down, and their partial fetches).
                nursery.start_soon(keep_inputs_swept, ctx)
                for key in self.requester.book.unfinished():
                    self.requester.drivers.start(key)
                if self.provider is not None:
                    self.provider.start()
                task_status.started()
                await trio.sleep_forever()
        finally:
            ctx.nursery = None

    def _in_service(
        self, protocol: str, handler: Callable[[str, bytes], Awaitable[bytes]]
    ) -> Callable[[str, bytes], Awaitable[bytes]]:
        """``handler`` run as a task of the service's nursery, so that no request a peer
        sent can still be writing to the job store once ``run`` has returned (the net calls
        handlers from its own tasks, which outlive the service). A request that arrives
        while the service is not running is refused; one in flight when it stops is
        cancelled with the service and answered with an error."""

        async def serve(peer_id: str, data: bytes) -> bytes:
            nursery = self._ctx.nursery
            if nursery is None:
                raise NetError(f"the market service is not running ({protocol})")
            done = trio.Event()
            scope = trio.CancelScope()
            answer: list[bytes] = []
            failure: list[Exception] = []

            async def call() -> None:
                try:
                    with scope:
                        answer.append(await handler(peer_id, data))
                except Exception as exc:  # handed to the caller's task below, not swallowed
                    failure.append(exc)
                finally:
                    done.set()

            nursery.start_soon(call)
            try:
                await done.wait()
            finally:
                scope.cancel()  # the caller gave up (or timed out): the handler stops too
            if failure:
                raise failure[0]
            if not answer:
                raise NetError(f"the market service stopped while serving {protocol}")
            return answer[0]

        return serve

    async def submit(self, submission: JobSubmission) -> JobRecord:
        """Check, persist and start a job; raises ``Unsatisfiable`` at once (naming the unmet
        requirement) when no live offer can take it, ``InvalidSubmission`` when malformed."""
        return await self.requester.submit(submission)

    def get(self, job_id: bytes, role: Role = Role.REQUESTER) -> JobRecord:
        if role is Role.REQUESTER:
            return self.requester.get(job_id)
        record = None if self.provider is None else self.provider.book.get(job_id)
        if record is None:
            raise UnknownJob(job_id.hex())
        return record

    def list(self, role: Role | None = None) -> builtins.list[JobRecord]:
        records: builtins.list[JobRecord] = []
        if role in (None, Role.REQUESTER):
            records += self.requester.book.records()
        if role in (None, Role.PROVIDER) and self.provider is not None:
            records += self.provider.book.records()
        return records

    def bids(self, job_id: bytes) -> builtins.list[Bid]:
        return list(self.get(job_id).bids)

    async def cancel(self, job_id: bytes) -> JobRecord:
        """Cancel a requested job: a Cancel tx if a trade is open, and a stream notice to the
        provider. Returns the record once it reaches a terminal state (or the attempt ends)."""
        return await self.requester.cancel(job_id)

    async def result(self, job_id: bytes) -> JobResultView:
        """The outputs of a done job as ``{path: bytes}``, its stdout/stderr and receipt."""
        return await self.requester.result(job_id)

    async def logs(
        self, job_id: bytes, stdout_offset: int = 0, stderr_offset: int = 0, bytes_max: int = 0
    ) -> LogsView:
        """A requested job's stdout/stderr from two offsets: the sealed logs once its outputs
        are opened, else the live tail; a running job is followed from now on (``_logs``)."""
        return await self.requester.logs(job_id, stdout_offset, stderr_offset, bytes_max)

    def subscribe_logs(self) -> trio.MemoryReceiveChannel[LogEvent]:
        """Every new chunk of the live logs of every followed job from now on."""
        return self.requester.live_logs.subscribe()

    def subscribe(self) -> trio.MemoryReceiveChannel[JobRecord]:
        """Every job state change from now on; a subscriber that falls behind misses some."""
        return self._ctx.events.subscribe()

    def images_in_use(self) -> dict[str, int]:
        """Image hex -> unfinished jobs requested here that run in it."""
        return images_in_use(self.requester.book.records(), self._ctx.store)

    def statistics(self) -> dict[str, object]:
        states: dict[str, int] = {}
        for record in self.list():
            label = f"{record.role.name.lower()}_{record.state.label}"
            states[label] = states.get(label, 0) + 1
        return {**self._counters, **self.requester.live_logs.counters, "jobs": states}
