"""The provider side: hear job requests, bid, accept an award (slots held, terms signed), wait
for the trade to open, fetch the inputs, run the job in the sandbox, then hand over to the
exchange (``_exchange.ProviderExchange``) to serve the outputs and settle.

Life of a job here (keyed by the attempt's job id): awarded (slots held) -> locked (trade open
on chain) -> running -> settling (receipt submitted) -> done. The decisions are the pure
functions of ``_protocol``; each cheatable step is its own method (a simulated cheater
overrides one).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

import trio

import ledger
from compute import NoCapacityError
from compute._sandbox import JobSpec
from compute.exceptions import ComputeError
from compute.market._blobs import BlobDiskFull
from compute.market._checks import check_manifest
from compute.market._context import Drivers, JobBook
from compute.market._exchange import ProviderExchange, exec_id
from compute.market._imagemesh import ImageFetcher, image_refusal
from compute.market._logs import ProviderLogs
from compute.market._matching import fit_on_node
from compute.market._protocol import (
    OpenStep,
    ReleaseStep,
    award_refusal,
    award_terms_refusal,
    bid_again,
    can_pay,
    can_rerun,
    gossip_verdict,
    open_step,
    release_step,
    request_refusal,
    stake_needed,
    within_caps,
)
from compute.market._transfers import fetch_inputs
from compute.market._wire import (
    JOBS_PURPOSE,
    PROTOCOL_AWARD,
    PROTOCOL_BID,
    PROTOCOL_CANCEL,
    PROTOCOL_DELIVERY_ACK,
    PROTOCOL_LOG_TAIL,
    PROTOCOL_SEALED,
    PROTOCOL_SEALED_CHUNKS,
    PROTOCOL_STATUS,
    Mismatch,
    decode_signed,
)
from compute.market.exceptions import ChainRejected, InvalidManifest, MarketError, NetError
from compute.market.types import (
    Award,
    Bid,
    CancelNotice,
    JobRecord,
    JobRequest,
    JobState,
    Role,
    RunResult,
    Stamp,
    log_bytes_max,
)
from ledger import AgreementTerms, Cancel, Stake, TradeStatus

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from compute import Executor, Inventory, OfferConfig, SlotAllocator
    from compute.market._context import Context
    from compute.market.abc import Incoming

log = logging.getLogger("gpumesh.compute.market")

seen_requests_max = 4096
bids_in_flight_max = 16
bids_in_flight_per_requester_max = 2
"""Bids in flight to one requester key (and, separately, to one peer) at a time."""
open_requests_per_requester_max = 8
"""Live bids (reservations not lapsed) one requester key, or one peer, may hold here."""
awards_pending_per_requester_max = 8
"""Awards one requester key (and, separately, one peer) may hold here whose trade has not
opened yet; their escrow together must be covered by the requester's balance."""
driver_passes_max = 10_000
input_copies = 2
"""Disk an input takes here: its blob, and its copy in the job directory (no reflinks on most
file systems). Free disk for this many times the inputs is checked before a bid and an award."""
stake_check_s = 10.0
"""How often a provider looks at its bond (slashes and unbonds lower it)."""
release_attempts_max = 5
"""Rejected provider Cancels before this node stops trying (and logs why)."""
cancel_grace_ms = 10_000
"""After a requester's cancel notice, how long its own Cancel (which pays this provider pro
rata) has before the provider closes the trade itself so it cannot be refunded and slashed."""


@dataclasses.dataclass
class ProviderSide:
    """What a providing node contributes: its devices, slots, sandbox and prices."""

    executor: Executor
    allocator: SlotAllocator
    inventory: Inventory
    offer_config: OfferConfig


@dataclasses.dataclass
class _Seen:
    """What this provider did with one gossiped request."""

    request: JobRequest
    peer_id: str
    reservation_expiry_ms: int
    max_cost: int
    in_flight: bool = True
    delivered: bool = False

    def live(self, now_ms: int) -> bool:
        return self.in_flight or (self.delivered and self.reservation_expiry_ms > now_ms)


