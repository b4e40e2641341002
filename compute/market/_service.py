"""``MarketService``: both sides of the job market on one node, over the net and chain seams.

Every job is driven by one task that reads the job's persisted record and moves it one step
at a time, persisting before it acknowledges anything to a peer; a restart (or a cancel, which
restarts the driver) resumes from the record. The requester side: bidding -> awarded ->
locked -> running -> settling -> done (or failed, cancelled, refunded, output_mismatch). The
provider side: awarded (slots held) -> locked (trade open on chain) -> running -> settling
(receipt submitted) -> done.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, TypeVar

import trio

import ledger
from compute import NoCapacityError, outputs_digest, wall_clock_ms
from compute._sandbox import JobLimits, JobSpec
from compute.exceptions import ComputeError
from compute.market._checks import check_manifest
from compute.market._matching import explain_unsatisfiable, fit_on_node, rank_bids
from compute.market.exceptions import (
    ChainRejected,
    InvalidManifest,
    InvalidSubmission,
    JobNotReady,
    MarketError,
    NetError,
    UnknownJob,
    Unsatisfiable,
)
from compute.market.types import (
    STRATEGIES,
    Award,
    Bid,
    BlobRequest,
    CancelNotice,
    InputRef,
    JobManifest,
    JobRecord,
    JobRequest,
    JobResultView,
    JobState,
    JobSubmission,
    LogsInfo,
    OutputsInfo,
    Role,
    RunResult,
    Stamp,
    argv_items_max,
    bids_per_job_max,
    chunk_bytes_max,
    env_items_max,
    input_files_max,
    log_bytes_max,
    message_bytes_max,
    output_files_max,
    text_chars_max,
)
from compute.types import JobId as ExecJobId
from ledger import Agreement, AgreementTerms, Cancel, Receipt, Refund, TradeStatus

if TYPE_CHECKING:
    import builtins
    from collections.abc import Awaitable, Callable

    from trio._core._run import TaskStatus

    from compute import Executor, Inventory, OfferConfig, OfferDirectory, SlotAllocator
    from compute.abc import ClockMs
    from compute.market._store import JobStore
    from compute.market.abc import ChainAPI, Incoming, MarketNetAPI
    from compute.market.types import MarketConfig

log = logging.getLogger("gpumesh.compute.market")
T = TypeVar("T")

JOBS_PURPOSE = "jobs"
PROTOCOL_BID = "/gpumesh/market/bid/1"
PROTOCOL_AWARD = "/gpumesh/market/award/1"
PROTOCOL_INPUT = "/gpumesh/market/input/1"
PROTOCOL_OUTPUTS = "/gpumesh/market/outputs/1"
PROTOCOL_OUTPUT = "/gpumesh/market/output/1"
PROTOCOL_LOGS = "/gpumesh/market/logs/1"
PROTOCOL_CANCEL = "/gpumesh/market/cancel/1"
PROTOCOL_STATUS = "/gpumesh/market/status/1"

seen_requests_max = 4096
event_queue_max = 256
event_subscribers_max = 16
bids_in_flight_max = 16
bid_windows_max = 2
bid_rounds_max = 5
awards_pending_per_requester_max = 8
"""Awards one requester may hold here whose trade has not opened yet."""
capacity_backoff_ms = 250
capacity_backoff_ms_max = 3_000
capacity_rounds_max = 2_000
"""Waiting for capacity is bounded by the job's deadline; this only bounds the loop."""
"""Bid rounds per job when every bidder refuses the award (all full): queues a burst."""
"""A bid window that closes with no bid at all is extended once before the job fails."""
tx_submit_attempts_max = 3
fetch_attempts_max = 5
fetch_retry_s = 0.5
chain_poll_s = 1.0
"""Upper bound on one wait for a block: a driver re-checks its condition at least this often."""
restart_rerun_margin_ms = 1_000
_BID_IN_FLIGHT, _BID_DELIVERED, _BID_FAILED = 0, 1, 2


def attempt_job_id(job_id: bytes, attempt: int) -> bytes:
    """The ledger job id of ``attempt``: the job id itself first, then a hash per retry."""
    if attempt == 0:
        return job_id
    return ledger.digest(job_id + attempt.to_bytes(4, "big"))


def exec_id(attempt_id: bytes) -> ExecJobId:
    """The executor's name for an attempt (64 hex chars fit its job-id pattern)."""
    return ExecJobId(attempt_id.hex())


@dataclasses.dataclass
class ProviderSide:
    """What a providing node contributes: its devices, slots, sandbox and prices."""

    executor: Executor
    allocator: SlotAllocator
    inventory: Inventory
    offer_config: OfferConfig


def _decode_signed(cls: type[T], data: bytes, chain_id: str) -> T:
    try:
        obj = ledger.decode(cls, data, max_bytes=message_bytes_max)
    except ledger.DecodeError as exc:
        raise NetError(f"malformed {cls.__name__}: {exc}") from exc
    if not ledger.verify_object(obj, chain_id):  # type: ignore[arg-type]
        raise NetError(f"{cls.__name__} signature does not verify")
    return obj


def _decode(cls: type[T], data: bytes, bytes_max: int = message_bytes_max) -> T:
    try:
        return ledger.decode(cls, data, max_bytes=bytes_max)
    except ledger.DecodeError as exc:
        raise NetError(f"malformed {cls.__name__}: {exc}") from exc


