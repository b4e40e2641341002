"""The output and settle flow, both sides: a fair exchange of a job's outputs for its payment.

Provider (``ProviderExchange``): once the job ran, it seals the output bundle (a header with
the output list and the logs, then every file's bytes; ``_bundle``) under a key only it knows,
streaming from the job's output files into a sealed directory beside them, signs a ``Delivery``
committing to the sealed and the plain roots, tells the requester (``PROTOCOL_DELIVERED``) and
serves the delivery and ranges of the ciphertext read from disk (``PROTOCOL_SEALED``,
``PROTOCOL_SEALED_CHUNKS``). It never serves plaintext outputs. When the requester's signed
``DeliveryAck`` arrives (``PROTOCOL_DELIVERY_ACK``) it settles with a ``Receipt`` carrying the
ack and the key; with no ack before the deadline it gives the trade up (a provider ``Cancel``:
full refund, counted as a failure, not slashed).

Requester (``RequesterExchange``): fetches the delivery and the ciphertext while the trade is
open, ``fetch_window`` ranges in flight, into a partial file on disk that survives a dropped
connection or a restart of either side (only the missing ranges are fetched again), checks it
against the delivery's roots (``_bundle.check_sealed_dir``), and only then signs the ack. The key
arrives with the settling receipt; it opens the bundle straight into the job's outputs directory,
checking every chunk against its committed plaintext hash. A chunk that does not open is
evidence: it submits a ``SlashBadKey`` (chunk and proof read from disk). So the requester holds
no output before the payment is irrevocable, and the provider is paid only once the requester
could fetch outputs matching the committed root.

Each cheatable step is its own method, so a simulated cheater overrides one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import trio

import ledger
from compute import JobOutcome, outputs_digest
from compute.market import _bundle
from compute.market._bundle import DiskFull, PartialFetch, SealedMeta
from compute.market._protocol import SettleStep, settle_step
from compute.market._wire import (
    PROTOCOL_DELIVERED,
    PROTOCOL_DELIVERY_ACK,
    PROTOCOL_SEALED,
    PROTOCOL_SEALED_CHUNKS,
    Mismatch,
    decode,
)
from compute.market.exceptions import ChainRejected, MarketError, NetError
from compute.market.types import (
    JobState,
    OutputsInfo,
    RunResult,
    chunk_bytes_max,
    log_bytes_max,
    message_bytes_max,
    outputs_inline_bytes_max,
    text_chars_max,
)
from compute.types import JobId as ExecJobId
from ledger import Cancel, Delivery, DeliveryAck, Receipt, SlashBadKey

if TYPE_CHECKING:
    from collections.abc import Callable

    from compute import Executor
    from compute.market._context import Context, JobBook
    from compute.market.types import JobRecord

log = logging.getLogger("gpumesh.compute.market")

STOPPED_OUTCOMES = frozenset(o.value for o in JobOutcome) - {
    JobOutcome.SUCCEEDED.value,
    JobOutcome.EXIT_NONZERO.value,
}
"""What a bundle's header may say of a run the provider's sandbox stopped at a limit."""

sealed_chunks_per_request = _bundle.range_chunks
"""Ciphertext chunks per ``PROTOCOL_SEALED_CHUNKS`` answer (1 MiB of plaintext: ~1.05 MiB
with the tags and plaintext hashes)."""
fetch_window = 4
"""Range requests a requester keeps in flight to one provider (the provider takes up to
``inbound_streams_per_peer_max`` streams from one peer)."""
sync_ranges = 64
"""A requester syncs its partial file and records the ranges it has every this many ranges."""
ack_margin_ms_min = 1_000
"""A provider stops waiting for the ack a quarter of the attempt's slack (at least this) before
the deadline and gives the trade up, so its Cancel still commits in time (past the deadline a
Refund would slash it)."""
fetch_attempts_max = 5
"""Fetch attempts in a row that get nothing new before a settled job's outputs count as
unavailable (one that makes progress starts the count again)."""
fetch_retry_s = 0.5
delivery_poll_blocks = 2
"""While a trade is open the requester asks for the delivery on a provider's notice, or
every this many blocks (a notice can be lost, or sent before a restart)."""
sealed_cached_max = 1024
"""Sealed bundles a provider (fetched ones a requester) remembers (their roots and where
they lie on disk, not their bytes); a forgotten one is read again from disk (or re-sealed from
the job directory to the same bytes)."""
sweep_entries_max = 100_000
"""Attempt folders one sweep of the requester's outputs directory looks at."""
_KEY_TAG = "gpumesh/output-key/1"