class Provider:
    """The provider side of one node's market."""

    exchange_cls: type[ProviderExchange] = ProviderExchange

    def __init__(self, ctx: Context, side: ProviderSide) -> None:
        self.ctx = ctx
        self.side = side
        self.book = JobBook(Role.PROVIDER, ctx, on_finish=self._on_finish)
        self.drivers = Drivers(self.book, ctx, self.drive)
        self.releases = Drivers(self.book, ctx, self.release)
        """One task per attempt this node will not deliver: its own Cancel goes on chain."""
        self.exchange = self.exchange_cls(ctx, self.book, side.executor)
        self.seen: OrderedDict[bytes, _Seen] = OrderedDict()
        self.runs: dict[bytes, trio.CancelScope] = {}
        self.bid_slots = trio.Semaphore(bids_in_flight_max)
        self.logs = ProviderLogs(ctx, self.book, side.executor)
        self.images = ImageFetcher(
            ctx,
            getattr(side.executor, "images", None),
            cache_bytes_max=ctx.config.image_cache_bytes_max,
            registry=ctx.config.image_registry,
        )

    def handlers(self) -> dict[str, Callable[[str, bytes], Awaitable[bytes]]]:
        """The stream protocols this side serves (to requesters)."""
        return {
            PROTOCOL_AWARD: self.on_award,
            PROTOCOL_SEALED: self.exchange.on_sealed,
            PROTOCOL_SEALED_CHUNKS: self.exchange.on_sealed_chunks,
            PROTOCOL_DELIVERY_ACK: self.exchange.on_ack,
            PROTOCOL_LOG_TAIL: self.logs.on_log_tail,
            PROTOCOL_CANCEL: self.on_cancel,
        }

    def _release(self, record: JobRecord) -> None:
        aid = exec_id(record.attempt_job_id)
        if self.side.allocator.allocation(aid) is not None:
            self.side.allocator.release(aid)

    def _on_finish(self, record: JobRecord, state: JobState) -> dict[str, object]:
        self._release(record)
        if state is JobState.DONE or state is JobState.REFUNDED:
            return {}
        # Whatever ended it (a failure, a restart too late, a cancel notice, a trade that
        # never opened in time), the trade must not stay open past its deadline with us on it.
        self.ctx.start_soon(lambda: self._start_release(record.attempt_job_id))
        return {"cancel_requested": True}

    async def _start_release(self, aid: bytes) -> None:
        self.releases.start(aid)

    def start(self) -> None:
        """Start the drivers of every unfinished job and every owed release (at ``run``)."""
        for key in self.book.unfinished():
            self.drivers.start(key)
        for key in self.book.matching(lambda r: r.state.terminal and r.cancel_requested):
            self.releases.start(key)

    def committed(self, requester: bytes, now_ms: int) -> int:
        """Escrow this provider already counts on from ``requester``: its unopened awards and
        its live bids here. A new bid or award must fit its balance on top of these."""
        awards = sum(
            r.terms.max_cost
            for r in self.book.records()
            if r.state is JobState.AWARDED and r.counterparty == requester and r.terms
        )
        bids = sum(
            s.max_cost
            for s in self.seen.values()
            if s.request.signer == requester and s.live(now_ms)
        )
        return awards + bids

    # ---- requests and bids ----

    async def keep_bonded(self) -> None:
        """Stake from the balance whenever the bond is below what this provider should hold
        (``stake_target``): without the chain's minimum bond nobody may award it work."""
        ctx = self.ctx
        warned = False
        while True:
            account = ctx.chain.account(ctx.address)
            amount = stake_needed(
                account.bonded, ctx.config.stake, ctx.chain.params().provider_bond_min
            )
            if amount > 0 and account.balance >= amount + ctx.fee():

                def build(nonce: int, amount: int = amount) -> ledger.Transaction:
                    return ctx.sign(Stake(nonce=nonce, fee=ctx.fee(), amount=amount))

                try:
                    ok, error = await ctx.submit_and_commit(build, lambda _: None)
                except MarketError as exc:
                    ok, error = False, str(exc)
                if ok:
                    log.info("staked %d (bond now %d)", amount, account.bonded + amount)
                else:
                    log.warning("staking %d failed: %s", amount, error)
            elif amount > 0 and not warned:
                warned = True
                log.warning(
                    "bond %d is below the %d needed to be awarded work, and the balance %d "
                    "cannot cover it",
                    account.bonded,
                    account.bonded + amount,
                    account.balance,
                )
            with trio.move_on_after(stake_check_s):
                await ctx.chain.wait_new_block()

    def validate_gossip(self, incoming: Incoming) -> bool | None:
        """The ``jobs`` topic's validator (runs in the mesh, before a request is relayed)."""
        try:
            request: JobRequest | None = decode_signed(
                JobRequest, incoming.payload, self.ctx.chain_id
            )
        except NetError:
            request = None
        return gossip_verdict(
            request,
            sender=incoming.sender,
            type_tag=incoming.type_tag,
            chain_id=self.ctx.chain_id,
            now_ms=self.ctx.clock_ms(),
        )

    async def requests_loop(self) -> None:
        receive = self.ctx.net.subscribe_validated(JOBS_PURPOSE, self.validate_gossip)
        counters = self.ctx.counters
        async with receive:
            async for incoming in receive:
                counters["requests_seen"] += 1
                try:
                    self.consider_request(incoming)
                except MarketError as exc:
                    counters["requests_rejected"] += 1
                    log.debug("job request from %s rejected: %s", incoming.sender_peer_id, exc)
                except Exception:
                    # One bad request costs its own handling, never the gossip consumer.
                    counters["requests_rejected"] += 1
                    counters["handler_faults"] += 1
                    log.exception("job request from %s broke", incoming.sender_peer_id)

    def consider_request(self, incoming: Incoming) -> None:
        ctx = self.ctx
        request = decode_signed(JobRequest, incoming.payload, ctx.chain_id)
        if request.signer == ctx.address:
            return
        now = ctx.clock_ms()
        why = request_refusal(
            request,
            sender=incoming.sender,
            chain_id=ctx.chain_id,
            now_ms=now,
            inputs_bytes_max=ctx.config.inputs_bytes_max,
        )
        if why is not None:
            raise NetError(why)
        job_id = ledger.hash_of(request)
        seen = self.seen.get(job_id)
        if seen is not None and not bid_again(
            seen.in_flight, seen.delivered, seen.reservation_expiry_ms, now
        ):
            return
        peer = incoming.sender_peer_id
        live = [s for s in self.seen.values() if s.live(now)]
        if not within_caps(
            sum(1 for s in live if s.request.signer == request.signer),
            sum(1 for s in live if s.peer_id == peer),
            open_requests_per_requester_max,
        ):
            raise NetError("this requester (or peer) already holds its share of our bids")
        flying = [s for s in live if s.in_flight]
        if not within_caps(
            sum(1 for s in flying if s.request.signer == request.signer),
            sum(1 for s in flying if s.peer_id == peer),
            bids_in_flight_per_requester_max,
        ):
            raise NetError("bids to this requester (or peer) are still in flight")
        bid = self.make_bid(job_id, request, now)
        if bid is None:
            return
        max_cost = request.max_cost(bid.price_per_gpu_second)
        spendable = ctx.chain.account(request.signer).balance
        if not can_pay(spendable, self.committed(request.signer, now), max_cost, ctx.fee()):
            raise NetError("the requester's spendable balance does not cover the job")
        try:
            self.bid_slots.acquire_nowait()
        except trio.WouldBlock:
            # Not recorded as seen: the requester's next round asks again and we bid then.
            raise NetError("too many bids in flight") from None
        self.seen[job_id] = _Seen(request, peer, bid.reservation_expiry_ms, max_cost)
        while len(self.seen) > seen_requests_max:
            self.seen.popitem(last=False)
        assert ctx.nursery is not None
        ctx.nursery.start_soon(self.send_bid, peer, bid)

    def make_bid(self, job_id: bytes, request: JobRequest, now_ms: int) -> Bid | None:
        """This node's bid for ``request`` if it fits right now at an acceptable price."""
        fit = fit_on_node(request.requirements, self.side.allocator, self.side.offer_config)
        if fit is None:
            return None
        model, free, price = fit
        if price > request.max_price_per_gpu_second:
            return None
        if not self.room_for_inputs(request.inputs_bytes):
            return None
        return self.ctx.sign(
            Bid(
                job_id=job_id,
                price_per_gpu_second=price,
                gpus=request.requirements.gpus,
                model=model,
                expected_start_ms=now_ms,
                free_slots=free,
                reservation_expiry_ms=now_ms + self.ctx.config.reservation_ms,
            )
        )

    def _mark(self, job_id: bytes, *, delivered: bool) -> None:
        seen = self.seen.get(job_id)
        if seen is not None:
            seen.in_flight = False
            seen.delivered = delivered

    async def send_bid(self, peer_id: str, bid: Bid) -> None:
        timeout_s = self.ctx.config.bid_timeout_ms / 1000
        try:
            await self.ctx.net.request(peer_id, PROTOCOL_BID, ledger.encode(bid), timeout_s)
            self.ctx.counters["bids_sent"] += 1
            self._mark(bid.job_id, delivered=True)
        except NetError as exc:
            self._mark(bid.job_id, delivered=False)
            log.debug("bid for %s refused: %s", bid.job_id.hex()[:16], exc)
        except Exception:
            self._mark(bid.job_id, delivered=False)
            self.ctx.counters["handler_faults"] += 1
            log.exception("sending the bid for %s broke", bid.job_id.hex()[:16])
        finally:
            self.bid_slots.release()

    def room_for_inputs(self, inputs_bytes: int) -> bool:
        """Whether the disk has room for ``inputs_bytes`` more inputs (a bid promises it)."""
        try:
            self.ctx.store.inputs.check_room(input_copies * inputs_bytes)
        except BlobDiskFull as exc:
            log.info("not bidding: %s", exc)
            return False
        return True

    # ---- the award ----

    async def on_award(self, peer_id: str, data: bytes) -> bytes:
        ctx = self.ctx
        award = decode_signed(Award, data, ctx.chain_id)
        now = ctx.clock_ms()
        why = award_refusal(award, chain_id=ctx.chain_id, own_address=ctx.address, now_ms=now)
        if why is not None:
            raise NetError(why)
        try:
            check_manifest(award.manifest, ctx.config.inputs_bytes_max)
        except InvalidManifest as exc:
            raise NetError(f"bad manifest: {exc}") from exc
        why = image_refusal(award.manifest.image, self.images.images)
        if why is not None:
            raise NetError(why)
        if sum(ref.size_bytes for ref in award.manifest.inputs) != award.request.inputs_bytes:
            raise NetError("the manifest's inputs are not the size the request declared")
        try:
            ctx.store.inputs.check_room(input_copies * award.request.inputs_bytes)
        except BlobDiskFull as exc:
            raise NetError(f"no room for the inputs here: {exc}") from exc
        aid = award.attempt_job_id
        existing = self.book.get(aid)
        if existing is not None:
            if existing.terms is None or existing.state.terminal:
                raise NetError("this attempt is already closed here")
            return ledger.encode(existing.terms)
        request = award.request
        # An award holds slots until its trade opens: only for a requester that can pay for
        # it on top of its other unopened awards here, and only a few unopened ones per
        # requester key and per peer, so signed awards alone cannot lock us up.
        unopened = [r for r in self.book.records() if r.state is JobState.AWARDED]
        committed = sum(
            r.terms.max_cost for r in unopened if r.counterparty == award.signer and r.terms
        )
        spendable = ctx.chain.account(award.signer).balance
        if not can_pay(spendable, committed, award.max_cost, ctx.fee()):
            raise NetError("the requester's balance does not cover the escrow")
        if not within_caps(
            sum(1 for r in unopened if r.counterparty == award.signer),
            sum(1 for r in unopened if r.counterparty_peer_id == peer_id),
            awards_pending_per_requester_max,
        ):
            raise NetError("awards of yours are still waiting for their trades")
        fit = fit_on_node(request.requirements, self.side.allocator, self.side.offer_config)
        if fit is None:
            self._mark(award.job_id, delivered=False)  # bid again when asked again
            raise NetError("no free capacity for this job any more")
        model, _, price = fit
        why = award_terms_refusal(award, price)
        if why is not None:
            raise NetError(why)
        try:
            self.side.allocator.allocate(
                exec_id(aid),
                request.requirements.gpus,
                model=None if request.requirements.gpus == 0 else model,
                min_vram_bytes=request.requirements.min_vram_bytes,
            )
        except NoCapacityError as exc:
            self._mark(award.job_id, delivered=False)
            raise NetError(f"no capacity: {exc}") from exc
        terms = ctx.sign(
            AgreementTerms(
                job_id=ledger.JobId(aid),
                requester=ledger.Address(award.signer),
                provider=ledger.Address(ctx.address),
                price_per_gpu_second=award.price_per_gpu_second,
                gpus=award.gpus,
                max_cost=award.max_cost,
                deadline_ms=award.deadline_ms,
                group_id=award.group_id,
                manifest_digest=request.manifest_digest,
            )
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
        # Persisted (with the manifest) before the signed terms leave this node.
        self.book.add(record, manifest=award.manifest)
        self.drivers.start(aid)
        return ledger.encode(terms)

    async def release(self, aid: bytes) -> None:
        """Close the trade of an attempt this node will not deliver with its own Cancel (full
        refund, no slash) before the deadline, unless someone closes it first. Also covers an
        award whose trade opens only after the slots were let go."""
        ctx = self.ctx
        rejected = 0
        for _ in range(driver_passes_max):
            record = self.book[aid]
            terms = record.terms
            if not record.cancel_requested or terms is None:
                return
            trade = ctx.chain.trade(aid)
            step = release_step(
                trade.status if trade is not None else None,
                trade is not None and trade.terms == terms,
                ctx.chain.head()[1],
                terms.deadline_ms,
            )
            if step is ReleaseStep.DONE:
                self.book.update(record, cancel_requested=False)
                return
            ended_ms = record.stamps[-1].at_ms if record.stamps else 0
            waiting = record.state is JobState.CANCELLED and ctx.clock_ms() < min(
                ended_ms + cancel_grace_ms, terms.deadline_ms - cancel_grace_ms
            )
            if step is ReleaseStep.CANCEL and not waiting:
                try:
                    await ctx.submit_and_commit(
                        lambda nonce: ctx.sign(
                            Cancel(nonce=nonce, fee=ctx.fee(), job_id=ledger.JobId(aid))
                        ),
                        lambda _: None,
                    )
                    continue
                except ChainRejected as exc:
                    rejected += 1
                    log.warning("own cancel of %s rejected: %s", aid.hex()[:16], exc)
                    if rejected >= release_attempts_max:
                        self.book.update(record, cancel_requested=False)
                        return
            await ctx.wait_block()
        raise AssertionError(f"a release made no progress in {driver_passes_max} passes")

    async def on_cancel(self, peer_id: str, data: bytes) -> bytes:
        notice = decode_signed(CancelNotice, data, self.ctx.chain_id)
        record = self.book.get(notice.attempt_job_id)
        if record is None or notice.signer != record.counterparty:
            raise NetError("no such job of yours here")
        if record.state.terminal or record.state is JobState.SETTLING:
            return b""
        scope = self.runs.get(notice.attempt_job_id)
        if scope is not None:
            scope.cancel()
        self.drivers.cancel(notice.attempt_job_id)
        self.book.finish(record, JobState.CANCELLED, "cancelled by the requester")
        return b""

    # ---- the driver ----

    async def drive(self, aid: bytes) -> None:
        for _ in range(driver_passes_max):
            record = self.book[aid]
            if record.state.terminal:
                return
            if record.state is JobState.AWARDED:
                await self.await_open(record)
            elif record.state is JobState.LOCKED:
                await self.run_job(record)
            elif record.state is JobState.RUNNING:
                await self.resume_running(record)
            elif record.state is JobState.SETTLING:
                await self.exchange.settle(record)
        raise AssertionError(f"a provider driver made no progress in {driver_passes_max} passes")

    def ensure_allocation(self, record: JobRecord) -> None:
        allocator = self.side.allocator
        if allocator.allocation(exec_id(record.attempt_job_id)) is not None:
            return
        req = record.request.requirements
        try:
            allocator.allocate(
                exec_id(record.attempt_job_id), req.gpus, min_vram_bytes=req.min_vram_bytes
            )
        except NoCapacityError as exc:
            raise MarketError(f"slots lost across a restart: {exc}") from exc

    async def await_open(self, record: JobRecord) -> None:
        ctx = self.ctx
        self.ensure_allocation(record)
        awarded_ms = next((s.at_ms for s in record.stamps if s.state is JobState.AWARDED), 0)
        give_up_ms = awarded_ms + ctx.config.award_open_timeout_ms
        while ctx.config.wait_for_open:
            trade = ctx.chain.trade(record.attempt_job_id)
            step = open_step(
                trade.status if trade is not None else None,
                trade is not None and trade.terms == record.terms,
                ctx.clock_ms(),
                give_up_ms,
            )
            if step is OpenStep.START:
                break
            if step is OpenStep.CLOSED:
                assert trade is not None
                status = trade.status.name.lower()
                self.book.finish(record, JobState.CANCELLED, f"trade is {status}")
                return
            if step is OpenStep.GIVE_UP:
                self.book.finish(record, JobState.FAILED, "the trade never opened on chain")
                return
            await ctx.wait_block()
        self.book.update(record, state=JobState.LOCKED)

    async def resume_running(self, record: JobRecord) -> None:
        """A job that was running when this node stopped: re-run it if the deadline allows."""
        assert record.terms is not None
        now = self.ctx.clock_ms()
        if not can_rerun(now, record.request.max_wall_ms, record.terms.deadline_ms):
            self.book.finish(record, JobState.FAILED, "interrupted by a restart; no time to re-run")
            return
        # Stamp the second start explicitly: the state itself stays RUNNING.
        record = self.book.update(record, stamps=(*record.stamps, Stamp(JobState.RUNNING, now)))
        executor = self.side.executor
        job_dir = executor.job_dir(exec_id(record.attempt_job_id))
        if job_dir.exists():
            await trio.to_thread.run_sync(executor.remove_job_dir, exec_id(record.attempt_job_id))
        await self.run_job(record)

    async def fetch_spec(self, record: JobRecord) -> JobSpec:
        manifest = self.ctx.store.manifest(record.job_id)
        if manifest is None or ledger.hash_of(manifest) != record.request.manifest_digest:
            raise MarketError("the job's manifest is missing from the job store")
        check_manifest(manifest, self.ctx.config.inputs_bytes_max)
        try:
            inputs = await fetch_inputs(
                self.ctx, record.counterparty_peer_id, record.job_id, manifest
            )
        except Mismatch as exc:
            raise MarketError(f"bad input from the requester: {exc}") from exc
        req = record.request.requirements
        try:
            # The requester's stated memory/disk (0: this node's default), within its maxima.
            limits = self.side.offer_config.job_limits(
                record.request.max_wall_ms, req.memory_bytes, req.disk_bytes
            )
            # As much output as the requester said it takes (its deadline allows for that),
            # within the job directory's disk cap, where the outputs are written.
            declared = max(record.request.outputs_bytes_max, 1)
            limits = dataclasses.replace(limits, output_bytes_max=min(limits.disk_bytes, declared))
        except ComputeError as exc:
            raise MarketError(f"the job's limits are not acceptable here: {exc}") from exc
        # The inputs are this node's to hold (it checked its disk for them before the award):
        # they do not count against the disk the job itself may write.
        inputs_bytes = sum(ref.size_bytes for ref in manifest.inputs)
        disk_bytes = limits.disk_bytes + inputs_bytes
        # One file may fill the job's whole disk: RLIMIT_FSIZE follows the disk cap (the
        # sandbox's default of 1 GiB would refuse a 1 GiB output long before the market's caps).
        limits = dataclasses.replace(limits, disk_bytes=disk_bytes, file_size_bytes=disk_bytes)
        image = ""
        if manifest.image is not None:  # from this node's image cache, or over the mesh
            image = await self.images.ensure(
                record.counterparty_peer_id, record.job_id, manifest.image
            )
        return JobSpec(
            argv=manifest.argv,
            input_files=tuple((name, str(path)) for name, path in inputs),
            env=manifest.env,
            limits=limits,
            image=image,
        )

    async def run_job(self, record: JobRecord) -> None:
        executor = self.side.executor
        self.ensure_allocation(record)
        terms = record.terms
        assert terms is not None, "a provider job has its terms"
        # Start only a run that can end before the deadline: one that cannot is given up now
        # (our own Cancel, no slash) rather than refunded and slashed later. Fetching the
        # inputs (with its retries) may use the slack, not the run's time.
        max_wall_ms = record.request.max_wall_ms
        budget_ms = terms.deadline_ms - self.ctx.clock_ms() - max_wall_ms
        if budget_ms <= 0:
            raise MarketError("no time left to run the job before its deadline")
        with trio.move_on_after(budget_ms / 1000) as fetching:
            spec = await self.fetch_spec(record)
        if fetching.cancelled_caught or self.ctx.clock_ms() + max_wall_ms >= terms.deadline_ms:
            raise MarketError("the inputs came too late to run the job before its deadline")
        if record.state is not JobState.RUNNING:
            record = self.book.update(record, state=JobState.RUNNING)
        self.ctx.start_soon(lambda: self.notify_running(record))
        aid = record.attempt_job_id
        allocation = self.side.allocator.allocation(exec_id(aid))
        result = None
        scope = trio.CancelScope()
        self.runs[aid] = scope
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.watch_cancel_on_chain, aid, scope)
                    try:
                        result = await executor.run(exec_id(aid), spec, allocation)
                    except ComputeError as exc:
                        raise MarketError(f"the sandbox could not run the job: {exc}") from exc
                    nursery.cancel_scope.cancel()
        finally:
            del self.runs[aid]
            self._release(record)
        if result is None:
            trade = self.ctx.chain.trade(aid)
            status = trade.status.name.lower() if trade is not None else "gone"
            self.book.finish(record, JobState.CANCELLED, f"killed: the trade is {status}")
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
        self.book.update(record, state=JobState.SETTLING, result=run_result)

    async def notify_running(self, record: JobRecord) -> None:
        try:
            await self.ctx.request(
                record.counterparty_peer_id, PROTOCOL_STATUS, record.attempt_job_id
            )
        except NetError as exc:
            log.debug("running notice not delivered: %s", exc)
        except Exception:
            self.ctx.counters["handler_faults"] += 1
            log.exception("the running notice of %s broke", record.attempt_job_id.hex()[:16])

    async def watch_cancel_on_chain(self, aid: bytes, scope: trio.CancelScope) -> None:
        while True:
            await self.ctx.wait_block()
            trade = self.ctx.chain.trade(aid)
            if trade is None or trade.status is not TradeStatus.OPEN:
                scope.cancel()
                return
