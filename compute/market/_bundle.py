"""A job's output bundle on disk: its streamable format, sealing it from the job's output files,
checking and opening a fetched one into the requester's outputs directory, and the slash
evidence, all streaming (no bundle is ever held in memory; a 16 GiB bundle costs a few MiB).

The bundle (the plaintext that ``ledger`` seals in ``output_chunk_bytes`` chunks) is
``u64 BE header length || header || every file's bytes, in the header's order``, where the
header is the canonical encoding of ``OutputsInfo`` (the file list with sizes and SHA-256s,
stdout, stderr), at most ``header_bytes_max``. So an opener knows every file's path and size
before the first byte of it, and writes it straight to its place.

On disk, a sealed bundle is a directory of three files:
- ``chunks``: the sealed chunks end to end (chunk ``i`` at ``ledger.sealed_offset(i)``);
- ``plain-hashes``: the 32-byte plaintext hash of every chunk, end to end;
- ``range-roots`` (provider): for every range of ``range_chunks`` chunks, the roots of its
  subtree of the output tree and of the plain tree (32 + 32 bytes). The trees over these
  give ``output_root`` and ``plain_root`` (a range is an aligned subtree; the last one may be
  short, as the last node of a level is), so a range served with the Merkle proofs of its two
  subtree roots is checked on arrival (``check_range``);
- ``roots``: the encoded ``SealedMeta`` (roots and size). A provider writes it last, after
  the other files are synced, so its presence means they are whole.

Every function here blocks (file I/O and hashing); the exchange runs them in threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
from typing import TYPE_CHECKING, BinaryIO

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

import ledger
from compute.market.exceptions import MarketError
from compute.market.types import OutputsInfo, log_bytes_max, output_files_max

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from compute.types import OutputFile

header_bytes_max = 2 * log_bytes_max + 512 * output_files_max + 64 * 1024
"""The bundle header: two capped logs and the file list (a path is at most ~300 bytes)."""
range_chunks = 1024
"""Sealed chunks per read, per served range and per fetched range (1 MiB of plaintext)."""
io_block_bytes = 1024 * 1024
free_disk_margin_bytes = 64 * 1024 * 1024
"""Left free on a disk after a bundle is sealed or fetched, so the node keeps working."""
output_path_bytes_max = 1024
output_path_depth_max = 16

CHUNKS = "chunks"
PLAIN_HASHES = "plain-hashes"
ROOTS = "roots"
RANGE_ROOTS = "range-roots"


class DiskFull(MarketError):
    """Raised when a disk has no room for a bundle (nothing is written then)."""


class BadBundle(MarketError):
    """Raised when an opened bundle is malformed: a bad header, a path that would escape the
    outputs directory, a file that does not match its size or SHA-256."""


@dataclasses.dataclass(frozen=True, slots=True)
class SealedMeta:
    """What a sealed bundle commits to."""

    output_root: bytes
    plain_root: bytes
    output_bytes: int


def bundle_bytes(info: OutputsInfo) -> int:
    return 8 + len(ledger.encode(info)) + sum(f.size_bytes for f in info.files)


def bundle_bytes_max(outputs_bytes_max: int) -> int:
    """Largest bundle a requester fetches: its outputs cap plus the header."""
    return outputs_bytes_max + 8 + header_bytes_max


def sealed_disk_bytes(output_bytes: int) -> int:
    """The disk a sealed bundle takes (chunks and plaintext hashes)."""
    return ledger.sealed_bytes(output_bytes) + 32 * ledger.chunk_count(output_bytes)


def check_free_disk(directory: Path, needed: int, what: str) -> None:
    """``DiskFull`` unless ``directory``'s disk has ``needed`` bytes and the margin free."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed + free_disk_margin_bytes:
        raise DiskFull(
            f"not enough free disk for {what}: {needed} bytes needed (+{free_disk_margin_bytes}"
            f" kept free), {free} free at {directory}"
        )