def exec_id(attempt_id: bytes) -> ExecJobId:
    """The executor's name for an attempt (64 hex chars fit its job-id pattern)."""
    return ExecJobId(attempt_id.hex())


@dataclasses.dataclass(frozen=True, slots=True)
class SealedRange:
    """Sealed chunks ``first ..`` (up to ``sealed_chunks_per_request``) and their plaintext
    hashes, each laid end to end, with the Merkle proofs of the range's two subtree roots
    (``_bundle.check_range``: the requester checks every range as it arrives)."""

    first: int
    output_proof: tuple[bytes, ...]
    plain_proof: tuple[bytes, ...]
    plain_hashes: bytes
    chunks: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class SealedOffer:
    """The provider's answer to ``PROTOCOL_SEALED``: its signed delivery and the first range
    of chunks (all of them, for a bundle under 1 MiB: one round trip)."""

    delivery: Delivery
    first: SealedRange


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkRange:
    """Ask for the range of sealed chunks that starts at ``first`` of an attempt's bundle."""

    job_id: bytes
    first: int


@dataclasses.dataclass(frozen=True, slots=True)
class Sealed:
    """A provider's sealed bundle of one attempt, on disk in ``directory`` (kept there; the
    same bytes after a re-seal: the key is derived from the provider's key and the attempt)."""

    key: bytes
    directory: Path
    output_bytes: int
    delivery: Delivery


@dataclasses.dataclass(frozen=True, slots=True)
class Fetched:
    """What a requester fetched of one attempt: the delivery, and its checked ciphertext on
    disk in ``directory`` (``_bundle``'s layout)."""

    delivery: Delivery
    directory: Path
    output_bytes: int


def bundle_bytes_max(outputs_bytes_max: int) -> int:
    """Largest sealed bundle a requester fetches: its outputs cap plus the bundle header."""
    return _bundle.bundle_bytes_max(outputs_bytes_max)


def _bump(counters: dict[str, int], name: str, by: int = 1) -> None:
    counters[name] = counters.get(name, 0) + by


