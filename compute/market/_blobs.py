"""Content-addressed blobs on disk, and their chunked, verified, resumable transfer.

The format (``gpumesh-blob/1``). A blob of ``size`` bytes is cut into chunks of
``chunk_bytes`` (1 MiB; the last one shorter, none for an empty blob); chunk ``i`` covers
bytes ``[i * chunk_bytes, min((i + 1) * chunk_bytes, size))`` and ``h_i = SHA-256(chunk_i)``.
The blob's name is its root::

    root = SHA-256(b"gpumesh-blob/1\\0" || u64be(size) || u32be(chunk_bytes) || h_0 || ... || h_n-1)

so the chunk-hash list (the index) checks against the root before a single chunk moves, and
every chunk checks against its hash as it arrives: a transfer never trusts unverified bytes,
and resuming needs only the chunks on disk that still hash right.

The store (``BlobStore``) is a directory::

    data/<root hex>        the blob's bytes (read-only once in place)
    data/<root hex>.idx    its index: the n chunk hashes, concatenated
    partial/<root hex>     a fetch in progress: chunks written at their offsets (sparse)
    partial/<root hex>.idx the index fetched (and checked) for it
    tmp/                   a ``put_path`` copy before it is renamed into place

A blob is in ``data/`` only once its bytes and index were fsynced and renamed there, so
whatever is in ``data/`` is whole ("persist before you acknowledge"). A fetch resumes from
its partial file after a cut connection (bounded retries with backoff) and after a restart of
either side (the partial survives; its chunks are re-hashed and only the rest is asked for).

The wire is request/response: ``BlobIndexAsk`` -> ``BlobIndexPage`` (up to
``index_page_hashes_max`` hashes) and ``BlobChunkAsk`` -> the chunk's bytes. Each ask names a
``scope`` (the market: a job id) so the serving side can refuse a peer that asks for a blob
that is not its to read; ``serve_index`` and ``serve_chunk`` answer once the caller has
checked the scope. ``fetch`` takes two callables that put the asks on whatever transport
(``ask_index(page)``, ``ask_chunk(index)``), so images and outputs can reuse it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import os
import shutil
import stat
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import trio

import ledger
from compute._files import clone_file
from compute.market.exceptions import MarketError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

FORMAT_TAG = b"gpumesh-blob/1\0"
chunk_bytes = 1024 * 1024
hash_bytes = 32
index_page_hashes_max = 1024
"""Hashes per index page: 32 KiB, well inside one control message."""
blob_bytes_max = 1 << 40
"""No blob is larger than 1 TiB (a config limit is always lower)."""
fetch_window = 6
"""Chunk requests in flight per fetch. py-libp2p's Yamux opens every stream with a 256 KiB
window and a writer waiting for more polls every 10 ms, so one 1 MiB answer stalls a few
times: several in flight hide that. A peer serves at most 8 streams of ours at a time
(``p2p`` ``inbound_streams_per_peer_max``): 6 leaves room for its other requests."""
fetch_attempts_max = 8
"""Tries of one request before the fetch gives up (the partial stays for a later resume)."""
fetch_backoff_s = 0.25
fetch_backoff_s_max = 4.0
disk_reserve_bytes = 64 * 1024 * 1024
"""Free space a store leaves on its file system after a put or a fetch."""


class BlobError(MarketError):
    """Raised when a blob cannot be stored, served or fetched."""


class BlobMismatch(BlobError):
    """Raised when a peer's index or chunk does not match the root it was asked for."""


class BlobMissing(BlobError):
    """Raised when a blob asked for is not in the store."""


class BlobDiskFull(BlobError):
    """Raised when the store's file system has no room for a blob (nothing is left behind)."""


class BlobUnavailable(BlobError):
    """Raised when a fetch's requests keep failing past the retries (its partial is kept)."""


@dataclasses.dataclass(frozen=True, slots=True)
class BlobIndexAsk:
    scope: bytes
    root: bytes
    page: int


@dataclasses.dataclass(frozen=True, slots=True)
class BlobIndexPage:
    size: int
    hashes: bytes
    """The page's chunk hashes, concatenated (``index_page_hashes_max`` but on the last)."""


@dataclasses.dataclass(frozen=True, slots=True)
class BlobChunkAsk:
    scope: bytes
    root: bytes
    index: int


# ---- the format ----