def remove_dir(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def _sync(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        _sync(handle)
    tmp.replace(path)


# --- the provider: seal a job's outputs ------------------------------------------------------


def _plaintext(info: OutputsInfo, out_dir: Path) -> Iterator[bytes]:
    """The bundle's bytes in blocks: the header, then every file (checked against its size)."""
    header = ledger.encode(info)
    yield len(header).to_bytes(8, "big") + header
    for file in info.files:
        left = file.size_bytes
        with (out_dir / file.path).open("rb") as handle:
            while left:
                block = handle.read(min(io_block_bytes, left))
                if not block:
                    raise MarketError(f"output {file.path!r} shrank after the job ended")
                left -= len(block)
                yield block


def _chunks(blocks: Iterator[bytes]) -> Iterator[bytes]:
    """``blocks`` re-cut into ``output_chunk_bytes`` chunks (the last may be shorter)."""
    size = ledger.output_chunk_bytes
    pending = b""
    for block in blocks:
        data = pending + block if pending else block
        view = memoryview(data)
        whole = len(data) - len(data) % size
        for offset in range(0, whole, size):
            yield bytes(view[offset : offset + size])
        pending = bytes(view[whole:])
    if pending:
        yield pending


def read_meta(sealed_dir: Path) -> SealedMeta | None:
    """The roots of a whole sealed bundle in ``sealed_dir``, or None (absent or partial)."""
    try:
        data = (sealed_dir / ROOTS).read_bytes()
        meta = ledger.decode(SealedMeta, data, max_bytes=1024)
        chunks = (sealed_dir / CHUNKS).stat().st_size
        hashes = (sealed_dir / PLAIN_HASHES).stat().st_size
        range_roots = (sealed_dir / RANGE_ROOTS).stat().st_size
    except (OSError, ledger.DecodeError):
        return None
    count = ledger.chunk_count(meta.output_bytes)
    if chunks != ledger.sealed_bytes(meta.output_bytes) or hashes != 32 * count:
        return None
    if range_roots != 64 * ranges_of(meta.output_bytes):
        return None
    return meta


def ranges_of(output_bytes: int) -> int:
    """How many ranges of ``range_chunks`` chunks a bundle of ``output_bytes`` is served in."""
    return -(-ledger.chunk_count(output_bytes) // range_chunks)


def subtree_roots(
    first: int, chunks: list[bytes], plain_hashes: list[bytes]
) -> tuple[bytes, bytes]:
    """The roots of a range's subtrees of the output tree and of the plain tree."""
    output_leaves = ledger.output_leaves_from(first, chunks, plain_hashes)
    return ledger.merkle_root(output_leaves), ledger.merkle_root(ledger.plain_leaves(plain_hashes))


def seal_outputs(
    job_id: bytes, key: bytes, info: OutputsInfo, out_dir: Path, sealed_dir: Path
) -> SealedMeta:
    """Seal the bundle of ``info`` (files read from ``out_dir``) into ``sealed_dir``; the
    same key and files give the same bytes. A whole one already there is reused. On any
    failure (a full disk included) nothing is left in ``sealed_dir``."""
    found = read_meta(sealed_dir)
    if found is not None:
        return found
    remove_dir(sealed_dir)
    size = bundle_bytes(info)
    check_free_disk(sealed_dir.parent, sealed_disk_bytes(size), "the sealed outputs")
    sealed_dir.mkdir(parents=True)
    try:
        meta = _seal_into(job_id, key, info, out_dir, sealed_dir, size)
    except BaseException:
        remove_dir(sealed_dir)
        raise
    return meta


def _seal_into(
    job_id: bytes, key: bytes, info: OutputsInfo, out_dir: Path, sealed_dir: Path, size: int
) -> SealedMeta:
    aead = ChaCha20Poly1305(key)
    outputs, plains = ledger.RootBuilder(), ledger.RootBuilder()
    sha256 = hashlib.sha256
    with (
        (sealed_dir / CHUNKS).open("wb", buffering=io_block_bytes) as chunks_file,
        (sealed_dir / PLAIN_HASHES).open("wb", buffering=io_block_bytes) as hashes_file,
        (sealed_dir / RANGE_ROOTS).open("wb", buffering=io_block_bytes) as roots_file,
    ):
        index = first = 0
        sealed: list[bytes] = []
        plain_hashes: list[bytes] = []

        def flush() -> None:
            # A range at a time: its subtree roots, which the trees over them fold into.
            output_root, plain_root = subtree_roots(first, sealed, plain_hashes)
            outputs.add(output_root)
            plains.add(plain_root)
            roots_file.write(output_root + plain_root)
            chunks_file.write(b"".join(sealed))
            hashes_file.write(b"".join(plain_hashes))
            sealed.clear()
            plain_hashes.clear()

        for plain in _chunks(_plaintext(info, out_dir)):
            sealed.append(ledger.seal_chunk(aead, job_id, index, plain))
            plain_hashes.append(sha256(plain).digest())
            index += 1
            if len(sealed) == range_chunks:
                flush()
                first = index
        if sealed:
            flush()
        assert index == ledger.chunk_count(size), "the bundle is not the size its header says"
        _sync(chunks_file)
        _sync(hashes_file)
        _sync(roots_file)
    meta = SealedMeta(outputs.root(), plains.root(), size)
    _write_atomically(sealed_dir / ROOTS, ledger.encode(meta))
    return meta


def read_range(sealed_dir: Path, output_bytes: int, first: int, count: int) -> tuple[bytes, bytes]:
    """Sealed chunks ``first .. first+count-1`` and their plaintext hashes, end to end."""
    total = ledger.chunk_count(output_bytes)
    end = min(first + count, total)
    if not 0 <= first < end:
        return b"", b""
    start = ledger.sealed_offset(first)
    stop = ledger.sealed_offset(end - 1) + ledger.sealed_chunk_bytes(output_bytes, end - 1)
    with (sealed_dir / CHUNKS).open("rb") as handle:
        handle.seek(start)
        chunks = handle.read(stop - start)
    with (sealed_dir / PLAIN_HASHES).open("rb") as handle:
        handle.seek(32 * first)
        hashes = handle.read(32 * (end - first))
    if len(chunks) != stop - start or len(hashes) != 32 * (end - first):
        raise MarketError("the sealed outputs on disk are shorter than their roots say")
    return chunks, hashes


# --- the requester: check, open, evidence ----------------------------------------------------


def range_bytes(output_bytes: int, first: int) -> tuple[int, int]:
    """``(chunks, sealed bytes)`` of the range that starts at chunk ``first``."""
    end = min(first + range_chunks, ledger.chunk_count(output_bytes))
    stop = ledger.sealed_offset(end - 1) + ledger.sealed_chunk_bytes(output_bytes, end - 1)
    return end - first, stop - ledger.sealed_offset(first)


def _ranges(
    sealed_dir: Path, output_bytes: int, first: int, end: int
) -> Iterator[tuple[int, list[bytes], bytes]]:
    """``(index of the first, ciphertexts, plaintext hashes)`` of chunks ``first..end-1``, a
    range at a time, read from ``sealed_dir``'s files."""
    index = first
    while index < end:
        count = min(range_chunks, end - index)
        chunks, hashes = read_range(sealed_dir, output_bytes, index, count)
        view = memoryview(chunks)
        cuts = [ledger.sealed_offset(k) for k in range(count)]  # from the range's start
        cuts.append(len(chunks))
        yield index, [bytes(view[cuts[k] : cuts[k + 1]]) for k in range(count)], hashes
        index += count


def _split_hashes(hashes: bytes) -> list[bytes]:
    return [hashes[i : i + 32] for i in range(0, len(hashes), 32)]


def check_sealed_dir(
    sealed_dir: Path, output_root: bytes, plain_root: bytes, output_bytes: int
) -> None:
    """``ledger.check_sealed`` streamed from disk: the files are the sizes ``output_bytes``
    implies and give both roots. ``ledger.OutputsError`` naming the first problem."""
    if not 0 <= output_bytes <= ledger.output_bytes_max:
        raise ledger.OutputsError(f"output_bytes {output_bytes} is out of range")
    count = ledger.chunk_count(output_bytes)
    try:
        sizes = ((sealed_dir / CHUNKS).stat().st_size, (sealed_dir / PLAIN_HASHES).stat().st_size)
    except OSError as exc:
        raise ledger.OutputsError(f"the sealed outputs are unreadable: {exc}") from exc
    if sizes != (ledger.sealed_bytes(output_bytes), 32 * count):
        raise ledger.OutputsError(f"the sealed files are {sizes} bytes for {count} chunks")
    outputs, plains = ledger.RootBuilder(), ledger.RootBuilder()
    for first, chunks, hashes in _ranges(sealed_dir, output_bytes, 0, count):
        range_output_root, range_plain_root = subtree_roots(first, chunks, _split_hashes(hashes))
        outputs.add(range_output_root)
        plains.add(range_plain_root)
    if outputs.root() != output_root:
        raise ledger.OutputsError("the chunks do not match the delivery's output root")
    if plains.root() != plain_root:
        raise ledger.OutputsError("the plain hashes do not match the delivery's plain root")


def range_proofs(
    sealed_dir: Path, output_bytes: int, first: int
) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """The Merkle proofs of the range at chunk ``first``: of its output subtree root up to
    the output root, and of its plain subtree root up to the plain root (provider)."""
    ranges = ranges_of(output_bytes)
    data = (sealed_dir / RANGE_ROOTS).read_bytes()
    if len(data) != 64 * ranges:
        raise MarketError("the sealed outputs' range roots are not whole")
    output_roots = [data[i : i + 32] for i in range(0, len(data), 64)]
    plain_roots = [data[i + 32 : i + 64] for i in range(0, len(data), 64)]
    index = first // range_chunks
    return ledger.merkle_proof(output_roots, index), ledger.merkle_proof(plain_roots, index)


def check_range(
    meta: SealedMeta,
    first: int,
    chunks: bytes,
    hashes: bytes,
    output_proof: tuple[bytes, ...],
    plain_proof: tuple[bytes, ...],
) -> None:
    """A served range against the delivery's roots, through its two subtree roots and their
    proofs (its shape already checked: ``range_bytes``). ``ledger.OutputsError`` if not."""
    count = len(hashes) // 32
    view = memoryview(chunks)
    cuts = [ledger.sealed_offset(k) for k in range(count)] + [len(chunks)]
    ciphertexts = [bytes(view[cuts[k] : cuts[k + 1]]) for k in range(count)]
    output_root, plain_root = subtree_roots(first, ciphertexts, _split_hashes(hashes))
    index, ranges = first // range_chunks, ranges_of(meta.output_bytes)
    if not ledger.merkle_verify(meta.output_root, output_root, index, ranges, output_proof):
        raise ledger.OutputsError(f"range {index} does not match the delivery's output root")
    if not ledger.merkle_verify(meta.plain_root, plain_root, index, ranges, plain_proof):
        raise ledger.OutputsError(f"range {index} does not match the delivery's plain root")


def evidence(
    sealed_dir: Path, output_bytes: int, index: int
) -> tuple[bytes, bytes, tuple[bytes, ...]]:
    """``(chunk, plain hash, Merkle proof)`` of chunk ``index``: a ``SlashBadKey``'s body,
    read from disk (the proof in one pass over the leaves)."""
    count = ledger.chunk_count(output_bytes)

    def leaves(first: int, end: int) -> Iterator[bytes]:
        for start, chunks, hashes in _ranges(sealed_dir, output_bytes, first, end):
            for k, ciphertext in enumerate(chunks):
                yield ledger.output_leaf(start + k, ciphertext, hashes[32 * k : 32 * k + 32])

    chunk, plain_hash = read_range(sealed_dir, output_bytes, index, 1)
    return chunk, plain_hash, ledger.merkle_proof_streaming(leaves, count, index)


def check_output_path(path: str) -> str:
    """``path`` if it is a safe relative file path under an outputs directory."""
    shown = repr(path[:64])
    if not path or len(path.encode("utf-8", "surrogatepass")) > output_path_bytes_max:
        raise BadBundle(f"output path {shown} is empty or too long")
    if "\0" in path or "\\" in path or path.startswith("/"):
        raise BadBundle(f"output path {shown} is absolute or has NUL or a backslash")
    parts = path.split("/")
    if len(parts) > output_path_depth_max or any(p in ("", ".", "..") for p in parts):
        raise BadBundle(f"output path {shown} is not a normalised relative path")
    return path


def check_files(files: tuple[OutputFile, ...]) -> None:
    if len(files) > output_files_max:
        raise BadBundle(f"{len(files)} output files exceed {output_files_max}")
    seen: set[str] = set()
    for file in files:
        check_output_path(file.path)
        if file.path in seen or file.size_bytes < 0 or len(file.sha256) != 32:
            raise BadBundle(f"output {file.path[:64]!r} repeats or has a bad size or digest")
        seen.add(file.path)
    for file in files:
        parts = file.path.split("/")
        if any("/".join(parts[:d]) in seen for d in range(1, len(parts))):
            raise BadBundle(f"output {file.path[:64]!r} lies under another output file")


class _Unpacker:
    """Writes an opened bundle's bytes, as they come, into files under ``dest``."""

    def __init__(self, dest: Path, output_bytes: int) -> None:
        self.dest = dest
        self.left = output_bytes
        self.pending = b""
        self.info: OutputsInfo | None = None
        self.error = ""
        self._files: list[OutputFile] = []
        self._handle: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._file_left = 0

    def feed(self, data: bytes) -> None:
        self.left -= len(data)
        if self.error:
            return
        try:
            self._feed(data)
        except BadBundle as exc:
            self.error = str(exc)
            self.close()

    def _feed(self, data: bytes) -> None:
        if self.info is None:
            self.pending += data
            if len(self.pending) < 8:
                return
            length = int.from_bytes(self.pending[:8], "big")
            if length > header_bytes_max:
                raise BadBundle(f"the bundle header is {length} bytes (at most {header_bytes_max})")
            if len(self.pending) < 8 + length:
                return
            try:
                info = ledger.decode(OutputsInfo, self.pending[8 : 8 + length], max_bytes=length)
            except ledger.DecodeError as exc:
                raise BadBundle(f"the bundle header does not decode: {exc}") from exc
            check_files(info.files)
            if 8 + length + sum(f.size_bytes for f in info.files) != self.left + len(self.pending):
                raise BadBundle("the bundle's size is not its header's plus its files'")
            self.info = info
            self._files = list(info.files)
            data = self.pending[8 + length :]
            self.pending = b""
            self._next_file()
        while data:
            if self._handle is None:
                raise BadBundle("the bundle has bytes past its last file")
            take = data[: self._file_left]
            self._handle.write(take)
            self._hash.update(take)
            self._file_left -= len(take)
            data = data[len(take) :]
            if not self._file_left:
                self._end_file()
                self._next_file()

    def _next_file(self) -> None:
        """Open the next file to fill (empty ones are written and checked at once)."""
        self._handle = None
        while self._files:
            file = self._files[0]
            target = self.dest / file.path
            target.parent.mkdir(parents=True, exist_ok=True)
            self._handle = target.open("wb", buffering=io_block_bytes)
            self._hash = hashlib.sha256()
            self._file_left = file.size_bytes
            if file.size_bytes:
                return
            self._end_file()

    def _end_file(self) -> None:
        file = self._files.pop(0)
        assert self._handle is not None
        self._handle.close()
        self._handle = None
        if self._hash.digest() != file.sha256:
            raise BadBundle(f"output {file.path[:64]!r} does not match its SHA-256")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def finish(self) -> OutputsInfo | str:
        """The bundle's header, or why it is malformed."""
        self.close()
        if self.error:
            return self.error
        if self.info is None or self._files or self.left:
            return "the bundle ends before its header or files do"
        return self.info


def open_sealed_dir(
    job_id: bytes, key: bytes, sealed_dir: Path, output_bytes: int, dest: Path
) -> OutputsInfo | int | str:
    """Open a checked sealed bundle with the revealed ``key`` into ``dest`` (made here; replaced
    only once whole): its header, or the index of the first chunk that does not open to its
    committed plaintext hash (slash evidence; checked before any malformation is reported),
    or why the opened bundle is malformed. ``dest`` exists only after a success."""
    count = ledger.chunk_count(output_bytes)
    staging = dest.with_name(dest.name + ".tmp")
    remove_dir(staging)
    staging.mkdir(parents=True)
    unpacker = _Unpacker(staging, output_bytes)
    sha256 = hashlib.sha256
    opener = ledger.chunk_opener(job_id, key)
    try:
        for first, chunks, hashes in _ranges(sealed_dir, output_bytes, 0, count):
            plains: list[bytes] = []
            for k, ciphertext in enumerate(chunks):
                plain = opener(first + k, ciphertext)
                if plain is None or sha256(plain).digest() != hashes[32 * k : 32 * k + 32]:
                    return first + k
                plains.append(plain)
            unpacker.feed(b"".join(plains))  # a range at a time
        opened = unpacker.finish()
        if isinstance(opened, OutputsInfo):
            remove_dir(dest)
            staging.replace(dest)
        return opened
    finally:
        unpacker.close()
        remove_dir(staging)


# --- the requester's partial fetch -----------------------------------------------------------


class PartialFetch:
    """A sealed bundle being fetched into ``directory``: ``chunks`` and ``plain-hashes`` are
    written range by range at their offsets; ``have`` records (one byte a range) the ranges
    that were synced to disk, so a fetch cut by a dropped connection or a restart re-fetches
    only what is missing. ``target`` holds the roots being fetched: another target starts
    over. ``checked`` marks a whole bundle that matched its roots."""

    def __init__(self, directory: Path, meta: SealedMeta) -> None:
        self.directory = directory
        self.meta = meta
        self.count = ledger.chunk_count(meta.output_bytes)
        self.ranges = ranges_of(meta.output_bytes)
        self.have = bytearray(self.ranges)
        self.resumed = 0
        """Ranges found on disk when this fetch began."""
        target = ledger.encode(meta)
        try:
            same = (directory / "target").read_bytes() == target
        except OSError:
            same = False
        if same:
            with contextlib.suppress(OSError):
                have = (directory / "have").read_bytes()
                if len(have) == self.ranges:
                    self.have[:] = bytes(_HAD if b == _HAD else 0 for b in have)
            self.resumed = sum(1 for b in self.have if b)
        else:
            remove_dir(directory)
            check_free_disk(
                directory.parent,
                sealed_disk_bytes(meta.output_bytes) + meta.output_bytes,
                "the outputs (sealed and opened)",
            )
            directory.mkdir(parents=True)
            _write_atomically(directory / "target", target)
        self._chunks = os.open(directory / CHUNKS, os.O_RDWR | os.O_CREAT, 0o600)
        self._hashes = os.open(directory / PLAIN_HASHES, os.O_RDWR | os.O_CREAT, 0o600)

    @property
    def checked(self) -> bool:
        return (self.directory / "checked").exists()

    def mark_checked(self) -> None:
        _write_atomically(self.directory / "checked", b"")

    def missing(self) -> list[int]:
        """The first chunk of every range not on disk yet."""
        return [r * range_chunks for r in range(self.ranges) if not self.have[r]]

    def write(self, first: int, chunks: bytes, hashes: bytes) -> None:
        """Range ``first`` (already checked for its shape) written at its place; recorded as
        had once a later ``sync`` made it durable."""
        os.pwrite(self._chunks, chunks, ledger.sealed_offset(first))
        os.pwrite(self._hashes, hashes, 32 * first)
        self.have[first // range_chunks] = _WRITTEN

    @property
    def unsynced(self) -> int:
        return self.have.count(_WRITTEN)

    def sync(self) -> None:
        """Make the ranges written so far durable, then record them as had (a range written
        while this runs waits for the next sync)."""
        written = [r for r in range(self.ranges) if self.have[r] == _WRITTEN]
        if not written:
            return
        os.fsync(self._chunks)
        os.fsync(self._hashes)
        for r in written:
            self.have[r] = _HAD
        had = bytes(_HAD if b == _HAD else 0 for b in self.have)
        _write_atomically(self.directory / "have", had)

    def close(self) -> None:
        for fd in (self._chunks, self._hashes):
            with contextlib.suppress(OSError):
                os.close(fd)

    def complete(self) -> bool:
        return all(self.have)


_HAD = 1
_WRITTEN = 2