class ProviderExchange:
    """The provider's half: seal and serve the outputs, settle on the requester's ack."""

    def __init__(self, ctx: Context, book: JobBook, executor: Executor) -> None:
        self.ctx = ctx
        self.book = book
        self.executor = executor
        self.sealed: OrderedDict[bytes, Sealed] = OrderedDict()
        self._sealing: dict[bytes, trio.Lock] = {}
        self.acks: dict[bytes, DeliveryAck] = {}
        self._acked: dict[bytes, trio.Event] = {}

    def job_for_peer(self, aid: bytes, peer_id: str) -> JobRecord:
        record = self.book.get(aid)
        if record is None or record.counterparty_peer_id != peer_id:
            raise NetError("no such job of yours here")
        return record

    def output_key(self, aid: bytes) -> bytes:
        """The attempt's sealing key: secret (derived from a signature only this provider can
        make and never sends) and the same after a restart."""
        return hashlib.sha256(self.ctx.key.sign(self.ctx.chain_id, _KEY_TAG, aid)).digest()

    def sealed_dir(self, aid: bytes) -> Path:
        """Where an attempt's sealed bundle lies: beside its work directory, so it goes with
        the job directory (``[compute] job_dir_retention_s``)."""
        return self.executor.job_dir(exec_id(aid)) / "sealed"

    def seal_outputs(self, record: JobRecord, key: bytes) -> SealedMeta:
        """Seal the attempt's outputs to disk, or find them sealed (blocking)."""
        result = record.result
        assert result is not None, "only a job with a result has outputs"
        aid = record.attempt_job_id
        out = self.executor.job_dir(exec_id(aid)) / "work" / "out"
        info = OutputsInfo(
            result.files,
            result.stdout,
            result.stderr,
            result.outcome,
            result.reason[:text_chars_max],
        )
        return _bundle.seal_outputs(aid, key, info, out, self.sealed_dir(aid))

    async def seal(self, record: JobRecord) -> Sealed:
        aid = record.attempt_job_id
        lock = self._sealing.setdefault(aid, trio.Lock())
        async with lock:  # one sealing of an attempt at a time, however many ask
            found = self.sealed.get(aid)
            if found is not None:
                self.sealed.move_to_end(aid)
                return found
            key = self.output_key(aid)
            try:
                meta = await trio.to_thread.run_sync(self.seal_outputs, record, key)
            except OSError as exc:
                raise MarketError(f"the outputs are unreadable: {exc}") from exc
            delivery = self.make_delivery(
                record, meta.output_root, meta.plain_root, meta.output_bytes
            )
            sealed = Sealed(key, self.sealed_dir(aid), meta.output_bytes, delivery)
            self.sealed[aid] = sealed
            while len(self.sealed) > sealed_cached_max:
                self.sealed.popitem(last=False)
            return sealed

    def make_delivery(
        self, record: JobRecord, output_root: bytes, plain_root: bytes, size: int
    ) -> Delivery:
        result = record.result
        assert result is not None
        return self.ctx.sign(
            Delivery(
                job_id=ledger.JobId(record.attempt_job_id),
                output_root=output_root,
                plain_root=plain_root,
                output_bytes=size,
                wall_ms=result.wall_ms,
                exit_status=result.exit_status,
            )
        )

    async def on_sealed(self, peer_id: str, data: bytes) -> bytes:
        record = self.job_for_peer(data, peer_id)
        if record.result is None:
            raise NetError(f"the job is {record.state.label}; no outputs yet")
        sealed = await self.seal(record)
        return ledger.encode(SealedOffer(sealed.delivery, await self.chunk_range(sealed, 0)))

    async def chunk_range(self, sealed: Sealed, first: int) -> SealedRange:
        count = ledger.chunk_count(sealed.output_bytes)
        if not 0 <= first < count or first % sealed_chunks_per_request:
            raise NetError(f"no range of sealed chunks starts at {first}")
        try:
            return await trio.to_thread.run_sync(self.read_range, sealed, first)
        except (OSError, MarketError) as exc:
            self.sealed.pop(sealed.delivery.job_id, None)  # sealed again on the next ask
            raise NetError(f"the sealed outputs are unreadable: {exc}") from exc

    def read_range(self, sealed: Sealed, first: int) -> SealedRange:
        """A range and its proofs, from disk (blocking)."""
        directory, size = sealed.directory, sealed.output_bytes
        chunks, hashes = _bundle.read_range(directory, size, first, sealed_chunks_per_request)
        output_proof, plain_proof = _bundle.range_proofs(directory, size, first)
        return SealedRange(first, output_proof, plain_proof, hashes, chunks)

    async def on_sealed_chunks(self, peer_id: str, data: bytes) -> bytes:
        ask = decode(ChunkRange, data)
        record = self.job_for_peer(ask.job_id, peer_id)
        if record.result is None:
            raise NetError("no outputs yet")
        return ledger.encode(await self.chunk_range(await self.seal(record), ask.first))

    async def on_ack(self, peer_id: str, data: bytes) -> bytes:
        try:
            ack = ledger.decode(DeliveryAck, data, max_bytes=message_bytes_max)
            ack.validate(self.ctx.chain_id)
        except (ledger.DecodeError, ledger.InvalidTransaction) as exc:
            raise NetError(f"bad delivery ack: {exc}") from exc
        aid = ack.delivery.job_id
        record = self.job_for_peer(aid, peer_id)
        sealed = self.sealed.get(aid) if record.result is None else await self.seal(record)
        if sealed is None or ack.delivery != sealed.delivery:
            raise NetError("the ack is not for this job's delivery")
        if ack.signer != record.counterparty:
            raise NetError("the ack is not the requester's")
        self.acks[aid] = ack
        self._acked.setdefault(aid, trio.Event()).set()
        return b""

    async def notify_delivered(self, record: JobRecord) -> None:
        try:
            await self.ctx.request(
                record.counterparty_peer_id, PROTOCOL_DELIVERED, record.attempt_job_id
            )
        except NetError as exc:
            log.debug("delivery notice not delivered (the requester polls): %s", exc)

    def build_receipt(self, record: JobRecord, nonce: int) -> ledger.Transaction:
        aid = record.attempt_job_id
        tx = Receipt(
            nonce=nonce,
            fee=self.ctx.fee(),
            job_id=ledger.JobId(aid),
            ack=self.acks[aid],
            key=self.output_key(aid),
        )
        return self.ctx.sign(tx)

    async def wait_ack(self, record: JobRecord) -> DeliveryAck | None:
        """The requester's ack, or None when the trade closed or the deadline draws near."""
        terms = record.terms
        assert terms is not None, "a settling job has terms"
        aid = record.attempt_job_id
        event = self._acked.setdefault(aid, trio.Event())
        while aid not in self.acks:
            trade = self.ctx.chain.trade(aid)
            if trade is None or trade.status is not ledger.TradeStatus.OPEN:
                return None
            margin_ms = max(ack_margin_ms_min, self.ctx.config.attempt_slack_ms // 4)
            if self.ctx.clock_ms() >= terms.deadline_ms - margin_ms:
                return None
            with trio.move_on_after(0.2):
                await event.wait()
        return self.acks[aid]

    async def give_up(self, record: JobRecord) -> None:
        """No ack in time: release the trade before the deadline (not slashed)."""
        aid = record.attempt_job_id

        def build(nonce: int) -> ledger.Transaction:
            return self.ctx.sign(Cancel(nonce=nonce, fee=self.ctx.fee(), job_id=ledger.JobId(aid)))

        try:
            await self.ctx.submit_and_commit(build, lambda _: None)
        except ChainRejected as exc:
            log.info("cancel of unacknowledged %s rejected: %s", aid.hex()[:16], exc)

    async def settle(self, record: JobRecord) -> None:
        """SETTLING: deliver, wait for the ack, submit the receipt (or see what closed the
        trade) and end the job."""
        try:
            await self._settle(record)
        finally:
            if self.book[record.attempt_job_id].state.terminal:
                self.forget(record.attempt_job_id)

    def forget(self, aid: bytes) -> None:
        """Drop what was kept in memory for an attempt that ended (its sealed bundle stays on
        disk with the job directory: the requester may still fetch it after the receipt)."""
        self.sealed.pop(aid, None)
        self._sealing.pop(aid, None)
        self.acks.pop(aid, None)
        self._acked.pop(aid, None)

    async def _settle(self, record: JobRecord) -> None:
        assert record.result is not None, "a settling provider job has its result"
        aid = record.attempt_job_id
        trade = self.ctx.chain.trade(aid)
        if trade is None:
            raise MarketError("the trade vanished from the chain")
        if settle_step(trade.status) is SettleStep.SUBMIT_RECEIPT:
            await self.seal(record)
            self.ctx.start_soon(lambda: self.notify_delivered(record))
            ack = await self.wait_ack(record)
            trade = self.ctx.chain.trade(aid)
            assert trade is not None
            if ack is None and trade.status is ledger.TradeStatus.OPEN:
                await self.give_up(record)
                trade = self.ctx.chain.trade(aid)
                assert trade is not None
                if trade.status is ledger.TradeStatus.CANCELLED:
                    self.book.finish(
                        record, JobState.FAILED, "the requester never acknowledged the outputs"
                    )
                    return
            elif ack is not None:

                def submitted(txh: bytes) -> None:
                    self.book.update(record, receipt_tx=txh)

                try:
                    ok, error = await self.ctx.submit_and_commit(
                        lambda nonce: self.build_receipt(record, nonce), submitted
                    )
                except ChainRejected as exc:
                    ok, error = False, str(exc)
                trade = self.ctx.chain.trade(aid)
                assert trade is not None
                if not ok and trade.status is ledger.TradeStatus.OPEN:
                    # Give the trade up while it is still open: left open, a Refund past the
                    # deadline would slash this provider.
                    await self.give_up(record)
                    self.book.finish(record, JobState.FAILED, f"the receipt was rejected: {error}")
                    return
        step = settle_step(trade.status)
        if step is SettleStep.DONE:
            self.book.update(
                record, state=JobState.DONE, cost=trade.paid, receipt_tx=trade.receipt_tx
            )
        elif step is SettleStep.CANCELLED:
            self.book.finish(record, JobState.CANCELLED, "the requester cancelled")
        elif step is SettleStep.REFUNDED:
            self.book.finish(record, JobState.REFUNDED, "the trade was refunded")
        else:
            raise MarketError("the trade is still open after the receipt")


class RequesterExchange:
    """The requester's half: fetch and check the sealed outputs, ack, open once paid."""

    def __init__(self, ctx: Context, book: JobBook) -> None:
        self.ctx = ctx
        self.book = book
        self.fetched: OrderedDict[bytes, Fetched] = OrderedDict()
        self.acked: set[bytes] = set()
        self.refused: dict[bytes, str] = {}
        """Attempts whose delivery did not match its roots: never acked, never paid."""
        self._notices: dict[bytes, trio.Event] = {}
        self._polls: dict[bytes, int] = {}
        self.ack_gate: Callable[[JobRecord, Delivery], bool] | None = None
        """Set by the requester side for verified jobs (see ``may_ack``)."""
        self.sweep()

    def sweep(self) -> int:
        """Delete what no job needs under the outputs directory (at start and after each
        collect): the folder of an attempt that is not its job's current one or whose job
        ended other than DONE (a partial fetch of a refused, cancelled, refunded or retried
        attempt), and the ciphertext of an opened one. A DONE job's opened files stay (the
        user copies them out with ``job outputs``). How many folders went."""
        return sweep_outputs(outputs_root(self.ctx), self.keep())

    def keep(self) -> dict[str, JobRecord]:
        """The attempts whose folders a sweep keeps, by folder name (read on the trio thread)."""
        return {
            record.attempt_job_id.hex(): record
            for record in self.book.records()
            if not record.state.terminal or record.state is JobState.DONE
        }

    async def on_delivered(self, peer_id: str, data: bytes) -> bytes:
        for record in self.book.records():
            if record.attempt_job_id == data and record.counterparty_peer_id == peer_id:
                self._notices.setdefault(data, trio.Event()).set()
                self.acked.discard(data)  # a restarted provider lost our ack: send it again
        return b""

    def fetch_dir(self, aid: bytes) -> Path:
        """Where an attempt's sealed outputs are fetched to (``_bundle.PartialFetch``)."""
        return outputs_root(self.ctx) / aid.hex() / "sealed"

    def output_dir(self, aid: bytes) -> Path:
        """Where an attempt's opened output files lie, once its outputs were paid and opened."""
        return outputs_root(self.ctx) / aid.hex() / "out"

    async def fetch_sealed(
        self,
        record: JobRecord,
        output_root: bytes | None = None,
        plain_root: bytes | None = None,
        output_bytes: int | None = None,
    ) -> Fetched:
        """The provider's delivery and every sealed chunk, on disk, checked against the
        delivery's roots (or the settled trade's, when given). Resumes a partial fetch of the
        same roots. ``NetError`` when the provider cannot be reached (what came is kept),
        ``Mismatch`` when what it serves does not match, ``DiskFull`` when it does not fit."""
        peer, aid = record.counterparty_peer_id, record.attempt_job_id
        data = await self.ctx.request(peer, PROTOCOL_SEALED, aid)
        offer = decode(SealedOffer, data, 2 * chunk_bytes_max)
        delivery = offer.delivery
        try:
            delivery.validate(self.ctx.chain_id)
        except ledger.InvalidTransaction as exc:
            raise Mismatch(f"the delivery is invalid: {exc}") from exc
        if delivery.job_id != aid or delivery.signer != record.counterparty:
            raise Mismatch("the delivery is not the provider's for this job")
        size = delivery.output_bytes if output_bytes is None else output_bytes
        cap = min(self.ctx.config.outputs_bytes_max, record.request.outputs_bytes_max)
        if size > bundle_bytes_max(cap):
            raise Mismatch(f"the outputs ({size} bytes) exceed the job's cap of {cap} bytes")
        meta = SealedMeta(
            delivery.output_root if output_root is None else output_root,
            delivery.plain_root if plain_root is None else plain_root,
            size,
        )
        directory = self.fetch_dir(aid)
        partial = await trio.to_thread.run_sync(PartialFetch, directory, meta)
        try:
            if not partial.checked:
                await self.fill(record, partial, offer.first)
                await self.check_fetched(partial)
        finally:
            partial.close()
        return Fetched(delivery, directory, size)

    async def fill(self, record: JobRecord, partial: PartialFetch, first: SealedRange) -> None:
        """Fetch every range ``partial`` lacks, ``fetch_window`` at a time; what arrived is
        synced to disk even when the connection drops."""
        peer, aid = record.counterparty_peer_id, record.attempt_job_id
        counters = self.ctx.counters
        if partial.resumed:
            _bump(counters, "outputs_fetches_resumed")
            _bump(counters, "outputs_ranges_resumed", partial.resumed)
            log.info(
                "outputs of %s: resuming with %d of %d ranges on disk",
                aid.hex()[:16],
                partial.resumed,
                partial.ranges,
            )
        size = partial.meta.output_bytes
        missing = partial.missing()
        if missing and missing[0] == 0:
            await self.accept(partial, first, 0)  # it came with the offer
            _bump(counters, "outputs_ranges_fetched")
            missing.pop(0)
        errors: list[NetError | Mismatch] = []

        async def worker(cancel: trio.CancelScope) -> None:
            while missing and not errors:
                start = missing.pop(0)
                try:
                    answer = await self.ctx.request(
                        peer, PROTOCOL_SEALED_CHUNKS, ledger.encode(ChunkRange(aid, start))
                    )
                    part = decode(SealedRange, answer, 2 * chunk_bytes_max)
                    await self.accept(partial, part, start)
                except (NetError, Mismatch) as exc:  # the first one ends the fetch
                    errors.append(exc)
                    cancel.cancel()
                    return
                _bump(counters, "outputs_ranges_fetched")
                if partial.unsynced >= sync_ranges and not syncing.locked():
                    async with syncing:
                        await trio.to_thread.run_sync(partial.sync)

        syncing = trio.Lock()  # one sync at a time; the other workers keep fetching
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(min(fetch_window, len(missing))):
                    nursery.start_soon(worker, nursery.cancel_scope)
        finally:
            with trio.CancelScope(shield=True):
                async with syncing:
                    await trio.to_thread.run_sync(partial.sync)
        if errors:
            raise errors[0]
        assert partial.complete() or size == 0, "a fetch ended with ranges missing"

    async def accept(self, partial: PartialFetch, part: SealedRange, start: int) -> None:
        """Write a served range once its shape and its bytes check: through its subtree
        roots and their proofs, against the delivery's roots (``Mismatch`` if not)."""
        count, nbytes = _bundle.range_bytes(partial.meta.output_bytes, start)
        if part.first != start or len(part.plain_hashes) != 32 * count:
            raise Mismatch(f"the provider served range {part.first}, not {start}, or short")
        if len(part.chunks) != nbytes:
            raise Mismatch(f"range {start} is {len(part.chunks)} bytes, not {nbytes}")
        if max(len(part.output_proof), len(part.plain_proof)) > ledger.proof_hashes_max:
            raise Mismatch(f"range {start} comes with an overlong proof")
        try:
            await trio.to_thread.run_sync(
                _bundle.check_range,
                partial.meta,
                start,
                part.chunks,
                part.plain_hashes,
                part.output_proof,
                part.plain_proof,
            )
        except ledger.OutputsError as exc:
            raise Mismatch(f"the sealed outputs do not match the delivery: {exc}") from exc
        partial.write(start, part.chunks, part.plain_hashes)

    async def check_fetched(self, partial: PartialFetch) -> None:
        """Every range was checked as it arrived; a bundle resumed from disk is checked whole
        once more (what an earlier run wrote), and if it does not match it is fetched again
        from scratch before it is held against the provider."""
        meta = partial.meta
        if not partial.resumed:
            partial.mark_checked()
            return
        try:
            await trio.to_thread.run_sync(
                _bundle.check_sealed_dir,
                partial.directory,
                meta.output_root,
                meta.plain_root,
                meta.output_bytes,
            )
        except ledger.OutputsError as exc:
            partial.close()
            await trio.to_thread.run_sync(_bundle.remove_dir, partial.directory)
            if partial.resumed:
                raise NetError(f"the resumed outputs do not check ({exc}); fetching again") from exc
            raise Mismatch(f"the sealed outputs do not match the delivery: {exc}") from exc
        partial.mark_checked()

    def may_ack(self, record: JobRecord, delivery: Delivery) -> bool:
        """Whether this checked delivery may be acked now (``--verify``: only once a majority
        of the job's replicas delivered the same plain root); ``ack_gate`` decides."""
        return self.ack_gate is None or self.ack_gate(record, delivery)

    def make_ack(self, delivery: Delivery) -> DeliveryAck:
        return self.ctx.sign(DeliveryAck(delivery=delivery))

    async def fetch_and_ack(self, record: JobRecord) -> None:
        """While the trade is open: once the provider delivered, fetch, check, ack."""
        aid = record.attempt_job_id
        if aid in self.refused:
            return
        fetched = self.fetched.get(aid)
        if fetched is None:
            try:
                fetched = await self.fetch_sealed(record)
            except DiskFull as exc:
                if record.error != str(exc):  # said once, tried again at every poll
                    self.book.update(record, error=str(exc))
                    log.warning("job %s: %s", record.job_id.hex()[:16], exc)
                return
            except Mismatch as exc:
                await trio.to_thread.run_sync(_bundle.remove_dir, self.fetch_dir(aid))
                self.refused[aid] = str(exc)
                self.book.update(record, error=str(exc))
                log.warning("job %s: delivery refused: %s", record.job_id.hex()[:16], exc)
                return
            except NetError as exc:
                log.debug("sealed outputs of %s not ready: %s", aid.hex()[:16], exc)
                return
            self.fetched[aid] = fetched
            while len(self.fetched) > sealed_cached_max:
                self.fetched.popitem(last=False)
        if not self.may_ack(record, fetched.delivery):
            return
        ack = self.make_ack(fetched.delivery)
        try:
            await self.ctx.request(
                record.counterparty_peer_id, PROTOCOL_DELIVERY_ACK, ledger.encode(ack)
            )
        except NetError as exc:
            log.info("ack of %s not delivered yet: %s", aid.hex()[:16], exc)
            return
        self.acked.add(aid)

    async def progress(self, record: JobRecord) -> None:
        """One pass of an open trade's watch: ack a delivery if one is due, then wait for the
        next block or the provider's delivery notice."""
        aid = record.attempt_job_id
        # A notice that came is consumed here, so the wait below always waits for a new one
        # (an event left set would make every pass return at once: a busy loop).
        old = self._notices.get(aid)
        was_noticed = old is not None and old.is_set()
        notice = old if old is not None and not was_noticed else trio.Event()
        self._notices[aid] = notice
        polls = self._polls.get(aid, 0) + 1
        self._polls[aid] = polls
        if record.state in (JobState.LOCKED, JobState.RUNNING) and aid not in self.acked:
            if was_noticed or polls % delivery_poll_blocks == 0:
                await self.fetch_and_ack(record)
        with trio.move_on_after(2.0):
            async with trio.open_nursery() as nursery:

                async def block() -> None:
                    await self.ctx.wait_block()
                    nursery.cancel_scope.cancel()

                async def noticed() -> None:
                    await notice.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(block)
                nursery.start_soon(noticed)

    def read_outputs(self, record: JobRecord) -> tuple[dict[str, bytes], Path]:
        """A done attempt's output files: their bytes when they add up to
        ``outputs_inline_bytes_max`` at most (else ``{}``), and the directory they lie in.
        (A job done before outputs went to disk has them in the job store.)"""
        directory = self.output_dir(record.attempt_job_id)
        total = sum(f.size_bytes for f in record.outputs)
        outputs: dict[str, bytes] = {}
        for file in record.outputs:
            if total > outputs_inline_bytes_max:
                break
            try:
                data = (directory / file.path).read_bytes()
            except FileNotFoundError:
                stored = self.ctx.store.blob(file.sha256)
                if stored is None:
                    raise MarketError(f"output {file.path!r} is missing from {directory}") from None
                data = stored
            outputs[file.path] = data
        return outputs, directory

    def cancel_reason(self, record: JobRecord) -> str:
        """Why the provider gave the attempt up, as this side saw it."""
        refused = self.refused.get(record.attempt_job_id)
        return "gave the job up" if refused is None else f"delivered bad outputs ({refused})"

    async def collect(self, record: JobRecord) -> None:
        """SETTLING: open the outputs with the key the receipt revealed, check them, mark the
        job DONE (OUTPUT_MISMATCH, with slash evidence, when the key does not open them; FAILED
        when they stay unavailable)."""
        aid = record.attempt_job_id
        trade = self.ctx.chain.trade(aid)
        receipt = record.receipt or self.ctx.chain.receipt(aid)
        if trade is None or receipt is None or not trade.key:
            raise MarketError("the trade settled but its receipt is not readable")
        fetched = self.fetched.pop(aid, None)
        for table in (self._notices, self._polls):
            table.pop(aid, None)
        self.acked.discard(aid)
        last_error = ""
        fruitless = 0
        while fruitless < fetch_attempts_max:
            if fetched is not None and fetched.delivery.output_root == trade.output_root:
                break
            before = self.ctx.counters.get("outputs_ranges_fetched", 0)
            try:
                fetched = await self.fetch_sealed(
                    record, trade.output_root, trade.plain_root, trade.output_bytes
                )
            except (NetError, DiskFull) as exc:
                last_error = str(exc)
                progressed = self.ctx.counters.get("outputs_ranges_fetched", 0) > before
                fruitless = 0 if progressed else fruitless + 1
                await trio.sleep(fetch_retry_s * (1 + fruitless))
                continue
            except Mismatch as exc:
                self.mismatch(record, str(exc))
                return
        if fetched is None or fetched.delivery.output_root != trade.output_root:
            self.book.finish(
                record, JobState.FAILED, f"settled, but the outputs are unavailable: {last_error}"
            )
            return
        dest = self.output_dir(aid)
        try:
            opened = await trio.to_thread.run_sync(
                _bundle.open_sealed_dir, aid, trade.key, fetched.directory, trade.output_bytes, dest
            )
        except OSError as exc:
            # Our disk, not the provider: the job fails here, the ciphertext is kept.
            raise MarketError(f"the outputs could not be written to {dest}: {exc}") from exc
        if isinstance(opened, int):
            await self.slash_bad_key(record, fetched, opened)
            return
        if isinstance(opened, str):
            self.mismatch(record, f"the opened outputs are malformed: {opened}")
            return
        # The files are in place: the ciphertext is no longer needed.
        await trio.to_thread.run_sync(_bundle.remove_dir, fetched.directory)
        info = opened
        stopped = info.outcome in STOPPED_OUTCOMES
        ran = "succeeded" if receipt.exit_status == 0 else "failed"
        result = RunResult(
            outcome=info.outcome if stopped else ran,
            reason=info.reason[:text_chars_max],
            exit_status=receipt.exit_status,
            wall_ms=receipt.wall_ms,
            outputs_digest=outputs_digest(info.files),
            files=info.files,
            stdout=info.stdout[:log_bytes_max],
            stderr=info.stderr[:log_bytes_max],
        )
        # A run its provider stopped at a limit is still settled (the time was used), but the
        # job says why it delivered nothing.
        error = f"the provider stopped the job ({info.outcome}): {result.reason}" if stopped else ""
        self.book.update(
            record, state=JobState.DONE, outputs=info.files, result=result, error=error
        )
        await trio.to_thread.run_sync(sweep_outputs, outputs_root(self.ctx), self.keep())

    async def slash_bad_key(self, record: JobRecord, fetched: Fetched, index: int) -> None:
        """The revealed key fails chunk ``index``: submit the evidence (half the slash is
        ours), and mark the job. The ciphertext is deleted once the slash is decided."""
        aid = record.attempt_job_id
        chunk, plain_hash, proof = await trio.to_thread.run_sync(
            _bundle.evidence, fetched.directory, fetched.output_bytes, index
        )

        def build(nonce: int) -> ledger.Transaction:
            return self.ctx.sign(
                SlashBadKey(
                    nonce=nonce,
                    fee=self.ctx.fee(),
                    job_id=ledger.JobId(aid),
                    index=index,
                    chunk=chunk,
                    plain_hash=plain_hash,
                    proof=proof,
                )
            )

        try:
            ok, error = await self.ctx.submit_and_commit(build, lambda _: None)
        except ChainRejected as exc:
            ok, error = False, str(exc)
        await trio.to_thread.run_sync(_bundle.remove_dir, fetched.directory)
        outcome = "the provider was slashed" if ok else f"the slash failed: {error}"
        self.mismatch(record, f"the revealed key does not open output chunk {index}; {outcome}")

    def mismatch(self, record: JobRecord, why: str) -> None:
        record = self.book.update(record, state=JobState.OUTPUT_MISMATCH, error=why)
        log.warning("job %s: provider outputs rejected: %s", record.job_id.hex()[:16], why)


def sweep_outputs(root: Path, keep: dict[str, JobRecord]) -> int:
    """``RequesterExchange.sweep``'s file work (blocking): how many folders went."""
    removed = 0
    try:
        entries = list(root.iterdir())
    except FileNotFoundError:
        return 0
    for entry in entries[:sweep_entries_max]:
        kept = keep.get(entry.name)
        if kept is None:
            _bundle.remove_dir(entry)
            removed += 1
        elif kept.state is JobState.DONE and (entry / "out").is_dir():
            _bundle.remove_dir(entry / "sealed")
    return removed


def outputs_root(ctx: Context) -> Path:
    """A requester's outputs directory: one folder per attempt, ``<attempt id>/sealed`` while
    fetching (``_bundle.PartialFetch``), ``<attempt id>/out`` once opened. ``[market]
    outputs_dir``, by default beside the job store."""
    configured = ctx.config.outputs_dir
    return Path(configured) if configured else Path(ctx.store.path + "-blobs") / "outputs"
