"""Moving a job's bytes between peers: inputs to the provider, outputs to the requester.

Blobs are content addressed and travel as ``chunk_bytes_max`` request/response chunks,
scoped to one job (a peer can only read what belongs to its job), size-checked as they arrive
and SHA-256 checked at the end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

import ledger
from compute.market._wire import PROTOCOL_INPUT, PROTOCOL_OUTPUT, Mismatch
from compute.market.exceptions import NetError
from compute.market.types import BlobRequest, chunk_bytes_max, output_files_max

if TYPE_CHECKING:
    from pathlib import Path

    from compute.market._context import Context
    from compute.market.types import JobManifest, OutputsInfo

fetch_attempts_max = 5
fetch_retry_s = 0.5


async def fetch_blob(
    ctx: Context, peer: str, protocol: str, scope_id: bytes, sha256: bytes, size: int
) -> bytes:
    """Fetch ``size`` bytes in chunks and check them against ``sha256``."""
    parts: list[bytes] = []
    got = 0
    for _ in range(size // chunk_bytes_max + 2):
        if got >= size:
            break
        chunk = await ctx.request(peer, protocol, ledger.encode(BlobRequest(scope_id, sha256, got)))
        if not chunk or got + len(chunk) > size:
            raise Mismatch(f"blob {sha256.hex()[:12]} is not {size} bytes as announced")
        parts.append(chunk)
        got += len(chunk)
    data = b"".join(parts)
    if len(data) != size or ledger.digest(data) != sha256:
        raise Mismatch(f"blob {sha256.hex()[:12]} does not match its SHA-256")
    return data


async def fetch_inputs(
    ctx: Context, peer: str, job_id: bytes, manifest: JobManifest
) -> list[tuple[str, bytes]]:
    """Every input of ``manifest`` from the requester; ``NetError`` after bounded retries,
    ``Mismatch`` when the requester serves bytes that are not the ones it named."""
    last = ""
    for _ in range(fetch_attempts_max):
        try:
            inputs = []
            for ref in manifest.inputs:
                data = await fetch_blob(
                    ctx, peer, PROTOCOL_INPUT, job_id, ref.sha256, ref.size_bytes
                )
                inputs.append((ref.name, data))
        except NetError as exc:
            last = str(exc)
            await trio.sleep(fetch_retry_s)
            continue
        return inputs
    raise NetError(f"cannot fetch the job's inputs: {last}")


def serve_input(ctx: Context, manifest: JobManifest | None, ask: BlobRequest) -> bytes:
    """One chunk of one of the job's inputs (requester side)."""
    if manifest is None or all(ref.sha256 != ask.sha256 for ref in manifest.inputs):
        raise NetError("not an input of this job")
    blob = ctx.store.blob(ask.sha256)
    if blob is None:
        raise NetError("input missing from the store")
    return blob[ask.offset : ask.offset + chunk_bytes_max]


async def fetch_output_files(
    ctx: Context, peer: str, aid: bytes, info: OutputsInfo, outputs_bytes_max: int
) -> list[bytes]:
    """Every file of ``info`` from the provider, each checked against its size and digest."""
    if len(info.files) > output_files_max:
        raise Mismatch(f"{len(info.files)} output files exceed {output_files_max}")
    if sum(f.size_bytes for f in info.files) > outputs_bytes_max:
        raise Mismatch("the outputs exceed this node's outputs_bytes_max")
    blobs: list[bytes] = []
    for file in info.files:
        data = await fetch_blob(ctx, peer, PROTOCOL_OUTPUT, aid, file.sha256, file.size_bytes)
        blobs.append(data)
    return blobs


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
