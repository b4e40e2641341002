"""The output and settle flow, both sides: how a provider's result becomes a payment and the
requester's verified outputs.

Provider (``ProviderExchange``): serves the job's output list and chunks to the requester that
awarded it, builds the ``Receipt`` and settles the trade. Requester (``RequesterExchange``):
once the trade settles, fetches the outputs, checks them against the receipt's digest and
stores them. Each cheatable step is its own method, so a simulated cheater overrides one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

import ledger
from compute import outputs_digest
from compute.market._protocol import SettleStep, settle_step
from compute.market._transfers import (
    fetch_attempts_max,
    fetch_output_files,
    fetch_retry_s,
    read_chunk,
)
from compute.market._wire import PROTOCOL_OUTPUTS, Mismatch, decode
from compute.market.exceptions import ChainRejected, MarketError, NetError
from compute.market.types import (
    BlobRequest,
    JobState,
    LogsInfo,
    OutputsInfo,
    RunResult,
    log_bytes_max,
)
from compute.types import JobId as ExecJobId
from ledger import Receipt

if TYPE_CHECKING:
    from compute import Executor
    from compute.market._context import Context, JobBook
    from compute.market.types import JobRecord

log = logging.getLogger("gpumesh.compute.market")


def exec_id(attempt_id: bytes) -> ExecJobId:
    """The executor's name for an attempt (64 hex chars fit its job-id pattern)."""
    return ExecJobId(attempt_id.hex())


class ProviderExchange:
    """The provider's half: serve the outputs, claim the payment."""

    def __init__(self, ctx: Context, book: JobBook, executor: Executor) -> None:
        self.ctx = ctx
        self.book = book
        self.executor = executor

    def job_for_peer(self, aid: bytes, peer_id: str) -> JobRecord:
        record = self.book.get(aid)
        if record is None or record.counterparty_peer_id != peer_id:
            raise NetError("no such job of yours here")
        return record

    async def on_outputs(self, peer_id: str, data: bytes) -> bytes:
        record = self.job_for_peer(data, peer_id)
        if record.result is None:
            raise NetError(f"the job is {record.state.label}; no outputs yet")
        result = record.result
        return ledger.encode(OutputsInfo(result.files, result.stdout, result.stderr))

    async def on_output(self, peer_id: str, data: bytes) -> bytes:
        ask = decode(BlobRequest, data)
        record = self.job_for_peer(ask.job_id, peer_id)
        files = record.result.files if record.result is not None else ()
        match = [f for f in files if f.sha256 == ask.sha256]
        if not match:
            raise NetError("not an output of this job")
        path = self.executor.job_dir(exec_id(ask.job_id)) / "work" / "out" / match[0].path
        return await read_chunk(path, ask.offset)

    async def on_logs(self, peer_id: str, data: bytes) -> bytes:
        record = self.job_for_peer(data, peer_id)
        result = record.result
        # The executor hands over stdout/stderr when the job ends; until then, state only.
        if result is None:
            return ledger.encode(LogsInfo(record.state.label, b"", b""))
        return ledger.encode(LogsInfo(record.state.label, result.stdout, result.stderr))

    def build_receipt(self, record: JobRecord, nonce: int) -> ledger.Transaction:
        result = record.result
        assert result is not None
        tx = Receipt(
            nonce=nonce,
            fee=self.ctx.fee(),
            job_id=ledger.JobId(record.attempt_job_id),
            output_digest=result.outputs_digest,
            wall_ms=result.wall_ms,
            exit_status=result.exit_status,
        )
        return self.ctx.sign(tx)

    async def settle(self, record: JobRecord) -> None:
        """SETTLING: submit the receipt (or see what closed the trade) and end the job."""
        assert record.result is not None, "a settling provider job has its result"
        aid = record.attempt_job_id
        trade = self.ctx.chain.trade(aid)
        if trade is None:
            raise MarketError("the trade vanished from the chain")
        if settle_step(trade.status) is SettleStep.SUBMIT_RECEIPT:

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
    """The requester's half: once paid, fetch and check the outputs."""

    def __init__(self, ctx: Context, book: JobBook) -> None:
        self.ctx = ctx
        self.book = book

    async def collect(self, record: JobRecord) -> None:
        """SETTLING: fetch the outputs, check them against the receipt, mark the job DONE
        (or OUTPUT_MISMATCH, or FAILED when they stay unavailable)."""
        receipt = record.receipt or self.ctx.chain.receipt(record.attempt_job_id)
        if receipt is None:
            raise MarketError("the trade settled but its receipt is not readable")
        peer = record.counterparty_peer_id
        last_error = ""
        for _ in range(fetch_attempts_max):
            try:
                data = await self.ctx.request(peer, PROTOCOL_OUTPUTS, record.attempt_job_id)
                info = decode(OutputsInfo, data, 4 * log_bytes_max)
                blobs = await fetch_output_files(
                    self.ctx, peer, record.attempt_job_id, info, self.ctx.config.outputs_bytes_max
                )
            except NetError as exc:
                last_error = str(exc)
                await trio.sleep(fetch_retry_s)
                continue
            except Mismatch as exc:
                self.mismatch(record, str(exc))
                return
            if outputs_digest(info.files) != receipt.output_digest:
                self.mismatch(record, "the output list does not hash to the receipt's digest")
                return
            self.ctx.store.put_blobs(blobs)
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
            self.book.update(record, state=JobState.DONE, outputs=info.files, result=result)
            return
        self.book.finish(
            record, JobState.FAILED, f"settled, but the outputs are unavailable: {last_error}"
        )

    def mismatch(self, record: JobRecord, why: str) -> None:
        record = self.book.update(record, state=JobState.OUTPUT_MISMATCH, error=why)
        log.warning("job %s: provider outputs rejected: %s", record.job_id.hex()[:16], why)
