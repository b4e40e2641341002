"""Moving a job's inputs to the provider (the outputs travel sealed: ``_exchange``).

Inputs are ``_blobs`` blobs: the provider fetches each one's chunk index (paged) and chunks
(a window in flight) from the requester's input store into its own, scoped to the job (a peer
can only read the inputs of a job awarded to it), every chunk checked as it arrives and the
fetch resumed from disk after a cut or a restart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

import ledger
from compute.market._blobs import (
    BlobChunkAsk,
    BlobError,
    BlobIndexAsk,
    BlobMismatch,
    BlobUnavailable,
)
from compute.market._wire import PROTOCOL_INPUT, PROTOCOL_INPUT_INDEX, Mismatch
from compute.market.exceptions import NetError
from compute.market.types import chunk_bytes_max

if TYPE_CHECKING:
    from pathlib import Path

    from compute.market._context import Context
    from compute.market.types import JobManifest


input_fetch_attempts_max = 64
"""Tries of one input request (backing off to 4 s): about 4 minutes, long enough for a
requester's daemon to restart; the attempt's deadline bounds the whole fetch anyway."""


async def fetch_inputs(
    ctx: Context, peer: str, job_id: bytes, manifest: JobManifest
) -> list[tuple[str, Path]]:
    """Every input of ``manifest`` from the requester into this node's input blob store
    (``_blobs``: the index first, checked against the root, then a window of chunks, each
    checked, resumed from what a cut or a restart left on disk): ``(name, path)`` each.
    ``Mismatch`` when the requester serves bytes that are not the ones it named; ``NetError``
    when its requests keep failing past the retries; ``BlobDiskFull`` when there is no room."""
    blobs = ctx.store.inputs
    need = sum(ref.size_bytes for ref in manifest.inputs if not blobs.has(ref.root))
    blobs.check_room(need)
    inputs = []
    for ref in manifest.inputs:

        async def ask_index(page: int, root: bytes = ref.root) -> bytes:
            ask = BlobIndexAsk(job_id, root, page)
            return await ctx.request(peer, PROTOCOL_INPUT_INDEX, ledger.encode(ask))

        async def ask_chunk(index: int, root: bytes = ref.root) -> bytes:
            ask = BlobChunkAsk(job_id, root, index)
            return await ctx.request(peer, PROTOCOL_INPUT, ledger.encode(ask))

        try:
            path = await blobs.fetch(
                ref.root,
                ref.size_bytes,
                ask_index,
                ask_chunk,
                retry_on=(NetError,),
                attempts_max=input_fetch_attempts_max,
                size_max=ctx.config.inputs_bytes_max,
                statistics=ctx.counters,
            )
        except BlobMismatch as exc:
            raise Mismatch(f"input {ref.name[:64]!r}: {exc}") from exc
        except BlobUnavailable as exc:
            raise NetError(f"cannot fetch input {ref.name[:64]!r}: {exc}") from exc
        inputs.append((ref.name, path))
    return inputs


def _input_of_job(manifest: JobManifest | None, root: bytes) -> None:
    if manifest is None or all(ref.root != root for ref in manifest.inputs):
        raise NetError("not an input of this job")


async def serve_input_index(ctx: Context, manifest: JobManifest | None, ask: BlobIndexAsk) -> bytes:
    """One page of one of the job's inputs' chunk index (requester side)."""
    _input_of_job(manifest, ask.root)
    try:
        return await ctx.store.inputs.serve_index(ask.root, ask.page)
    except BlobError as exc:
        raise NetError(f"input unavailable: {exc}") from exc


async def serve_input_chunk(ctx: Context, manifest: JobManifest | None, ask: BlobChunkAsk) -> bytes:
    """One chunk of one of the job's inputs (requester side)."""
    _input_of_job(manifest, ask.root)
    try:
        return await ctx.store.inputs.serve_chunk(ask.root, ask.index)
    except BlobError as exc:
        raise NetError(f"input unavailable: {exc}") from exc


async def keep_inputs_swept(ctx: Context) -> None:
    """Sweep the input store now and whenever a job of either role ends (the service runs
    this for as long as it runs)."""
    receive = ctx.events.subscribe()
    async with receive:
        await sweep_inputs(ctx)
        async for record in receive:
            if record.state.terminal:
                await sweep_inputs(ctx)


async def sweep_inputs(ctx: Context) -> None:
    """Drop the input blobs (and partial fetches) no unfinished job of this node needs."""
    store = ctx.store
    gone = await trio.to_thread.run_sync(store.inputs.keep_only, store.inputs_in_use())
    if gone:
        ctx.counters["input_blobs_swept"] = ctx.counters.get("input_blobs_swept", 0) + gone


async def read_chunk(path: Path, offset: int) -> bytes:
    """One chunk of a file on disk, read off the trio thread."""

    def read() -> bytes:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(chunk_bytes_max)

    try:
        return await trio.to_thread.run_sync(read)
    except OSError as exc:
        raise NetError(f"output unreadable: {exc}") from exc