class MarketService:
    """The job market on one node: requester side always, provider side with ``provider``."""

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
    ) -> None:
        self._key = key
        self._chain_id = chain_id
        self._net = net
        self._chain = chain
        self._store = store
        self._directory = directory
        self._provider = provider
        self._config = config
        self._clock_ms = clock_ms
        self._jobs: dict[tuple[Role, bytes], JobRecord] = {}
        self._drivers: dict[tuple[Role, bytes], trio.CancelScope] = {}
        self._bidding: set[bytes] = set()
        """Jobs whose bid window is open right now (bids are persisted in their records)."""
        # job id -> (request, reservation expiry ms, one of the _BID_* states)
        self._seen_requests: OrderedDict[bytes, tuple[JobRequest, int, int]] = OrderedDict()
        self._runs: dict[bytes, trio.CancelScope] = {}
        self._subscribers: list[trio.MemorySendChannel[JobRecord]] = []
        self._nursery: trio.Nursery | None = None
        self._bid_slots = trio.Semaphore(bids_in_flight_max)
        self._counters = {
            "requests_seen": 0,
            "requests_rejected": 0,
            "bids_sent": 0,
            "bids_received": 0,
            "bids_rejected": 0,
            "events_dropped": 0,
            "job_faults": 0,
            "handler_faults": 0,
        }
        for record in store.records():
            self._jobs[(record.role, store.record_key(record))] = record

    # ---- public API ------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        handlers: dict[str, Callable[[str, bytes], Awaitable[bytes]]] = {
            PROTOCOL_BID: self._on_bid,
            PROTOCOL_INPUT: self._on_input,
            PROTOCOL_STATUS: self._on_status,
        }
        if self._provider is not None:
            handlers.update(
                {
                    PROTOCOL_AWARD: self._on_award,
                    PROTOCOL_OUTPUTS: self._on_outputs,
                    PROTOCOL_OUTPUT: self._on_output,
                    PROTOCOL_LOGS: self._on_logs,
                    PROTOCOL_CANCEL: self._on_cancel,
                }
            )
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for protocol, handler in handlers.items():
                    self._net.set_handler(protocol, self._guarded(protocol, handler))
                if self._provider is not None:
                    nursery.start_soon(self._requests_loop, self._net.subscribe(JOBS_PURPOSE))
                for role_key, record in list(self._jobs.items()):
                    if not record.state.terminal:
                        self._start_driver(role_key)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    async def submit(self, submission: JobSubmission) -> JobRecord:
        """Check, persist and start a job; raises ``Unsatisfiable`` at once (naming the unmet
        requirement) when no live offer can take it, ``InvalidSubmission`` when malformed."""
        manifest, blobs = self._check_submission(submission)
        active = sum(
            1
            for (role, _), r in self._jobs.items()
            if role is Role.REQUESTER and not r.state.terminal
        )
        if active >= self._config.jobs_active_max:
            raise InvalidSubmission(f"{active} jobs are already active (jobs_active_max)")
        now = self._clock_ms()
        reason = explain_unsatisfiable(
            self._directory.offers(now),
            submission.requirements,
            submission.max_price_per_gpu_second,
        )
        if reason is not None:
            raise Unsatisfiable(reason)
        deadline = submission.deadline_ms or now + self._config.default_deadline_ms
        if deadline <= now + submission.max_wall_ms:
            raise InvalidSubmission("the deadline leaves less than max_wall_ms to run the job")
        request = ledger.sign_object(
            JobRequest(
                chain_id=self._chain_id,
                created_ms=now,
                requirements=submission.requirements,
                max_price_per_gpu_second=submission.max_price_per_gpu_second,
                max_wall_ms=submission.max_wall_ms,
                deadline_ms=deadline,
                bid_window_ms=submission.bid_window_ms or self._config.bid_window_ms,
                manifest_digest=ledger.hash_of(manifest),
                inputs_bytes=sum(len(b) for b in blobs),
            ),
            self._key,
            self._chain_id,
        )
        job_id = ledger.hash_of(request)
        record = JobRecord(
            role=Role.REQUESTER,
            job_id=job_id,
            state=JobState.BIDDING,
            request=request,
            strategy=submission.strategy,
            attempt_job_id=job_id,
            stamps=(Stamp(JobState.BIDDING, now),),
        )
        self._store.put(record, manifest=manifest, blobs=blobs)
        self._jobs[(Role.REQUESTER, job_id)] = record
        self._emit(record)
        self._start_driver((Role.REQUESTER, job_id))
        return record

    def get(self, job_id: bytes, role: Role = Role.REQUESTER) -> JobRecord:
        record = self._jobs.get((role, job_id))
        if record is None:
            raise UnknownJob(job_id.hex())
        return record

    def list(self, role: Role | None = None) -> list[JobRecord]:
        return [r for (k, _), r in self._jobs.items() if role is None or k is role]

    def bids(self, job_id: bytes) -> builtins.list[Bid]:
        return list(self.get(job_id).bids)

    async def cancel(self, job_id: bytes) -> JobRecord:
        """Cancel a requested job: a Cancel tx if a trade is open, and a stream notice to the
        provider. Returns the record once it reaches a terminal state (or the attempt ends)."""
        record = self.get(job_id)
        if record.state.terminal:
            return record
        record = self._update(record, error="cancel requested", cancel_requested=True)
        role_key = (Role.REQUESTER, job_id)
        scope = self._drivers.get(role_key)
        if scope is not None:
            scope.cancel()
        self._start_driver(role_key, replace=True)
        with trio.move_on_after(self._config.request_timeout_s * 3):
            receive = self.subscribe()
            async with receive:
                record = self.get(job_id)
                while not record.state.terminal:
                    changed = await receive.receive()
                    if changed.job_id == job_id and changed.role is Role.REQUESTER:
                        record = changed
        return self.get(job_id)

    async def result(self, job_id: bytes) -> JobResultView:
        """The outputs of a done job as ``{path: bytes}``, its stdout/stderr and receipt."""
        record = self.get(job_id)
        if record.state is not JobState.DONE:
            raise JobNotReady(f"job {job_id.hex()[:16]} is {record.state.label}, not done")
        outputs: dict[str, bytes] = {}
        for file in record.outputs:
            data = self._store.blob(file.sha256)
            if data is None:
                raise MarketError(f"output {file.path!r} is missing from the job store")
            outputs[file.path] = data
        result = record.result
        return JobResultView(
            job_id=job_id,
            state=record.state,
            outputs=outputs,
            stdout=result.stdout if result else b"",
            stderr=result.stderr if result else b"",
            receipt=record.receipt,
        )

    async def logs(self, job_id: bytes) -> LogsInfo:
        """The job's stdout/stderr: from the record once done, else asked of the provider."""
        record = self.get(job_id)
        if record.result is not None:
            return LogsInfo(record.state.label, record.result.stdout, record.result.stderr)
        if not record.counterparty_peer_id:
            return LogsInfo(record.state.label, b"", b"")
        data = await self._request(
            record.counterparty_peer_id, PROTOCOL_LOGS, record.attempt_job_id
        )
        return _decode(LogsInfo, data, 4 * log_bytes_max)

    def subscribe(self) -> trio.MemoryReceiveChannel[JobRecord]:
        """Every job state change from now on; a subscriber that falls behind misses some."""
        self._subscribers = [s for s in self._subscribers if not _closed(s)]
        if len(self._subscribers) >= event_subscribers_max:
            raise MarketError(f"at most {event_subscribers_max} event subscribers")
        send, receive = trio.open_memory_channel[JobRecord](event_queue_max)
        self._subscribers.append(send)
        return receive

    def statistics(self) -> dict[str, object]:
        states: dict[str, int] = {}
        for record in self._jobs.values():
            label = f"{record.role.name.lower()}_{record.state.label}"
            states[label] = states.get(label, 0) + 1
        return {**self._counters, "jobs": states}

    # ---- records and drivers ---------------------------------------------------------------

    def _emit(self, record: JobRecord) -> None:
        for send in self._subscribers:
            try:
                send.send_nowait(record)
            except trio.WouldBlock:
                self._counters["events_dropped"] += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def _update(self, record: JobRecord, **changes: object) -> JobRecord:
        """Persist ``record`` with ``changes`` (stamping a new state), then publish it."""
        current = self._jobs.get((record.role, self._store.record_key(record)), record)
        new = dataclasses.replace(current, **changes)  # type: ignore[arg-type]
        if new.state is not current.state:
            new = dataclasses.replace(new, stamps=(*new.stamps, Stamp(new.state, self._clock_ms())))
        self._store.put(new)
        self._jobs[(new.role, self._store.record_key(new))] = new
        self._emit(new)
        return new

    def _start_driver(self, role_key: tuple[Role, bytes], *, replace: bool = False) -> None:
        if self._nursery is None:
            return  # run() starts the drivers of every unfinished job
        if role_key in self._drivers and not replace:
            return
        scope = trio.CancelScope()
        self._drivers[role_key] = scope
        self._nursery.start_soon(self._drive, role_key, scope)

    async def _drive(self, role_key: tuple[Role, bytes], scope: trio.CancelScope) -> None:
        # The fault barrier of one job: whatever a peer made it do, an exception ends this
        # job (with the reason) and never the service. Cancellation passes through.
        with scope:
            try:
                if role_key[0] is Role.REQUESTER:
                    await self._drive_requester(role_key[1])
                else:
                    await self._drive_provider(role_key[1])
            except* (MarketError, ComputeError) as group:
                self._fail_job(role_key, _first_message(group), traceback=False)
            except* Exception as group:
                self._counters["job_faults"] += 1
                log.error("job %s hit an unexpected error", role_key[1].hex()[:16], exc_info=group)
                self._fail_job(role_key, f"internal error: {_first_message(group)}")
        if self._drivers.get(role_key) is scope:
            del self._drivers[role_key]

    def _fail_job(
        self, role_key: tuple[Role, bytes], reason: str, *, traceback: bool = True
    ) -> None:
        record = self._jobs[role_key]
        if record.state.terminal:
            return
        if not traceback:
            log.warning("job %s failed: %s", role_key[1].hex()[:16], reason)
        self._finish(record, JobState.FAILED, reason)

    def _guarded(
        self, protocol: str, handler: Callable[[str, bytes], Awaitable[bytes]]
    ) -> Callable[[str, bytes], Awaitable[bytes]]:
        """The fault barrier of one request: a refusal (``MarketError``) goes back to the
        peer as its reason; anything else is logged with its traceback and answered with a
        generic error, and the node goes on serving."""

        async def serve(peer_id: str, data: bytes) -> bytes:
            try:
                return await handler(peer_id, data)
            except MarketError:
                raise
            except Exception as exc:
                self._counters["handler_faults"] += 1
                log.exception("handler %s failed on a request from %s", protocol, peer_id)
                raise NetError(f"internal error serving {protocol}") from exc

        return serve

    def _finish(self, record: JobRecord, state: JobState, error: str = "") -> JobRecord:
        if record.role is Role.PROVIDER and self._provider is not None:
            if self._provider.allocator.allocation(exec_id(record.attempt_job_id)) is not None:
                self._provider.allocator.release(exec_id(record.attempt_job_id))
        return self._update(record, state=state, error=error or record.error)

    async def _request(self, peer_id: str, protocol: str, payload: bytes) -> bytes:
        return await self._net.request(peer_id, protocol, payload, self._config.request_timeout_s)

    async def _wait_block(self) -> None:
        with trio.move_on_after(chain_poll_s):
            await self._chain.wait_new_block()

    async def _submit_and_commit(
        self, build: Callable[[int], ledger.Transaction], on_submitted: Callable[[bytes], None]
    ) -> tuple[bool, str]:
        """Submit a tx and wait for it to commit: ``(ok, error)``. Resubmits (bounded) if the
        mempool drops it; raises ``ChainRejected`` if the mempool refuses it outright."""
        for _ in range(tx_submit_attempts_max):
            txh = await self._chain.submit(build)
            on_submitted(txh)
            while True:
                status = self._chain.tx_result(txh)
                if status is None:
                    break
                committed, ok, error = status
                if committed:
                    return ok, error
                await self._wait_block()
        raise ChainRejected(f"the transaction was dropped {tx_submit_attempts_max} times")

    # ---- requester -------------------------------------------------------------------------

    def _check_submission(self, sub: JobSubmission) -> tuple[JobManifest, builtins.list[bytes]]:
        if not 0 < len(sub.argv) <= argv_items_max:
            raise InvalidSubmission(f"the command must have 1..{argv_items_max} arguments")
        if len(sub.env) > env_items_max or len(sub.inputs) > input_files_max:
            raise InvalidSubmission(
                f"at most {env_items_max} env vars and {input_files_max} input files"
            )
        total = sum(len(data) for _, data in sub.inputs)
        if total > self._config.inputs_bytes_max:
            raise InvalidSubmission(
                f"inputs are {total} bytes; the limit is {self._config.inputs_bytes_max}"
            )
        if sub.strategy not in STRATEGIES:
            raise InvalidSubmission(f"strategy must be one of {', '.join(STRATEGIES)}")
        if not 0 < sub.max_wall_ms <= 7 * 24 * 3600 * 1000:
            raise InvalidSubmission("max_wall_ms must be in 1 ms .. 7 days")
        if sub.max_price_per_gpu_second < 0 or not 0 <= sub.requirements.gpus <= 64:
            raise InvalidSubmission("max price must be >= 0 and gpus 0..64")
        if not 0 <= sub.bid_window_ms <= 60_000:
            raise InvalidSubmission("bid_window_ms must be 0..60000")
        refs = tuple(InputRef(name, ledger.digest(data), len(data)) for name, data in sub.inputs)
        manifest = JobManifest(tuple(sub.argv), tuple(sub.env), refs)
        check_manifest(manifest, self._config.inputs_bytes_max)
        return manifest, [data for _, data in sub.inputs]

    async def _drive_requester(self, job_id: bytes) -> None:
        key = (Role.REQUESTER, job_id)
        for _ in range(10_000):  # every pass moves the job forward or waits on the chain
            record = self._jobs[key]
            if record.state.terminal:
                return
            if record.cancel_requested:
                await self._requester_cancel(record)
            elif record.state is JobState.BIDDING:
                await self._bid_round(record)
            elif record.state is JobState.AWARDED:
                await self._lock(record)
            elif record.state in (JobState.LOCKED, JobState.RUNNING):
                await self._watch_trade(record)
            elif record.state is JobState.SETTLING:
                await self._fetch_outputs(record)
        raise AssertionError("a requester driver made no progress in 10000 passes")

    async def _bid_round(self, record: JobRecord) -> None:
        request = record.request
        job_id = record.job_id
        self._bidding.add(job_id)
        payload = ledger.encode(request)
        # Gossip is best effort (a mesh still forming, a loaded peer): the request goes out
        # again half way through the window, and a window with no bid at all is extended
        # once. Providers bid once per job id, so a repeat costs one gossip message.
        try:
            for _ in range(bid_windows_max):
                await self._net.publish(JOBS_PURPOSE, JobRequest.TYPE_TAG, payload)
                await trio.sleep(request.bid_window_ms / 2000)
                await self._net.publish(JOBS_PURPOSE, JobRequest.TYPE_TAG, payload)
                await trio.sleep(request.bid_window_ms / 2000)
                if self._jobs[(Role.REQUESTER, job_id)].bids:
                    break
        finally:
            self._bidding.discard(job_id)
        record = self._jobs[(Role.REQUESTER, job_id)]
        if not record.bids and self._worth_waiting(record):
            # Providers exist for this job but none had a free slot: a burst of jobs. Wait for
            # capacity (backing off) until the deadline leaves no room, then ask again.
            rounds = record.bid_rounds + 1
            self._update(record, bid_rounds=rounds, error="waiting for a free provider slot")
            await trio.sleep(min(capacity_backoff_ms_max, capacity_backoff_ms * rounds) / 1000)
            return
        if not record.bids:
            self._finish(
                record,
                JobState.FAILED,
                f"no bids within {bid_windows_max} windows of {request.bid_window_ms} ms for "
                f"{request.requirements.describe()} at <= {request.max_price_per_gpu_second}",
            )
            return
        await self._award_next(record, first=True)

    def _worth_waiting(self, record: JobRecord) -> bool:
        """True when some live offer could take this job once a slot frees up, the price
        fits, and the deadline still leaves room for another bid round and the run."""
        request = record.request
        now = self._clock_ms()
        if record.bid_rounds >= capacity_rounds_max:
            return False
        if now + request.bid_window_ms + request.max_wall_ms >= request.deadline_ms:
            return False
        why = explain_unsatisfiable(
            self._directory.offers(now), request.requirements, request.max_price_per_gpu_second
        )
        return why is None or why.startswith("all ")

    def _score(self, provider: bytes) -> float:
        return self._store.provider_stats(provider).score()

    async def _award_next(self, record: JobRecord, *, first: bool) -> None:
        """Award the best untried bid; on success the record is AWARDED with signed terms."""
        request = record.request
        peers = dict(zip((b.signer for b in record.bids), record.bid_peers, strict=True))
        ranked = [
            b
            for b in rank_bids(record.bids, record.strategy, self._score)
            if b.signer not in record.tried
        ]
        refusals: builtins.list[str] = []
        attempt = record.attempt if first else record.attempt + 1
        manifest = self._store.manifest(record.job_id)
        if manifest is None:
            raise MarketError("the job's manifest is missing from the job store")
        for bid in ranked:
            now = self._clock_ms()
            deadline = min(
                request.deadline_ms, now + request.max_wall_ms + self._config.attempt_slack_ms
            )
            if deadline <= now + request.max_wall_ms:
                refusals.append("no time left before the job's deadline")
                break
            aid = attempt_job_id(record.job_id, attempt)
            award = ledger.sign_object(
                Award(
                    job_id=record.job_id,
                    request=request,
                    attempt=attempt,
                    attempt_job_id=aid,
                    provider=bid.signer,
                    price_per_gpu_second=bid.price_per_gpu_second,
                    gpus=request.requirements.gpus,
                    max_cost=request.max_cost(bid.price_per_gpu_second),
                    deadline_ms=deadline,
                    manifest=manifest,
                ),
                self._key,
                self._chain_id,
            )
            record = self._update(record, tried=(*record.tried, bid.signer))
            try:
                data = await self._request(peers[bid.signer], PROTOCOL_AWARD, ledger.encode(award))
                terms = _decode(AgreementTerms, data)
                terms.validate(self._chain_id)
            except (NetError, ledger.LedgerError) as exc:
                refusals.append(f"{bid.signer.hex()[:12]}: {exc}")
                continue
            expected = AgreementTerms(
                job_id=ledger.JobId(aid),
                requester=self._key.address,
                provider=ledger.Address(bid.signer),
                price_per_gpu_second=award.price_per_gpu_second,
                gpus=award.gpus,
                max_cost=award.max_cost,
                deadline_ms=deadline,
            )
            if dataclasses.replace(terms, signer=ledger.Address(b""), signature=b"") != expected:
                refusals.append(f"{bid.signer.hex()[:12]}: returned terms that differ")
                continue
            self._update(
                record,
                state=JobState.AWARDED,
                attempt=attempt,
                attempt_job_id=aid,
                counterparty=bid.signer,
                counterparty_peer_id=peers[bid.signer],
                terms=terms,
                agreement_tx=b"",
                error="",  # a wait for capacity or an earlier refusal is history now
            )
            return
        why = (
            f"no provider took the job ({len(ranked)} bid(s) tried): " + "; ".join(refusals[:8])
            if refusals
            else record.error or "no untried bids left"
        )
        now = self._clock_ms()
        request = record.request
        room = now + request.bid_window_ms + request.max_wall_ms < request.deadline_ms
        if refusals and room and record.bid_rounds + 1 < capacity_rounds_max:
            # Every bidder was full by the time of the award (a burst of jobs): ask again,
            # the next round sees the slots that have freed up since.
            self._update(
                record,
                state=JobState.BIDDING,
                bids=(),
                bid_peers=(),
                tried=(),
                error=why,
                bid_rounds=record.bid_rounds + 1,
            )
            return
        self._finish(record, JobState.FAILED if first or not refusals else JobState.REFUNDED, why)

    async def _lock(self, record: JobRecord) -> None:
        terms = record.terms
        assert terms is not None, "an awarded job has terms"
        if record.agreement_tx:
            # Resumed after a restart: an agreement sent before it may still be pending.
            for _ in range(tx_submit_attempts_max * 10):
                status = self._chain.tx_result(record.agreement_tx)
                if status is None or status[0]:
                    break
                await self._wait_block()
        trade = self._chain.trade(record.attempt_job_id)
        if trade is None or trade.terms != terms:

            def build(nonce: int) -> ledger.Transaction:
                tx = Agreement(nonce=nonce, fee=self._config.fee, terms=terms)
                return ledger.sign_object(tx, self._key, self._chain_id)

            def submitted(txh: bytes) -> None:
                self._update(record, agreement_tx=txh)

            try:
                ok, error = await self._submit_and_commit(build, submitted)
            except ChainRejected as exc:
                ok, error = False, str(exc)
            trade = self._chain.trade(record.attempt_job_id)
            if not ok and (trade is None or trade.terms != terms):
                self._finish(record, JobState.FAILED, f"the agreement was rejected: {error}")
                return
        if self._jobs[(Role.REQUESTER, record.job_id)].state is JobState.AWARDED:
            self._update(record, state=JobState.LOCKED)

    async def _watch_trade(self, record: JobRecord) -> None:
        terms = record.terms
        assert terms is not None, "a locked job has terms"
        aid = record.attempt_job_id
        refund_tx: bytes | None = None
        while True:
            trade = self._chain.trade(aid)
            if trade is None:
                raise MarketError("the trade vanished from the chain")
            if trade.status is TradeStatus.SETTLED:
                receipt = self._chain.receipt(aid)
                self._update(
                    record,
                    state=JobState.SETTLING,
                    receipt=receipt,
                    receipt_tx=trade.receipt_tx,
                    cost=trade.paid,
                )
                return
            if trade.status is TradeStatus.CANCELLED:
                self._finish(record, JobState.CANCELLED)
                return
            if trade.status is TradeStatus.REFUNDED:
                await self._after_refund(record)
                return
            _, head_ms = self._chain.head()
            # Resend if the chain lost it (evicted, or failed in a block after a race).
            status = None if refund_tx is None else self._chain.tx_result(refund_tx)
            lost = status is None or (status[0] and not status[1])
            if head_ms > terms.deadline_ms and lost:
                try:
                    refund_tx = await self._chain.submit(self._refund_builder(aid))
                except ChainRejected as exc:
                    log.info("refund of %s not accepted yet: %s", aid.hex()[:16], exc)
            await self._wait_block()
            record = self._jobs[(Role.REQUESTER, record.job_id)]
            if record.cancel_requested:
                return

    def _refund_builder(self, aid: bytes) -> Callable[[int], ledger.Transaction]:
        def build(nonce: int) -> ledger.Transaction:
            tx = Refund(nonce=nonce, fee=self._config.fee, job_id=ledger.JobId(aid))
            return ledger.sign_object(tx, self._key, self._chain_id)

        return build

    async def _after_refund(self, record: JobRecord) -> None:
        provider = record.counterparty
        stats = self._store.provider_stats(provider)
        stats = dataclasses.replace(stats, refunded=stats.refunded + 1)
        record = self._update(record, error=f"provider {provider.hex()[:12]} missed the deadline")
        self._store.put_with_stats(record, provider, stats)
        now = self._clock_ms()
        request = record.request
        has_time = now + request.max_wall_ms < request.deadline_ms
        if has_time and any(b.signer not in record.tried for b in record.bids):
            await self._award_next(record, first=False)
            return
        self._finish(record, JobState.REFUNDED, record.error)

    async def _requester_cancel(self, record: JobRecord) -> None:
        aid = record.attempt_job_id
        trade = self._chain.trade(aid) if record.terms is not None else None
        if record.state is JobState.AWARDED and trade is None and record.agreement_tx:
            # The agreement may still commit: wait for it (bounded) so it can be cancelled.
            for _ in range(10):
                status = self._chain.tx_result(record.agreement_tx)
                if status is None or status[0]:
                    break
                await self._wait_block()
            trade = self._chain.trade(aid)
        if record.counterparty_peer_id:
            notice = ledger.sign_object(CancelNotice(attempt_job_id=aid), self._key, self._chain_id)
            try:
                await self._request(
                    record.counterparty_peer_id, PROTOCOL_CANCEL, ledger.encode(notice)
                )
            except NetError as exc:
                log.info("cancel notice to the provider failed (the chain decides): %s", exc)
        if trade is None or trade.status is not TradeStatus.OPEN:
            if trade is not None and trade.status is TradeStatus.SETTLED:
                # Too late: the receipt settled first; carry on and fetch the outputs.
                self._update(record, cancel_requested=False, state=JobState.LOCKED)
                return
            self._finish(record, JobState.CANCELLED, "cancelled by the requester")
            return

        def build(nonce: int) -> ledger.Transaction:
            tx = Cancel(nonce=nonce, fee=self._config.fee, job_id=ledger.JobId(aid))
            return ledger.sign_object(tx, self._key, self._chain_id)

        try:
            await self._submit_and_commit(build, lambda _: None)
        except ChainRejected as exc:
            log.info("cancel tx of %s rejected: %s", aid.hex()[:16], exc)
        trade = self._chain.trade(aid)
        if trade is not None and trade.status is TradeStatus.SETTLED:
            self._update(record, cancel_requested=False, state=JobState.LOCKED)
            return
        if trade is not None and trade.status is TradeStatus.OPEN:
            raise MarketError("the cancel transaction did not close the trade")
        self._finish(record, JobState.CANCELLED, "cancelled by the requester")

    async def _fetch_outputs(self, record: JobRecord) -> None:
        receipt = record.receipt or self._chain.receipt(record.attempt_job_id)
        if receipt is None:
            raise MarketError("the trade settled but its receipt is not readable")
        peer = record.counterparty_peer_id
        last_error = ""
        for _ in range(fetch_attempts_max):
            try:
                data = await self._request(peer, PROTOCOL_OUTPUTS, record.attempt_job_id)
                info = _decode(OutputsInfo, data, 4 * log_bytes_max)
                blobs = await self._fetch_files(peer, record.attempt_job_id, info)
            except NetError as exc:
                last_error = str(exc)
                await trio.sleep(fetch_retry_s)
                continue
            except _Mismatch as exc:
                self._mismatch(record, str(exc))
                return
            if outputs_digest(info.files) != receipt.output_digest:
                self._mismatch(record, "the output list does not hash to the receipt's digest")
                return
            self._store.put_blobs(blobs)
            result = RunResult(
                outcome="succeeded" if receipt.exit_status == 0 else "failed",
                reason="",
                exit_status=receipt.exit_status,
                wall_ms=receipt.wall_ms,
                outputs_digest=receipt.output_digest,
                files=info.files,
                stdout=info.stdout[:log_bytes_max],
                stderr=info.stderr[:log_bytes_max],
            )
            stats = self._store.provider_stats(record.counterparty)
            record = self._update(record, state=JobState.DONE, outputs=info.files, result=result)
            self._store.put_with_stats(
                record, record.counterparty, dataclasses.replace(stats, settled=stats.settled + 1)
            )
            return
        self._finish(
            record, JobState.FAILED, f"settled, but the outputs are unavailable: {last_error}"
        )

    async def _fetch_files(self, peer: str, aid: bytes, info: OutputsInfo) -> builtins.list[bytes]:
        if len(info.files) > output_files_max:
            raise _Mismatch(f"{len(info.files)} output files exceed {output_files_max}")
        if sum(f.size_bytes for f in info.files) > self._config.outputs_bytes_max:
            raise _Mismatch("the outputs exceed this node's outputs_bytes_max")
        blobs: builtins.list[bytes] = []
        for file in info.files:
            data = await self._fetch_blob(peer, PROTOCOL_OUTPUT, aid, file.sha256, file.size_bytes)
            blobs.append(data)
        return blobs

    async def _fetch_blob(
        self, peer: str, protocol: str, scope_id: bytes, sha256: bytes, size: int
    ) -> bytes:
        """Fetch ``size`` bytes in chunks and check them against ``sha256``."""
        parts: list[bytes] = []
        got = 0
        for _ in range(size // chunk_bytes_max + 2):
            if got >= size:
                break
            chunk = await self._request(
                peer, protocol, ledger.encode(BlobRequest(scope_id, sha256, got))
            )
            if not chunk or got + len(chunk) > size:
                raise _Mismatch(f"blob {sha256.hex()[:12]} is not {size} bytes as announced")
            parts.append(chunk)
            got += len(chunk)
        data = b"".join(parts)
        if len(data) != size or ledger.digest(data) != sha256:
            raise _Mismatch(f"blob {sha256.hex()[:12]} does not match its SHA-256")
        return data

    def _mismatch(self, record: JobRecord, why: str) -> None:
        stats = self._store.provider_stats(record.counterparty)
        record = self._update(record, state=JobState.OUTPUT_MISMATCH, error=why)
        self._store.put_with_stats(
            record,
            record.counterparty,
            dataclasses.replace(stats, mismatched=stats.mismatched + 1),
        )
        log.warning("job %s: provider outputs rejected: %s", record.job_id.hex()[:16], why)

    # requester-side handlers

    async def _on_bid(self, peer_id: str, data: bytes) -> bytes:
        bid = _decode_signed(Bid, data, self._chain_id)
        record = self._jobs.get((Role.REQUESTER, bid.job_id))
        if (
            bid.job_id not in self._bidding
            or record is None
            or record.state is not JobState.BIDDING
        ):
            self._counters["bids_rejected"] += 1
            raise NetError("not accepting bids for this job")
        request = record.request
        if bid.price_per_gpu_second > request.max_price_per_gpu_second:
            self._counters["bids_rejected"] += 1
            raise NetError("bid is above the job's max price")
        if bid.gpus != request.requirements.gpus:
            self._counters["bids_rejected"] += 1
            raise NetError("bid is for another GPU count")
        if len(record.bids) >= bids_per_job_max or any(b.signer == bid.signer for b in record.bids):
            raise NetError("bid refused: duplicate or too many bids")
        # Persisted before the provider hears it was taken: a restart keeps every bid.
        self._update(record, bids=(*record.bids, bid), bid_peers=(*record.bid_peers, peer_id))
        self._counters["bids_received"] += 1
        return b""

    def _requester_job_for_peer(self, job_id: bytes, peer_id: str) -> JobRecord:
        record = self._jobs.get((Role.REQUESTER, job_id))
        if record is None or record.counterparty_peer_id != peer_id:
            raise NetError("no such job awarded to you")
        return record

    async def _on_input(self, peer_id: str, data: bytes) -> bytes:
        ask = _decode(BlobRequest, data)
        self._requester_job_for_peer(ask.job_id, peer_id)
        manifest = self._store.manifest(ask.job_id)
        if manifest is None or all(ref.sha256 != ask.sha256 for ref in manifest.inputs):
            raise NetError("not an input of this job")
        blob = self._store.blob(ask.sha256)
        if blob is None:
            raise NetError("input missing from the store")
        return blob[ask.offset : ask.offset + chunk_bytes_max]

    async def _on_status(self, peer_id: str, data: bytes) -> bytes:
        for record in list(self._jobs.values()):
            if (
                record.role is Role.REQUESTER
                and record.attempt_job_id == data
                and record.counterparty_peer_id == peer_id
                and record.state in (JobState.AWARDED, JobState.LOCKED)
            ):
                # The provider starts only on an open trade, so its notice can overtake our
                # own view of the agreement's commit: then the lock is stamped now as well.
                if record.state is JobState.AWARDED:
                    record = self._update(record, state=JobState.LOCKED)
                self._update(record, state=JobState.RUNNING)
        return b""

    # ---- provider --------------------------------------------------------------------------

    async def _requests_loop(self, receive: trio.MemoryReceiveChannel[Incoming]) -> None:
        async with receive:
            async for incoming in receive:
                self._counters["requests_seen"] += 1
                try:
                    self._consider(incoming)
                except MarketError as exc:
                    self._counters["requests_rejected"] += 1
                    log.debug("job request from %s rejected: %s", incoming.sender_peer_id, exc)
                except Exception:
                    # One bad request costs its own handling, never the gossip consumer.
                    self._counters["requests_rejected"] += 1
                    self._counters["handler_faults"] += 1
                    log.exception("job request from %s broke", incoming.sender_peer_id)

    def _consider(self, incoming: Incoming) -> None:
        provider = self._provider
        assert provider is not None
        request = _decode_signed(JobRequest, incoming.payload, self._chain_id)
        if request.signer != incoming.sender or request.chain_id != self._chain_id:
            raise NetError("request not signed by its gossip sender, or for another chain")
        if request.signer == self._key.address:
            return
        job_id = ledger.hash_of(request)
        now = self._clock_ms()
        seen = self._seen_requests.get(job_id)
        # Bid once per job, but again if that bid never reached the requester or its
        # reservation lapsed: a requester that restarted mid-window asks again.
        if seen is not None and (
            seen[2] == _BID_IN_FLIGHT or (seen[2] == _BID_DELIVERED and seen[1] > now)
        ):
            return
        if request.deadline_ms <= now + request.max_wall_ms:
            raise NetError("too late to run")
        if request.inputs_bytes > self._config.inputs_bytes_max:
            raise NetError("inputs too large for this provider")
        fit = fit_on_node(request.requirements, provider.allocator, provider.offer_config)
        if fit is None:
            return
        model, free, price = fit
        if price > request.max_price_per_gpu_second:
            return
        bid = ledger.sign_object(
            Bid(
                job_id=job_id,
                price_per_gpu_second=price,
                gpus=request.requirements.gpus,
                model=model,
                expected_start_ms=now,
                free_slots=free,
                reservation_expiry_ms=now + self._config.reservation_ms,
            ),
            self._key,
            self._chain_id,
        )
        try:
            self._bid_slots.acquire_nowait()
        except trio.WouldBlock:
            # Not recorded as seen: the requester's next round asks again and we bid then.
            raise NetError("too many bids in flight") from None
        self._seen_requests[job_id] = (request, now + self._config.reservation_ms, _BID_IN_FLIGHT)
        while len(self._seen_requests) > seen_requests_max:
            self._seen_requests.popitem(last=False)
        assert self._nursery is not None
        self._nursery.start_soon(self._send_bid, incoming.sender_peer_id, bid)

    def _mark_bid(self, job_id: bytes, state: int) -> None:
        seen = self._seen_requests.get(job_id)
        if seen is not None:
            self._seen_requests[job_id] = (seen[0], seen[1], state)

    async def _send_bid(self, peer_id: str, bid: Bid) -> None:
        try:
            await self._request(peer_id, PROTOCOL_BID, ledger.encode(bid))
            self._counters["bids_sent"] += 1
            self._mark_bid(bid.job_id, _BID_DELIVERED)
        except NetError as exc:
            self._mark_bid(bid.job_id, _BID_FAILED)
            log.debug("bid for %s refused: %s", bid.job_id.hex()[:16], exc)
        except Exception:
            self._mark_bid(bid.job_id, _BID_FAILED)
            self._counters["handler_faults"] += 1
            log.exception("sending the bid for %s broke", bid.job_id.hex()[:16])
        finally:
            self._bid_slots.release()

    async def _on_award(self, peer_id: str, data: bytes) -> bytes:
        provider = self._provider
        assert provider is not None
        award = _decode_signed(Award, data, self._chain_id)
        request = award.request
        if not ledger.verify_object(request, self._chain_id) or request.signer != award.signer:
            raise NetError("the award's job request is not signed by the awarding requester")
        if ledger.hash_of(request) != award.job_id:
            raise NetError("the award's job id is not its request's hash")
        if ledger.hash_of(award.manifest) != request.manifest_digest:
            raise NetError("the award's manifest is not the one its job request names")
        try:
            check_manifest(award.manifest, self._config.inputs_bytes_max)
        except InvalidManifest as exc:
            raise NetError(f"bad manifest: {exc}") from exc
        aid = award.attempt_job_id
        if (
            aid != attempt_job_id(award.job_id, award.attempt)
            or award.provider != self._key.address
        ):
            raise NetError("award is for another attempt id or provider")
        existing = self._jobs.get((Role.PROVIDER, aid))
        if existing is not None:
            if existing.terms is None or existing.state.terminal:
                raise NetError("this attempt is already closed here")
            return ledger.encode(existing.terms)
        now = self._clock_ms()
        # An award holds slots until its trade opens: only for a requester that can pay, and
        # only a few unopened ones per requester, so signed awards alone cannot lock us up.
        if self._chain.account(award.signer).balance < award.max_cost + self._config.fee:
            raise NetError("the requester's balance does not cover the escrow")
        pending = sum(
            1
            for (role, _), r in self._jobs.items()
            if role is Role.PROVIDER
            and r.state is JobState.AWARDED
            and r.counterparty == award.signer
        )
        if pending >= awards_pending_per_requester_max:
            raise NetError(f"{pending} awards of yours are still waiting for their trades")
        fit = fit_on_node(request.requirements, provider.allocator, provider.offer_config)
        if fit is None:
            self._mark_bid(award.job_id, _BID_FAILED)  # bid again when asked again
            raise NetError("no free capacity for this job any more")
        model, _, price = fit
        if award.price_per_gpu_second < price or award.gpus != request.requirements.gpus:
            raise NetError(f"award price {award.price_per_gpu_second} is below ours ({price})")
        if award.max_cost != request.max_cost(award.price_per_gpu_second):
            raise NetError("award max_cost does not match price x gpus x max wall time")
        if award.deadline_ms <= now + request.max_wall_ms:
            raise NetError("the award's deadline leaves too little time")
        try:
            provider.allocator.allocate(
                exec_id(aid),
                request.requirements.gpus,
                model=None if request.requirements.gpus == 0 else model,
                min_vram_bytes=request.requirements.min_vram_bytes,
            )
        except NoCapacityError as exc:
            self._mark_bid(award.job_id, _BID_FAILED)
            raise NetError(f"no capacity: {exc}") from exc
        terms = ledger.sign_object(
            AgreementTerms(
                job_id=ledger.JobId(aid),
                requester=ledger.Address(award.signer),
                provider=self._key.address,
                price_per_gpu_second=award.price_per_gpu_second,
                gpus=award.gpus,
                max_cost=award.max_cost,
                deadline_ms=award.deadline_ms,
            ),
            self._key,
            self._chain_id,
        )
        record = JobRecord(
            role=Role.PROVIDER,
            job_id=award.job_id,
            state=JobState.AWARDED,
            request=request,
            attempt=award.attempt,
            attempt_job_id=aid,
            counterparty=award.signer,
            counterparty_peer_id=peer_id,
            terms=terms,
            stamps=(Stamp(JobState.AWARDED, now),),
        )
        # Persisted before the signed terms leave this node.
        self._store.put(record, manifest=award.manifest)
        self._jobs[(Role.PROVIDER, aid)] = record
        self._emit(record)
        self._start_driver((Role.PROVIDER, aid))
        return ledger.encode(terms)

    def _provider_job_for_peer(self, aid: bytes, peer_id: str) -> JobRecord:
        record = self._jobs.get((Role.PROVIDER, aid))
        if record is None or record.counterparty_peer_id != peer_id:
            raise NetError("no such job of yours here")
        return record

    async def _on_outputs(self, peer_id: str, data: bytes) -> bytes:
        record = self._provider_job_for_peer(data, peer_id)
        if record.result is None:
            raise NetError(f"the job is {record.state.label}; no outputs yet")
        result = record.result
        return ledger.encode(OutputsInfo(result.files, result.stdout, result.stderr))

    async def _on_output(self, peer_id: str, data: bytes) -> bytes:
        provider = self._provider
        assert provider is not None
        ask = _decode(BlobRequest, data)
        record = self._provider_job_for_peer(ask.job_id, peer_id)
        files = record.result.files if record.result is not None else ()
        match = [f for f in files if f.sha256 == ask.sha256]
        if not match:
            raise NetError("not an output of this job")
        path = provider.executor.job_dir(exec_id(ask.job_id)) / "work" / "out" / match[0].path

        def read() -> bytes:
            with open(path, "rb") as handle:
                handle.seek(ask.offset)
                return handle.read(chunk_bytes_max)

        try:
            return await trio.to_thread.run_sync(read)
        except OSError as exc:
            raise NetError(f"output unreadable: {exc}") from exc

    async def _on_logs(self, peer_id: str, data: bytes) -> bytes:
        record = self._provider_job_for_peer(data, peer_id)
        result = record.result
        # The executor hands over stdout/stderr when the job ends; until then, state only.
        if result is None:
            return ledger.encode(LogsInfo(record.state.label, b"", b""))
        return ledger.encode(LogsInfo(record.state.label, result.stdout, result.stderr))

    async def _on_cancel(self, peer_id: str, data: bytes) -> bytes:
        notice = _decode_signed(CancelNotice, data, self._chain_id)
        record = self._jobs.get((Role.PROVIDER, notice.attempt_job_id))
        if record is None or notice.signer != record.counterparty:
            raise NetError("no such job of yours here")
        if record.state.terminal or record.state is JobState.SETTLING:
            return b""
        scope = self._runs.get(notice.attempt_job_id)
        if scope is not None:
            scope.cancel()
        driver = self._drivers.get((Role.PROVIDER, notice.attempt_job_id))
        if driver is not None:
            driver.cancel()
        self._finish(record, JobState.CANCELLED, "cancelled by the requester")
        return b""

    async def _drive_provider(self, aid: bytes) -> None:
        key = (Role.PROVIDER, aid)
        for _ in range(10_000):
            record = self._jobs[key]
            if record.state.terminal:
                return
            if record.state is JobState.AWARDED:
                await self._await_open(record)
            elif record.state is JobState.LOCKED:
                await self._run(record)
            elif record.state is JobState.RUNNING:
                await self._resume_running(record)
            elif record.state is JobState.SETTLING:
                await self._settle(record)
        raise AssertionError("a provider driver made no progress in 10000 passes")

    def _ensure_allocation(self, record: JobRecord) -> None:
        provider = self._provider
        assert provider is not None
        if provider.allocator.allocation(exec_id(record.attempt_job_id)) is not None:
            return
        req = record.request.requirements
        try:
            provider.allocator.allocate(
                exec_id(record.attempt_job_id), req.gpus, min_vram_bytes=req.min_vram_bytes
            )
        except NoCapacityError as exc:
            raise MarketError(f"slots lost across a restart: {exc}") from exc

    async def _await_open(self, record: JobRecord) -> None:
        self._ensure_allocation(record)
        awarded_ms = next((s.at_ms for s in record.stamps if s.state is JobState.AWARDED), 0)
        give_up_ms = awarded_ms + self._config.award_open_timeout_ms
        while self._config.wait_for_open:
            trade = self._chain.trade(record.attempt_job_id)
            if trade is not None and trade.terms == record.terms:
                if trade.status is TradeStatus.OPEN:
                    break
                self._finish(record, JobState.CANCELLED, f"trade is {trade.status.name.lower()}")
                return
            if self._clock_ms() > give_up_ms:
                self._finish(record, JobState.FAILED, "the trade never opened on chain")
                return
            await self._wait_block()
        self._update(record, state=JobState.LOCKED)

    async def _resume_running(self, record: JobRecord) -> None:
        """A job that was running when this node stopped: re-run it if the deadline allows."""
        provider = self._provider
        assert provider is not None and record.terms is not None
        now = self._clock_ms()
        if now + record.request.max_wall_ms + restart_rerun_margin_ms >= record.terms.deadline_ms:
            self._finish(record, JobState.FAILED, "interrupted by a restart; no time to re-run")
            return
        # Stamp the second start explicitly: the state itself stays RUNNING.
        record = self._update(record, stamps=(*record.stamps, Stamp(JobState.RUNNING, now)))
        job_dir = provider.executor.job_dir(exec_id(record.attempt_job_id))
        if job_dir.exists():
            await trio.to_thread.run_sync(
                provider.executor.remove_job_dir, exec_id(record.attempt_job_id)
            )
        await self._run(record)

    async def _run(self, record: JobRecord) -> None:
        provider = self._provider
        assert provider is not None
        self._ensure_allocation(record)
        spec = await self._fetch_spec(record)
        if record.state is not JobState.RUNNING:
            record = self._update(record, state=JobState.RUNNING)
        self._nursery_start(self._notify_running, record)
        aid = record.attempt_job_id
        allocation = provider.allocator.allocation(exec_id(aid))
        result = None
        scope = trio.CancelScope()
        self._runs[aid] = scope
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_cancel_on_chain, aid, scope)
                    try:
                        result = await provider.executor.run(exec_id(aid), spec, allocation)
                    except ComputeError as exc:
                        raise MarketError(f"the sandbox could not run the job: {exc}") from exc
                    nursery.cancel_scope.cancel()
        finally:
            del self._runs[aid]
            if provider.allocator.allocation(exec_id(aid)) is not None:
                provider.allocator.release(exec_id(aid))
        if result is None:
            trade = self._chain.trade(aid)
            status = trade.status.name.lower() if trade is not None else "gone"
            self._finish(record, JobState.CANCELLED, f"killed: the trade is {status}")
            return
        exit_status = result.exit_code if result.exit_code is not None else -(result.signal or 1)
        run_result = RunResult(
            outcome=result.outcome.value,
            reason=result.reason,
            exit_status=exit_status,
            wall_ms=min(result.wall_ms, record.request.max_wall_ms),
            outputs_digest=result.outputs_digest,
            files=result.outputs,
            stdout=result.stdout[:log_bytes_max],
            stderr=result.stderr[:log_bytes_max],
        )
        self._update(record, state=JobState.SETTLING, result=run_result)

    def _nursery_start(self, fn: Callable[[JobRecord], Awaitable[None]], record: JobRecord) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, record)

    async def _notify_running(self, record: JobRecord) -> None:
        try:
            await self._request(record.counterparty_peer_id, PROTOCOL_STATUS, record.attempt_job_id)
        except NetError as exc:
            log.debug("running notice not delivered: %s", exc)
        except Exception:
            self._counters["handler_faults"] += 1
            log.exception("the running notice of %s broke", record.attempt_job_id.hex()[:16])

    async def _watch_cancel_on_chain(self, aid: bytes, scope: trio.CancelScope) -> None:
        while True:
            await self._wait_block()
            trade = self._chain.trade(aid)
            if trade is None or trade.status is not TradeStatus.OPEN:
                scope.cancel()
                return

    async def _fetch_spec(self, record: JobRecord) -> JobSpec:
        peer = record.counterparty_peer_id
        request = record.request
        last = ""
        manifest = self._store.manifest(record.job_id)
        if manifest is None or ledger.hash_of(manifest) != request.manifest_digest:
            raise MarketError("the job's manifest is missing from the job store")
        check_manifest(manifest, self._config.inputs_bytes_max)
        for _ in range(fetch_attempts_max):
            try:
                inputs = []
                for ref in manifest.inputs:
                    data = await self._fetch_blob(
                        peer, PROTOCOL_INPUT, record.job_id, ref.sha256, ref.size_bytes
                    )
                    inputs.append((ref.name, data))
            except NetError as exc:
                last = str(exc)
                await trio.sleep(fetch_retry_s)
                continue
            except _Mismatch as exc:
                raise MarketError(f"bad input from the requester: {exc}") from exc
            limits = JobLimits(wall_time_ms=request.max_wall_ms)
            return JobSpec(
                argv=manifest.argv, inputs=tuple(inputs), env=manifest.env, limits=limits
            )
        raise MarketError(f"cannot fetch the job's inputs: {last}")

    async def _settle(self, record: JobRecord) -> None:
        result = record.result
        assert result is not None, "a settling provider job has its result"
        aid = record.attempt_job_id
        trade = self._chain.trade(aid)
        if trade is None:
            raise MarketError("the trade vanished from the chain")
        if trade.status is TradeStatus.OPEN:

            def build(nonce: int) -> ledger.Transaction:
                tx = Receipt(
                    nonce=nonce,
                    fee=self._config.fee,
                    job_id=ledger.JobId(aid),
                    output_digest=result.outputs_digest,
                    wall_ms=result.wall_ms,
                    exit_status=result.exit_status,
                )
                return ledger.sign_object(tx, self._key, self._chain_id)

            try:
                ok, error = await self._submit_and_commit(
                    build, lambda txh: self._note_receipt_tx(record, txh)
                )
            except ChainRejected as exc:
                ok, error = False, str(exc)
            trade = self._chain.trade(aid)
            assert trade is not None
            if not ok and trade.status is TradeStatus.OPEN:
                self._finish(record, JobState.FAILED, f"the receipt was rejected: {error}")
                return
        if trade.status is TradeStatus.SETTLED:
            self._update(record, state=JobState.DONE, cost=trade.paid, receipt_tx=trade.receipt_tx)
        elif trade.status is TradeStatus.CANCELLED:
            self._finish(record, JobState.CANCELLED, "the requester cancelled")
        else:
            self._finish(record, JobState.REFUNDED, "the trade was refunded")

    def _note_receipt_tx(self, record: JobRecord, txh: bytes) -> None:
        self._update(record, receipt_tx=txh)


def _first_message(group: BaseExceptionGroup[BaseException]) -> str:
    """The first leaf of ``group`` as ``Type: message`` (a reason a user can act on)."""
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
        leaf = leaf.exceptions[0]
    if isinstance(leaf, MarketError | ComputeError):
        return str(leaf) or type(leaf).__name__
    return f"{type(leaf).__name__}: {leaf}"[:text_chars_max]


class _Mismatch(Exception):
    """A peer's bytes do not match what was promised (digest or size)."""


def _closed(send: trio.MemorySendChannel[JobRecord]) -> bool:
    try:
        return send.statistics().open_receive_channels == 0
    except trio.ClosedResourceError:
        return True
