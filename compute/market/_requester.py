"""The requester side: submit a job, gather bids, award one, lock the escrow, watch the trade,
refund or retry, cancel; and the stream handlers a provider calls on the requester.

Life of a job here: bidding -> awarded -> locked -> running -> settling -> done (or failed,
cancelled, refunded, output_mismatch). One driver task per job moves its persisted record one
step at a time; the decisions are the pure functions of ``_protocol``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING

import trio

import ledger
from compute.market._blobs import BlobChunkAsk, BlobError, BlobIndexAsk
from compute.market._checks import check_manifest
from compute.market._context import Drivers, JobBook
from compute.market._exchange import RequesterExchange
from compute.market._imagemesh import (
    PROTOCOL_IMAGE_BLOB,
    describe_image,
    serve_image_blob,
    with_image_runtime,
)
from compute.market._logs import LogsView, RequesterLogs
from compute.market._matching import explain_unsatisfiable, rank_bids
from compute.market._protocol import (
    CancelStep,
    VerifyDecision,
    WatchStep,
    attempt_deadline,
    attempt_job_id,
    bid_refusal,
    bond_refusal,
    cancel_step,
    offer_refusal,
    reputation,
    retry_after_refund,
    room_for_round,
    spot_checked,
    terms_refusal,
    verify_step,
    watch_step,
)
from compute.market._transfers import serve_input_chunk, serve_input_index
from compute.market._wire import (
    JOBS_PURPOSE,
    PROTOCOL_AWARD,
    PROTOCOL_BID,
    PROTOCOL_CANCEL,
    PROTOCOL_DELIVERED,
    PROTOCOL_INPUT,
    PROTOCOL_INPUT_INDEX,
    PROTOCOL_STATUS,
    decode,
    decode_signed,
)
from compute.market.exceptions import (
    ChainRejected,
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
    Role,
    Stamp,
    argv_items_max,
    bids_per_job_max,
    env_items_max,
    input_files_max,
)
from ledger import (
    Agreement,
    AgreementTerms,
    Cancel,
    Delivery,
    Refund,
    SlashOutvoted,
    TradeStatus,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from compute.market._context import Context
    from ledger import Trade

log = logging.getLogger("gpumesh.compute.market")

bid_windows_max = 2
"""A bid window that closes with no bid at all is extended once before the job fails."""
capacity_backoff_ms = 250
capacity_backoff_ms_max = 3_000
capacity_rounds_max = 2_000
"""Waiting for capacity is bounded by the job's deadline; this only bounds the loop."""
driver_passes_max = 10_000
verify_replicas_max = 5
agreement_wait_blocks_max = 30
replica_deliveries_max = 16
"""A verified job's replica that has had this many checked deliveries (each from a provider
the group had not used) is not retried again: its record keeps every one as evidence."""