def chunk_count(size: int) -> int:
    return -(-size // chunk_bytes)


def chunk_len(size: int, index: int) -> int:
    return min(chunk_bytes, size - index * chunk_bytes)


def page_count(size: int) -> int:
    return -(-chunk_count(size) // index_page_hashes_max)


def root_of(size: int, hashes: bytes) -> bytes:
    """The root of a blob of ``size`` bytes whose chunk hashes are ``hashes``."""
    assert len(hashes) == chunk_count(size) * hash_bytes
    head = FORMAT_TAG + size.to_bytes(8, "big") + chunk_bytes.to_bytes(4, "big")
    return hashlib.sha256(head + hashes).digest()


def index_of_bytes(data: bytes) -> bytes:
    """The index (concatenated chunk hashes) of ``data``."""
    return b"".join(
        hashlib.sha256(data[i : i + chunk_bytes]).digest() for i in range(0, len(data), chunk_bytes)
    )


def blob_root(data: bytes) -> bytes:
    """The root of ``data`` (for small blobs held in memory)."""
    return root_of(len(data), index_of_bytes(data))


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


# ---- the store ----


class BlobStore:
    """Blobs by root in ``directory`` (created if missing). ``free_bytes`` (tests) replaces
    the file system's free-space probe."""

    def __init__(
        self, directory: str | os.PathLike[str], *, free_bytes: Callable[[], int] | None = None
    ) -> None:
        self.directory = Path(directory)
        self._data = self.directory / "data"
        self._partial = self.directory / "partial"
        self._tmp = self.directory / "tmp"
        for path in (self._data, self._partial, self._tmp):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._free = free_bytes or (lambda: _free_bytes(self.directory))
        self._lock = threading.Lock()
        """Held while a blob comes into place and while a sweep decides what goes."""
        self._pins: dict[bytes, int] = {}
        # A put interrupted by a crash left only a temp file: nothing refers to it.
        for leftover in self._tmp.iterdir():
            _unlink(leftover)

    def path(self, root: bytes) -> Path:
        return self._data / root.hex()

    def partial_path(self, root: bytes) -> Path:
        return self._partial / root.hex()

    def has(self, root: bytes) -> bool:
        return self.path(root).exists() and self.path(root).with_suffix(".idx").exists()

    def roots(self) -> list[bytes]:
        """Every root with a file in ``data/`` (a blob, or an index a crash left alone)."""
        return _roots_in(self._data)

    def partial_roots(self) -> list[bytes]:
        """Every root with a file in ``partial/`` (a fetch's bytes or its saved index)."""
        return _roots_in(self._partial)

    def size(self, root: bytes) -> int:
        try:
            return self.path(root).stat().st_size
        except FileNotFoundError:
            raise BlobMissing(f"blob {root.hex()[:12]} is not in the store") from None

    def index(self, root: bytes) -> bytes:
        """The blob's chunk hashes, checked against its root."""
        try:
            hashes = self.path(root).with_suffix(".idx").read_bytes()
        except FileNotFoundError:
            raise BlobMissing(f"blob {root.hex()[:12]} is not in the store") from None
        size = self.size(root)
        if len(hashes) != chunk_count(size) * hash_bytes or root_of(size, hashes) != root:
            raise BlobError(f"blob {root.hex()[:12]}: its index on disk does not match its root")
        return hashes

    def check_room(self, need_bytes: int) -> None:
        """``BlobDiskFull`` unless ``need_bytes`` fit with the reserve left over."""
        free = self._free()
        if need_bytes + disk_reserve_bytes > free:
            raise BlobDiskFull(
                f"not enough disk for {need_bytes} bytes in {self.directory}: {free} bytes free,"
                f" {disk_reserve_bytes} kept in reserve"
            )

    def free_bytes(self) -> int:
        return self._free()

    def pin(self, root: bytes) -> None:
        """Keep ``root`` (and its partial) through any sweep until as many ``unpin``."""
        with self._lock:
            self._pins[root] = self._pins.get(root, 0) + 1

    def unpin(self, root: bytes) -> None:
        with self._lock:
            count = self._pins.get(root, 0) - 1
            if count <= 0:
                self._pins.pop(root, None)
            else:
                self._pins[root] = count

    def pinned(self) -> set[bytes]:
        with self._lock:
            return set(self._pins)

    # -- put --

    def put_path_sync(self, source: str | os.PathLike[str]) -> tuple[bytes, int]:
        """Copy (reflink where the file system can) ``source`` into the store, hash it, fsync
        it and rename it into place: ``(root, size)``, pinned (the caller unpins it once
        something refers to it). Blocking: see ``put_path``."""
        source = Path(source)
        try:
            info = source.stat()
        except OSError as exc:
            raise BlobError(f"cannot read {source}: {exc.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            # A FIFO or a device would block the copy (or never end): only plain files.
            raise BlobError(f"{source} is not a regular file")
        size = info.st_size
        if size > blob_bytes_max:
            raise BlobError(f"{source} is over {blob_bytes_max} bytes")
        self.check_room(size)
        tmp = self._tmp / f"put-{os.getpid()}-{id(source):x}-{os.urandom(4).hex()}"
        try:
            try:
                clone_file(source, tmp)
                hashes, got = _hash_file(tmp)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise BlobDiskFull(f"the disk filled up copying {source}") from None
                raise BlobError(f"cannot copy {source}: {exc.strerror}") from None
            return self._adopt(tmp, hashes, got), got
        finally:
            _unlink(tmp)

    async def put_path(self, source: str | os.PathLike[str]) -> tuple[bytes, int]:
        """``put_path_sync`` off the trio thread."""
        return await trio.to_thread.run_sync(self.put_path_sync, source)

    def put_bytes(self, data: bytes) -> bytes:
        """Store ``data`` (small, in memory) and return its root, pinned (as ``put_path``)."""
        self.check_room(len(data))
        tmp = self._tmp / f"put-{os.getpid()}-{os.urandom(6).hex()}"
        try:
            try:
                with open(tmp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise BlobDiskFull("the disk filled up storing a blob") from None
                raise
            return self._adopt(tmp, index_of_bytes(data), len(data))
        finally:
            _unlink(tmp)

    def _adopt(self, tmp: Path, hashes: bytes, size: int) -> bytes:
        """Move a synced file whose index is ``hashes`` into ``data/`` (index first)."""
        root = root_of(size, hashes)
        target = self.path(root)
        with self._lock:
            self._pins[root] = self._pins.get(root, 0) + 1
            if self.has(root):
                return root
            _write_synced(target.with_suffix(".idx"), hashes)
            os.chmod(tmp, 0o400)
            os.replace(tmp, target)
            _fsync_dir(self._data)
        return root

    def remove(self, root: bytes) -> None:
        """Drop a blob (and any partial of it)."""
        for suffix in ("", ".idx", ".idx.tmp"):
            _unlink(self.path(root).with_name(root.hex() + suffix))
        self.discard_partial(root)

    def discard_partial(self, root: bytes) -> None:
        for suffix in ("", ".idx", ".idx.tmp"):
            _unlink(self.partial_path(root).with_name(root.hex() + suffix))

    def keep_only(self, roots: Iterable[bytes]) -> int:
        """Remove every blob and partial neither in ``roots`` nor pinned; how many went."""
        gone = 0
        with self._lock:
            keep = set(roots) | set(self._pins)
            for root in self.roots():
                if root not in keep:
                    self.remove(root)
                    gone += 1
            for root in self.partial_roots():
                if root not in keep:
                    self.discard_partial(root)
                    gone += 1
        return gone

    # -- serve --

    def index_page(self, root: bytes, page: int) -> BlobIndexPage:
        hashes = self.index(root)
        size = self.size(root)
        if not 0 <= page < max(page_count(size), 1):
            raise BlobError(f"blob {root.hex()[:12]} has no index page {page}")
        step = index_page_hashes_max * hash_bytes
        return BlobIndexPage(size, hashes[page * step : (page + 1) * step])

    def read_chunk_sync(self, root: bytes, index: int) -> bytes:
        size = self.size(root)
        if not 0 <= index < chunk_count(size):
            raise BlobError(f"blob {root.hex()[:12]} has no chunk {index}")
        try:
            fd = os.open(self.path(root), os.O_RDONLY)
        except FileNotFoundError:
            raise BlobMissing(f"blob {root.hex()[:12]} is not in the store") from None
        try:
            return os.pread(fd, chunk_len(size, index), index * chunk_bytes)
        finally:
            os.close(fd)

    async def serve_index(self, root: bytes, page: int) -> bytes:
        """An encoded ``BlobIndexPage`` (the caller checked the scope)."""
        answer = await trio.to_thread.run_sync(self.index_page, root, page)
        return ledger.encode(answer)

    async def serve_chunk(self, root: bytes, index: int) -> bytes:
        """One chunk's bytes (the caller checked the scope)."""
        return await trio.to_thread.run_sync(self.read_chunk_sync, root, index)

    # -- fetch --

    async def fetch(
        self,
        root: bytes,
        size: int,
        ask_index: Callable[[int], Awaitable[bytes]],
        ask_chunk: Callable[[int], Awaitable[bytes]],
        *,
        retry_on: tuple[type[Exception], ...],
        attempts_max: int = fetch_attempts_max,
        size_max: int = blob_bytes_max,
        window: int = fetch_window,
        statistics: dict[str, int] | None = None,
    ) -> Path:
        """The blob ``root`` of ``size`` bytes in this store, fetched if it is not here yet:
        its path. ``ask_*`` raise one of ``retry_on`` for a failure worth retrying (a cut
        connection, a timeout). ``BlobMismatch`` (the peer sent bytes that are not the blob's;
        the partial is dropped), ``BlobDiskFull`` (nothing is left behind),
        ``BlobUnavailable`` (``attempts_max`` tries of one request failed, with a backoff of
        0.25 s doubling to 4 s between them; the partial stays for a resume)."""
        if not 0 <= size <= size_max:
            raise BlobMismatch(f"blob {root.hex()[:12]} of {size} bytes is over {size_max}")
        self.pin(root)  # no sweep takes the partial (or the blob) from under the fetch
        try:
            retry = _Retry(retry_on, attempts_max)
            return await self._fetch(root, size, ask_index, ask_chunk, retry, window, statistics)
        finally:
            self.unpin(root)

    async def _fetch(
        self,
        root: bytes,
        size: int,
        ask_index: Callable[[int], Awaitable[bytes]],
        ask_chunk: Callable[[int], Awaitable[bytes]],
        retry: _Retry,
        window: int,
        statistics: dict[str, int] | None,
    ) -> Path:
        if self.has(root):
            return self.path(root)
        stats = statistics if statistics is not None else {}
        partial = self.partial_path(root)
        have_bytes = partial.stat().st_size if partial.exists() else 0
        self.check_room(max(size - have_bytes, 0) + chunk_count(size) * hash_bytes)
        try:
            hashes = await self._fetch_index(root, size, ask_index, retry, stats)
            present = await trio.to_thread.run_sync(_prepare_partial, partial, size, hashes)
            stats["blob_chunks_resumed"] = stats.get("blob_chunks_resumed", 0) + sum(present)
            missing = [i for i, ok in enumerate(present) if not ok]
            fd = await trio.to_thread.run_sync(os.open, partial, os.O_WRONLY)
            try:
                await self._fetch_chunks(fd, size, hashes, missing, ask_chunk, retry, window, stats)
                await trio.to_thread.run_sync(os.fsync, fd)
            finally:
                os.close(fd)
            await trio.to_thread.run_sync(self._finish_fetch, root, hashes)
        except BlobMismatch:
            self.discard_partial(root)
            raise
        except OSError as exc:
            self.discard_partial(root)
            if exc.errno == errno.ENOSPC:
                raise BlobDiskFull(f"the disk filled up fetching blob {root.hex()[:12]}") from None
            raise BlobError(f"cannot write blob {root.hex()[:12]}: {exc.strerror}") from None
        return self.path(root)

    async def _fetch_index(
        self,
        root: bytes,
        size: int,
        ask_index: Callable[[int], Awaitable[bytes]],
        retry: _Retry,
        stats: dict[str, int],
    ) -> bytes:
        saved = self.partial_path(root).with_suffix(".idx")
        with contextlib.suppress(FileNotFoundError):
            hashes = saved.read_bytes()
            if len(hashes) == chunk_count(size) * hash_bytes and root_of(size, hashes) == root:
                return hashes
        parts: list[bytes] = []
        pages = page_count(size)
        for page in range(pages):
            data = await _with_retries(functools.partial(ask_index, page), retry, stats)
            try:
                answer = ledger.decode(BlobIndexPage, data, max_bytes=64 * 1024)
            except ledger.DecodeError as exc:
                raise BlobMismatch(f"blob {root.hex()[:12]}: malformed index page: {exc}") from None
            want = min(index_page_hashes_max, chunk_count(size) - page * index_page_hashes_max)
            if answer.size != size or len(answer.hashes) != want * hash_bytes:
                raise BlobMismatch(f"blob {root.hex()[:12]}: index page {page} is not as named")
            parts.append(answer.hashes)
        hashes = b"".join(parts)
        if root_of(size, hashes) != root:
            raise BlobMismatch(f"blob {root.hex()[:12]}: the index does not match the root")
        await trio.to_thread.run_sync(_write_synced, saved, hashes)
        return hashes

    async def _fetch_chunks(
        self,
        fd: int,
        size: int,
        hashes: bytes,
        missing: list[int],
        ask_chunk: Callable[[int], Awaitable[bytes]],
        retry: _Retry,
        window: int,
        stats: dict[str, int],
    ) -> None:
        todo = iter(missing)

        def store(index: int, data: bytes) -> None:
            want = hashes[index * hash_bytes : (index + 1) * hash_bytes]
            if len(data) != chunk_len(size, index) or hashlib.sha256(data).digest() != want:
                raise BlobMismatch(f"chunk {index} does not match its hash")
            os.pwrite(fd, data, index * chunk_bytes)

        failed: list[Exception] = []

        async def worker(nursery: trio.Nursery) -> None:
            try:
                for index in todo:
                    data = await _with_retries(functools.partial(ask_chunk, index), retry, stats)
                    await trio.to_thread.run_sync(store, index, data)
                    stats["blob_chunks_fetched"] = stats.get("blob_chunks_fetched", 0) + 1
            except (BlobError, OSError) as exc:
                # The first failure ends the fetch; the other workers stop with it (raised
                # below as itself, not wrapped in an exception group).
                failed.append(exc)
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for _ in range(max(1, min(window, len(missing)))):
                nursery.start_soon(worker, nursery)
        if failed:
            raise failed[0]

    def _finish_fetch(self, root: bytes, hashes: bytes) -> None:
        partial = self.partial_path(root)
        _write_synced(self.path(root).with_suffix(".idx"), hashes)
        os.chmod(partial, 0o400)
        os.replace(partial, self.path(root))
        _fsync_dir(self._data)
        _unlink(partial.with_suffix(".idx"))


def _roots_in(directory: Path) -> list[bytes]:
    found: set[bytes] = set()
    for entry in directory.iterdir():
        name = entry.name.split(".", 1)[0]
        if len(name) == 2 * hash_bytes:
            with contextlib.suppress(ValueError):
                found.add(bytes.fromhex(name))
    return sorted(found)


def _write_synced(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _hash_file(path: Path) -> tuple[bytes, int]:
    """The index and size of the file at ``path``."""
    parts = []
    size = 0
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(chunk_bytes):
            parts.append(hashlib.sha256(chunk).digest())
            size += len(chunk)
    return b"".join(parts), size


def _prepare_partial(partial: Path, size: int, hashes: bytes) -> list[bool]:
    """Open (or create, sparse) the partial file of a fetch: which chunks it already holds."""
    count = chunk_count(size)
    if not partial.exists():
        with open(partial, "wb") as handle:
            handle.truncate(size)
        return [False] * count
    present = []
    with open(partial, "r+b", buffering=0) as handle:
        if os.fstat(handle.fileno()).st_size != size:
            handle.truncate(size)
        for index in range(count):
            handle.seek(index * chunk_bytes)
            data = handle.read(chunk_len(size, index))
            want = hashes[index * hash_bytes : (index + 1) * hash_bytes]
            present.append(hashlib.sha256(data).digest() == want)
    return present


@dataclasses.dataclass(frozen=True)
class _Retry:
    on: tuple[type[Exception], ...]
    attempts_max: int


async def _with_retries(
    call: Callable[[], Awaitable[bytes]], retry: _Retry, stats: dict[str, int]
) -> bytes:
    delay = fetch_backoff_s
    last = ""
    for _ in range(max(retry.attempts_max, 1)):
        try:
            return await call()
        except retry.on as exc:
            last = str(exc) or type(exc).__name__
            stats["blob_retries"] = stats.get("blob_retries", 0) + 1
            await trio.sleep(delay)
            delay = min(delay * 2, fetch_backoff_s_max)
    raise BlobUnavailable(f"gave up after {retry.attempts_max} tries: {last}")