class Requester:
    """The requester side of one node's market."""

    exchange_cls: type[RequesterExchange] = RequesterExchange

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.book = JobBook(Role.REQUESTER, ctx)
        self.drivers = Drivers(self.book, ctx, self.drive)
        self.exchange = self.exchange_cls(ctx, self.book)
        self.live_logs = RequesterLogs(ctx, self.book)
        self.bidding: set[bytes] = set()
        """Jobs whose bid window is open right now (bids are persisted in their records)."""
        self.slashed: set[bytes] = set()
        """Attempts whose outvoted delivery went to the chain as evidence from here (once
        each; after a restart the trade's own ``slashed`` flag says so)."""
        self.exchange.ack_gate = self.verify_gate

    def handlers(self) -> dict[str, Callable[[str, bytes], Awaitable[bytes]]]:
        """The stream protocols this side serves (to providers)."""
        return {
            PROTOCOL_BID: self.on_bid,
            PROTOCOL_INPUT: self.on_input,
            PROTOCOL_INPUT_INDEX: self.on_input_index,
            PROTOCOL_IMAGE_BLOB: self.on_image_blob,
            PROTOCOL_STATUS: self.on_status,
            PROTOCOL_DELIVERED: self.exchange.on_delivered,
        }

    # ---- the public API ----

    async def submit(self, submission: JobSubmission) -> JobRecord:
        ctx = self.ctx
        submission = with_image_runtime(submission)
        # The manifest's own checks first (names, command), before any input is copied.
        names = [name for name, _ in (*submission.inputs, *submission.input_paths)]
        self.check_submission(submission, tuple(InputRef(n, bytes(32), 0) for n in names))
        active = self.book.count(lambda r: not r.state.terminal)
        if active >= ctx.config.jobs_active_max:
            raise InvalidSubmission(f"{active} jobs are already active (jobs_active_max)")
        now = ctx.clock_ms()
        reason = explain_unsatisfiable(
            ctx.directory.offers(now),
            submission.requirements,
            submission.max_price_per_gpu_second,
        )
        if reason is not None:
            raise Unsatisfiable(reason)
        deadline = submission.deadline_ms or now + ctx.config.default_deadline_ms
        if deadline <= now + submission.max_wall_ms:
            raise InvalidSubmission("the deadline leaves less than max_wall_ms to run the job")
        if not 1 <= submission.verify <= verify_replicas_max:
            raise InvalidSubmission(f"verify must be 1..{verify_replicas_max}")
        if not 0 <= submission.outputs_bytes_max <= ctx.config.outputs_bytes_max:
            raise InvalidSubmission(
                f"the outputs cap must be 0..{ctx.config.outputs_bytes_max} bytes "
                "(this node's outputs_bytes_max)"
            )
        refs = await self.store_inputs(submission)
        try:
            return self._submit(submission, refs, deadline)
        finally:
            for ref in refs:
                ctx.store.inputs.unpin(ref.root)

    async def store_inputs(self, sub: JobSubmission) -> tuple[InputRef, ...]:
        """Every input into this node's input blob store, synced, before the job exists (each
        held against a sweep until the job's record names it): their refs."""
        ctx = self.ctx
        blobs = ctx.store.inputs
        if len(sub.inputs) + len(sub.input_paths) > input_files_max:
            raise InvalidSubmission(f"at most {input_files_max} input files")
        total = sum(len(data) for _, data in sub.inputs)
        for name, path in sub.input_paths:
            if not os.path.isabs(path):
                raise InvalidSubmission(f"input {name[:64]!r}: {path[:200]!r} is not absolute")
            try:
                total += os.stat(path).st_size
            except OSError as exc:
                raise InvalidSubmission(f"input {name[:64]!r}: {exc.strerror}") from None
        limit = ctx.config.inputs_bytes_max
        if total > limit:
            raise InvalidSubmission(f"inputs are {total} bytes; the limit is {limit}")
        refs: list[InputRef] = []
        try:
            blobs.check_room(total)
            for name, data in sub.inputs:
                root = await trio.to_thread.run_sync(blobs.put_bytes, data)
                refs.append(InputRef(name, root, len(data)))
            for name, path in sub.input_paths:
                root, size = await blobs.put_path(path)
                refs.append(InputRef(name, root, size))
        except BlobError as exc:
            for ref in refs:
                blobs.unpin(ref.root)
            raise InvalidSubmission(f"cannot store the inputs: {exc}") from None
        return tuple(refs)

    def _submit(
        self, submission: JobSubmission, refs: tuple[InputRef, ...], deadline: int
    ) -> JobRecord:
        ctx = self.ctx
        now = ctx.clock_ms()
        manifest = self.check_submission(submission, refs)
        request = ctx.sign(
            JobRequest(
                chain_id=ctx.chain_id,
                created_ms=now,
                requirements=submission.requirements,
                max_price_per_gpu_second=submission.max_price_per_gpu_second,
                max_wall_ms=submission.max_wall_ms,
                deadline_ms=deadline,
                bid_window_ms=submission.bid_window_ms or ctx.config.bid_window_ms,
                manifest_digest=ledger.hash_of(manifest),
                inputs_bytes=sum(ref.size_bytes for ref in manifest.inputs),
                outputs_bytes_max=submission.outputs_bytes_max,
            )
        )
        job_id = ledger.hash_of(request)
        verify = submission.verify
        if verify == 1 and spot_checked(job_id, ctx.config.spot_check_rate):
            verify = 2
        record = JobRecord(
            role=Role.REQUESTER,
            job_id=job_id,
            state=JobState.BIDDING,
            request=request,
            strategy=submission.strategy,
            attempt_job_id=job_id,
            stamps=(Stamp(JobState.BIDDING, now),),
            group_id=job_id if verify > 1 else b"",
            verify=verify,
        )
        self.book.add(record, manifest=manifest)
        self.drivers.start(job_id)
        for replica in range(1, verify):
            self.add_replica(record, replica)
        return record

    def add_replica(self, first: JobRecord, replica: int) -> JobRecord:
        """One more run of a verified job: its own request (and job id) in the same group."""
        now = self.ctx.clock_ms()
        request = self.ctx.sign(
            dataclasses.replace(
                first.request,
                created_ms=now,
                replica=replica,
                signer=b"",
                signature=b"",
            )
        )
        job_id = ledger.hash_of(request)
        manifest = self.ctx.store.manifest(first.job_id)
        record = JobRecord(
            role=Role.REQUESTER,
            job_id=job_id,
            state=JobState.BIDDING,
            request=request,
            strategy=first.strategy,
            attempt_job_id=job_id,
            stamps=(Stamp(JobState.BIDDING, now),),
            group_id=first.group_id,
            verify=first.verify,
        )
        self.book.add(record, manifest=manifest)
        self.drivers.start(job_id)
        return record

    def replicas(self, record: JobRecord) -> list[JobRecord]:
        return [r for r in self.book.records() if record.group_id and r.group_id == record.group_id]

    def verify_gate(self, record: JobRecord, delivery: Delivery) -> bool:
        """Ack a verified job's delivery only once a majority of its replicas delivered the
        same plain root; never ack one the majority contradicts (it is slash evidence)."""
        if not record.group_id:
            return True
        self.keep_delivery(record, delivery)
        decision = self.group_decision(record)
        if decision.run_extra:
            self.run_extra(record)
            return False
        return decision.winner is not None and delivery.plain_root == decision.winner

    def keep_delivery(self, record: JobRecord, delivery: Delivery) -> None:
        """Persist a checked delivery in its replica's record (before any ack), one per
        attempt: a retry of the replica adds its own and never drops an earlier attempt's."""
        current = self.book[record.job_id]
        if delivery in current.deliveries:
            return
        kept = tuple(d for d in current.deliveries if d.job_id != delivery.job_id)
        self.book.update(current, deliveries=(*kept, delivery))

    @staticmethod
    def current_delivery(record: JobRecord) -> Delivery | None:
        """The checked delivery of the record's current attempt, if it delivered."""
        last = record.deliveries[-1] if record.deliveries else None
        return last if last is not None and last.job_id == record.attempt_job_id else None

    def run_extra(self, record: JobRecord) -> None:
        """The replicas disagree with no majority: one more run of the group."""
        first = next((r for r in self.replicas(record) if r.job_id == record.group_id), None)
        if first is None or first.cancel_requested or first.state is JobState.CANCELLED:
            return  # the user cancelled the group
        log.info("job %s: replicas disagree, one more run", record.group_id.hex()[:16])
        self.add_replica(first, record.verify)

    def image_bytes(self, record: JobRecord) -> int:
        """The size of the job's image (what its provider may have to fetch), or 0."""
        manifest = self.ctx.store.manifest(record.job_id)
        image = manifest.image if manifest is not None else None
        return image.total_bytes if image is not None else 0

    def group_providers(self, record: JobRecord) -> set[bytes]:
        """Every provider a verified job's group has used (none for a job run once)."""
        if not record.group_id:
            return set()
        used: set[bytes] = set()
        for r in self.replicas(record):
            used.update(r.tried)
            if r.counterparty:
                used.add(r.counterparty)
            used.update(d.signer for d in r.deliveries)
        return used

    def group_decision(self, record: JobRecord) -> VerifyDecision:
        """What the deliveries of ``record``'s group decide so far (no side effects). Each
        provider's vote counts once, whatever number of replicas it delivered."""
        replicas = self.replicas(record)
        extra_used = any(r.request.replica >= record.verify for r in replicas)
        planned = record.verify + (1 if extra_used else 0)
        all_in = all(r.deliveries or r.state.terminal for r in replicas)
        voters: set[bytes] = set()
        roots: list[bytes | None] = []
        for r in replicas:
            vote = self.vote(r)
            if vote is None or vote[0] in voters:
                roots.append(None)
                continue
            voters.add(vote[0])
            roots.append(vote[1])
        return verify_step(planned, roots, all_in, extra_used)

    def vote(self, replica: JobRecord) -> tuple[bytes, bytes] | None:
        """``(provider, plain root)`` a replica delivered: its latest attempt's checked
        delivery (a replica votes once, however many of its attempts delivered), else its
        settled trade's, where the chain keeps the delivery's plain root."""
        if replica.deliveries:
            delivery = replica.deliveries[-1]
            return delivery.signer, delivery.plain_root
        trade = self.ctx.chain.trade(replica.attempt_job_id) if replica.terms else None
        if trade is None or trade.status is not TradeStatus.SETTLED or not trade.plain_root:
            return None
        return trade.terms.provider, trade.plain_root

    def outvoted(self, record: JobRecord) -> tuple[bytes | None, list[Delivery]]:
        """The majority's plain root of ``record``'s group (None: no majority yet) and every
        delivery of the group that contradicts it (any replica, any attempt): the evidence."""
        winner = self.group_decision(record).winner
        if winner is None:
            return None, []
        evidence = [
            d for r in self.replicas(record) for d in r.deliveries if d.plain_root != winner
        ]
        return winner, evidence

    def was_slashed(self, aid: bytes) -> bool:
        """Whether an attempt's outvoted delivery already went to the chain as evidence."""
        trade = self.ctx.chain.trade(aid)
        return aid in self.slashed or (trade is not None and trade.slashed)

    async def slash_outvoted(self, record: JobRecord) -> None:
        """Submit the evidence against every outvoted delivery of ``record``'s group, each
        once, as soon as two replicas of the majority have settled (the chain checks the
        roots itself). Any replica's driver may do it: the last of the majority to settle
        finds the evidence of attempts that were retried since, or of finished replicas."""
        winner, evidence = self.outvoted(record)
        evidence = [d for d in evidence if not self.was_slashed(d.job_id)]
        if winner is None or not evidence:
            return
        settled: list[Trade] = []
        for other in self.replicas(record):
            trade = self.ctx.chain.trade(other.attempt_job_id) if other.terms else None
            if trade is not None and trade.status is TradeStatus.SETTLED:
                settled.append(trade)
        for delivery in evidence:
            winners = [
                t.terms.job_id
                for t in settled
                if t.plain_root == winner and t.terms.provider != delivery.signer
            ]
            if len(winners) >= 2:
                await self.submit_slash(record, delivery, winners[0], winners[1])

    async def submit_slash(
        self, record: JobRecord, delivery: Delivery, job_y: bytes, job_z: bytes
    ) -> None:
        ctx = self.ctx

        def build(nonce: int) -> ledger.Transaction:
            return ctx.sign(
                SlashOutvoted(
                    nonce=nonce,
                    fee=ctx.fee(),
                    delivery=delivery,
                    job_y=ledger.JobId(job_y),
                    job_z=ledger.JobId(job_z),
                )
            )

        self.slashed.add(delivery.job_id)
        try:
            ok, error = await ctx.submit_and_commit(build, lambda _: None)
        except ChainRejected as exc:
            ok, error = False, str(exc)
        outcome = "its provider was slashed" if ok else f"the slash failed: {error}"
        owner = next(r for r in self.replicas(record) if delivery in r.deliveries)
        log.warning(
            "job %s: the delivery of attempt %s was outvoted; %s",
            owner.job_id.hex()[:16],
            delivery.job_id.hex()[:16],
            outcome,
        )
        if owner.attempt_job_id == delivery.job_id and not owner.state.terminal:
            # The replica's current attempt: its record ends output_mismatch with this.
            self.book.update(owner, error=f"outvoted by the other replicas; {outcome}")

    def check_submission(self, sub: JobSubmission, refs: tuple[InputRef, ...]) -> JobManifest:
        """The manifest of ``sub`` whose inputs (already stored) are ``refs``."""
        # An image job may leave the command to the image's entrypoint and Cmd.
        if not (0 if sub.image else 1) <= len(sub.argv) <= argv_items_max:
            raise InvalidSubmission(f"the command must have 1..{argv_items_max} arguments")
        if len(sub.env) > env_items_max or len(refs) > input_files_max:
            raise InvalidSubmission(
                f"at most {env_items_max} env vars and {input_files_max} input files"
            )
        if sub.strategy not in STRATEGIES:
            raise InvalidSubmission(f"strategy must be one of {', '.join(STRATEGIES)}")
        if not 0 < sub.max_wall_ms <= 7 * 24 * 3600 * 1000:
            raise InvalidSubmission("max_wall_ms must be in 1 ms .. 7 days")
        if sub.max_price_per_gpu_second < 0 or not 0 <= sub.requirements.gpus <= 64:
            raise InvalidSubmission("max price must be >= 0 and gpus 0..64")
        if not 0 <= sub.bid_window_ms <= 60_000:
            raise InvalidSubmission("bid_window_ms must be 0..60000")
        image = describe_image(self.ctx.images, sub.image) if sub.image else None
        manifest = JobManifest(tuple(sub.argv), tuple(sub.env), refs, image)
        check_manifest(manifest, self.ctx.config.inputs_bytes_max)
        return manifest

    def get(self, job_id: bytes) -> JobRecord:
        record = self.book.get(job_id)
        if record is None:
            raise UnknownJob(job_id.hex())
        return record

    async def cancel(self, job_id: bytes) -> JobRecord:
        """Cancel a job; a verified job's id (its group's) cancels every live replica, each
        trade paying its provider pro rata as a job run once would."""
        record = self.get(job_id)
        group = self.replicas(record) if record.group_id == job_id else [record]
        live = {r.job_id for r in group if not r.state.terminal}
        for key in live:
            self.book.update(self.book[key], error="cancel requested", cancel_requested=True)
            self.drivers.start(key, replace=True)
        with trio.move_on_after(self.ctx.config.request_timeout_s * 3):
            receive = self.ctx.events.subscribe()
            async with receive:
                while not all(self.book[key].state.terminal for key in live):
                    await receive.receive()
        return self.get(job_id)

    async def result(self, job_id: bytes) -> JobResultView:
        record = self.get(job_id)
        if record.state is not JobState.DONE and record.group_id == job_id:
            # A verified job: the outputs are the majority's, whichever replica ran them.
            done = [r for r in self.replicas(record) if r.state is JobState.DONE]
            record = done[0] if done else record
        if record.state is not JobState.DONE:
            raise JobNotReady(f"job {job_id.hex()[:16]} is {record.state.label}, not done")
        outputs, directory = await trio.to_thread.run_sync(self.exchange.read_outputs, record)
        result = record.result
        return JobResultView(
            job_id=job_id,
            state=record.state,
            outputs=outputs,
            stdout=result.stdout if result else b"",
            stderr=result.stderr if result else b"",
            receipt=record.receipt,
            files=record.outputs,
            output_dir=str(directory),
        )

    async def logs(
        self, job_id: bytes, stdout_offset: int = 0, stderr_offset: int = 0, bytes_max: int = 0
    ) -> LogsView:
        """The job's logs from two offsets: the sealed ones once opened, else the live tail
        (and a running job is followed from now on: see ``_logs``)."""
        return self.live_logs.read(job_id, stdout_offset, stderr_offset, bytes_max)

    # ---- the driver ----

    async def drive(self, job_id: bytes) -> None:
        for _ in range(driver_passes_max):  # every pass moves the job or waits on the chain
            record = self.book[job_id]
            if record.state.terminal:
                return
            if record.cancel_requested:
                await self.cancel_trade(record)
            elif record.state is JobState.BIDDING:
                await self.bid_round(record)
            elif record.state is JobState.AWARDED:
                await self.lock(record)
            elif record.state in (JobState.LOCKED, JobState.RUNNING):
                await self.watch_trade(record)
            elif record.state is JobState.SETTLING:
                # A settled replica may complete the majority that outvotes another's
                # delivery (of any attempt, retried or finished since): slash it first.
                await self.slash_outvoted(record)
                await self.exchange.collect(record)
        raise AssertionError(f"a requester driver made no progress in {driver_passes_max} passes")

    async def bid_round(self, record: JobRecord) -> None:
        ctx = self.ctx
        request = record.request
        job_id = record.job_id
        self.bidding.add(job_id)
        payload = ledger.encode(request)
        # Gossip is best effort (a mesh still forming, a loaded peer): the request goes out
        # again half way through the window, and a window with no bid at all is extended
        # once. Providers bid once per job id, so a repeat costs one gossip message.
        try:
            for _ in range(bid_windows_max):
                await ctx.net.publish(JOBS_PURPOSE, JobRequest.TYPE_TAG, payload)
                await trio.sleep(request.bid_window_ms / 2000)
                await ctx.net.publish(JOBS_PURPOSE, JobRequest.TYPE_TAG, payload)
                await trio.sleep(request.bid_window_ms / 2000)
                if self.book[job_id].bids:
                    break
        finally:
            self.bidding.discard(job_id)
        record = self.book[job_id]
        if not record.bids and self.worth_waiting(record):
            # Providers exist for this job but none had a free slot: a burst of jobs. Wait for
            # capacity (backing off) until the deadline leaves no room, then ask again.
            rounds = record.bid_rounds + 1
            self.book.update(record, bid_rounds=rounds, error="waiting for a free provider slot")
            await trio.sleep(min(capacity_backoff_ms_max, capacity_backoff_ms * rounds) / 1000)
            return
        if not record.bids:
            self.book.finish(
                record,
                JobState.FAILED,
                f"no bids within {bid_windows_max} windows of {request.bid_window_ms} ms for "
                f"{request.requirements.describe()} at <= {request.max_price_per_gpu_second}",
            )
            return
        await self.award_next(record, first=True)

    def worth_waiting(self, record: JobRecord) -> bool:
        """True when some live offer could take this job once a slot frees up, the price
        fits, and the deadline still leaves room for another bid round and the run."""
        request = record.request
        now = self.ctx.clock_ms()
        if record.bid_rounds >= capacity_rounds_max or not room_for_round(request, now):
            return False
        why = explain_unsatisfiable(
            self.ctx.directory.offers(now), request.requirements, request.max_price_per_gpu_second
        )
        return why is None or why.startswith("all ")

    def score(self, provider: bytes) -> float:
        """The ``reputation`` strategy's input: the provider's counters on chain."""
        account = self.ctx.chain.account(provider)
        return reputation(account.completed, account.failed, account.slashed)

    def make_award(self, record: JobRecord, bid: Bid, attempt: int, deadline_ms: int) -> Award:
        manifest = self.ctx.store.manifest(record.job_id)
        if manifest is None:
            raise MarketError("the job's manifest is missing from the job store")
        request = record.request
        return self.ctx.sign(
            Award(
                job_id=record.job_id,
                request=request,
                attempt=attempt,
                attempt_job_id=attempt_job_id(record.job_id, attempt),
                provider=bid.signer,
                price_per_gpu_second=bid.price_per_gpu_second,
                gpus=request.requirements.gpus,
                max_cost=request.max_cost(bid.price_per_gpu_second),
                deadline_ms=deadline_ms,
                manifest=manifest,
                group_id=self.group_of(record),
            )
        )

    def group_of(self, record: JobRecord) -> bytes:
        """The trade group of a job's attempts: the verify group's id, else the job's own."""
        return record.group_id or record.job_id

    async def award_next(self, record: JobRecord, *, first: bool) -> None:
        """Award the best untried bid; on success the record is AWARDED with signed terms."""
        ctx = self.ctx
        request = record.request
        peers = dict(zip((b.signer for b in record.bids), record.bid_peers, strict=True))
        # The replicas of a verified job each go to a different provider: none that was
        # awarded, tried or delivered for any replica of the group (this one's earlier
        # attempts included), and a provider's vote counts once anyway (group_decision).
        taken = self.group_providers(record)
        ranked = [
            b
            for b in rank_bids(record.bids, record.strategy, self.score)
            if b.signer not in record.tried and b.signer not in taken
        ]
        refusals: list[str] = []
        attempt = record.attempt if first else record.attempt + 1
        for bid in ranked:
            deadline = attempt_deadline(
                request, ctx.clock_ms(), ctx.config.attempt_slack_ms, self.image_bytes(record)
            )
            if deadline is None:
                refusals.append("no time left before the job's deadline")
                break
            award = self.make_award(record, bid, attempt, deadline)
            record = self.book.update(record, tried=(*record.tried, bid.signer))
            try:
                data = await ctx.request(peers[bid.signer], PROTOCOL_AWARD, ledger.encode(award))
                terms = decode(AgreementTerms, data)
                terms.validate(ctx.chain_id)
            except (NetError, ledger.LedgerError) as exc:
                refusals.append(f"{bid.signer.hex()[:12]}: {exc}")
                continue
            why = terms_refusal(terms, award, ctx.address)
            if why is not None:
                refusals.append(f"{bid.signer.hex()[:12]}: {why}")
                continue
            self.book.update(
                record,
                state=JobState.AWARDED,
                attempt=attempt,
                attempt_job_id=award.attempt_job_id,
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
        room = room_for_round(record.request, ctx.clock_ms())
        if refusals and room and record.bid_rounds + 1 < capacity_rounds_max:
            # Every bidder was full by the time of the award (a burst of jobs): ask again,
            # the next round sees the slots that have freed up since.
            self.book.update(
                record,
                state=JobState.BIDDING,
                bids=(),
                bid_peers=(),
                tried=(),
                error=why,
                bid_rounds=record.bid_rounds + 1,
            )
            return
        state = JobState.FAILED if first or not refusals else JobState.REFUNDED
        self.book.finish(record, state, why)

    async def lock(self, record: JobRecord) -> None:
        ctx = self.ctx
        terms = record.terms
        assert terms is not None, "an awarded job has terms"
        if record.agreement_tx:
            # Resumed after a restart: an agreement sent before it may still be pending.
            for _ in range(agreement_wait_blocks_max):
                status = ctx.chain.tx_result(record.agreement_tx)
                if status is None or status[0]:
                    break
                await ctx.wait_block()
        trade = ctx.chain.trade(record.attempt_job_id)
        if trade is None or trade.terms != terms:

            def build(nonce: int) -> ledger.Transaction:
                return ctx.sign(Agreement(nonce=nonce, fee=ctx.fee(), terms=terms))

            def submitted(txh: bytes) -> None:
                self.book.update(record, agreement_tx=txh)

            try:
                ok, error = await ctx.submit_and_commit(build, submitted)
            except ChainRejected as exc:
                ok, error = False, str(exc)
            trade = ctx.chain.trade(record.attempt_job_id)
            if not ok and (trade is None or trade.terms != terms):
                self.book.finish(record, JobState.FAILED, f"the agreement was rejected: {error}")
                return
        if self.book[record.job_id].state is JobState.AWARDED:
            self.book.update(record, state=JobState.LOCKED)

    def refund_builder(self, aid: bytes) -> Callable[[int], ledger.Transaction]:
        def build(nonce: int) -> ledger.Transaction:
            tx = Refund(nonce=nonce, fee=self.ctx.fee(), job_id=ledger.JobId(aid))
            return self.ctx.sign(tx)

        return build

    async def watch_trade(self, record: JobRecord) -> None:
        ctx = self.ctx
        terms = record.terms
        assert terms is not None, "a locked job has terms"
        aid = record.attempt_job_id
        refund_tx: bytes | None = None
        while True:
            trade = ctx.chain.trade(aid)
            if trade is None:
                raise MarketError("the trade vanished from the chain")
            status = None if refund_tx is None else ctx.chain.tx_result(refund_tx)
            refund_live = status is not None and not (status[0] and not status[1])
            step = watch_step(trade.status, ctx.chain.head()[1], terms.deadline_ms, refund_live)
            if step is WatchStep.SETTLED:
                self.book.update(
                    record,
                    state=JobState.SETTLING,
                    receipt=ctx.chain.receipt(aid),
                    receipt_tx=trade.receipt_tx,
                    cost=trade.paid,
                )
                return
            closed = step in (WatchStep.CANCELLED, WatchStep.REFUNDED)
            others_over = all(
                r.state.terminal for r in self.replicas(record) if r.job_id != record.job_id
            )
            mine = self.current_delivery(record)
            outvoted = False
            if mine is not None:
                # This attempt delivered: the group decides, even after its provider gave
                # the trade up waiting for an ack (then it is not retried while undecided).
                decision = self.group_decision(record)
                if decision.run_extra:
                    self.run_extra(record)
                winner = decision.winner
                outvoted = winner is not None and winner != mine.plain_root
                if winner is None and closed and not others_over and not decision.undecided:
                    await ctx.wait_block()
                    continue
            if outvoted:
                assert mine is not None
                # Never retried: the evidence goes in once two of the majority settled.
                await self.slash_outvoted(record)
                if closed and (self.was_slashed(mine.job_id) or others_over):
                    why = self.book[record.job_id].error or "outvoted by the other replicas"
                    self.book.finish(record, JobState.OUTPUT_MISMATCH, why)
                    return
                if closed:
                    await ctx.wait_block()
                    continue
            if step is WatchStep.CANCELLED:
                # Not asked for here (that goes through cancel_trade): the provider gave the
                # job up with its own Cancel, and the escrow came back in full.
                await self.after_refund(record, self.exchange.cancel_reason(record))
                return
            if step is WatchStep.REFUNDED:
                await self.after_refund(record)
                return
            if step is WatchStep.SEND_REFUND:
                try:
                    refund_tx = await ctx.chain.submit(self.refund_builder(aid))
                except ChainRejected as exc:
                    log.info("refund of %s not accepted yet: %s", aid.hex()[:16], exc)
            await self.exchange.progress(record)
            record = self.book[record.job_id]
            if record.cancel_requested:
                return

    async def after_refund(self, record: JobRecord, what: str = "missed the deadline") -> None:
        """The attempt's escrow came back: retry with the next untried bid, time allowing."""
        provider = record.counterparty
        record = self.book.update(record, error=f"provider {provider.hex()[:12]} {what}")
        if len(record.deliveries) >= replica_deliveries_max:
            self.book.finish(record, JobState.REFUNDED, f"{record.error} (no more retries)")
            return
        if retry_after_refund(record.request, self.ctx.clock_ms(), record.bids, record.tried):
            await self.award_next(record, first=False)
            return
        self.book.finish(record, JobState.REFUNDED, record.error)

    async def cancel_trade(self, record: JobRecord) -> None:
        ctx = self.ctx
        aid = record.attempt_job_id
        trade = ctx.chain.trade(aid) if record.terms is not None else None
        if record.state is JobState.AWARDED and trade is None and record.agreement_tx:
            # The agreement may still commit: wait for it (bounded) so it can be cancelled.
            for _ in range(10):
                status = ctx.chain.tx_result(record.agreement_tx)
                if status is None or status[0]:
                    break
                await ctx.wait_block()
            trade = ctx.chain.trade(aid)
        if record.counterparty_peer_id:
            notice = ctx.sign(CancelNotice(attempt_job_id=aid))
            try:
                await ctx.request(
                    record.counterparty_peer_id, PROTOCOL_CANCEL, ledger.encode(notice)
                )
            except NetError as exc:
                log.info("cancel notice to the provider failed (the chain decides): %s", exc)
        step = cancel_step(trade.status if trade is not None else None)
        if step is CancelStep.TOO_LATE:
            # The receipt settled first; carry on and fetch the outputs.
            self.book.update(record, cancel_requested=False, state=JobState.LOCKED)
            return
        if step is CancelStep.CLOSED:
            self.book.finish(record, JobState.CANCELLED, "cancelled by the requester")
            return

        def build(nonce: int) -> ledger.Transaction:
            return ctx.sign(Cancel(nonce=nonce, fee=ctx.fee(), job_id=ledger.JobId(aid)))

        try:
            await ctx.submit_and_commit(build, lambda _: None)
        except ChainRejected as exc:
            log.info("cancel tx of %s rejected: %s", aid.hex()[:16], exc)
        trade = ctx.chain.trade(aid)
        step = cancel_step(trade.status if trade is not None else None)
        if step is CancelStep.TOO_LATE:
            self.book.update(record, cancel_requested=False, state=JobState.LOCKED)
            return
        if step is CancelStep.SEND_CANCEL:
            raise MarketError("the cancel transaction did not close the trade")
        self.book.finish(record, JobState.CANCELLED, "cancelled by the requester")

    # ---- handlers (a provider calls these) ----

    async def on_bid(self, peer_id: str, data: bytes) -> bytes:
        bid = decode_signed(Bid, data, self.ctx.chain_id)
        record = self.book.get(bid.job_id)
        accepting = (
            bid.job_id in self.bidding and record is not None and record.state is JobState.BIDDING
        )
        why = (
            "not accepting bids for this job"
            if record is None
            else bid_refusal(
                bid,
                record.request,
                accepting=accepting,
                bids=record.bids,
                bids_max=bids_per_job_max,
            )
        )
        if why is None and record is not None:
            why = self.bidder_refusal(bid, record.request)
        if why is not None or record is None:
            self.ctx.counters["bids_rejected"] += 1
            raise NetError(why or "not accepting bids for this job")
        # Persisted before the provider hears it was taken: a restart keeps every bid.
        self.book.update(record, bids=(*record.bids, bid), bid_peers=(*record.bid_peers, peer_id))
        self.ctx.counters["bids_received"] += 1
        return b""

    def bidder_refusal(self, bid: Bid, request: JobRequest) -> str | None:
        """A bid counts only from a signer that can be held to it: a live offer the bid
        agrees with, and the chain's minimum bond at stake."""
        ctx = self.ctx
        now = ctx.clock_ms()
        why = offer_refusal(bid, ctx.directory.get(bid.signer, now), request.requirements, now)
        if why is not None:
            return why
        bonded = ctx.chain.account(bid.signer).bonded
        return bond_refusal(bonded, ctx.chain.params().provider_bond_min)

    def job_for_peer(self, job_id: bytes, peer_id: str) -> JobRecord:
        record = self.book.get(job_id)
        if record is None or record.counterparty_peer_id != peer_id:
            raise NetError("no such job awarded to you")
        return record

    async def on_input(self, peer_id: str, data: bytes) -> bytes:
        ask = decode(BlobChunkAsk, data)
        self.job_for_peer(ask.scope, peer_id)
        return await serve_input_chunk(self.ctx, self.ctx.store.manifest(ask.scope), ask)

    async def on_input_index(self, peer_id: str, data: bytes) -> bytes:
        ask = decode(BlobIndexAsk, data)
        self.job_for_peer(ask.scope, peer_id)
        return await serve_input_index(self.ctx, self.ctx.store.manifest(ask.scope), ask)

    async def on_image_blob(self, peer_id: str, data: bytes) -> bytes:
        ask = decode(BlobRequest, data)
        self.job_for_peer(ask.job_id, peer_id)
        return await serve_image_blob(self.ctx.images, self.ctx.store.manifest(ask.job_id), ask)

    async def on_status(self, peer_id: str, data: bytes) -> bytes:
        for record in self.book.records():
            if (
                record.attempt_job_id == data
                and record.counterparty_peer_id == peer_id
                and record.state in (JobState.AWARDED, JobState.LOCKED)
            ):
                # The provider starts only on an open trade, so its notice can overtake our
                # own view of the agreement's commit: then the lock is stamped now as well.
                if record.state is JobState.AWARDED:
                    record = self.book.update(record, state=JobState.LOCKED)
                self.book.update(record, state=JobState.RUNNING)
        return b""
