"""The blob format, store and fetch (compute/market/_blobs.py): a served store and a fetching
store in one trio run, with a transport that can cut, corrupt and lie."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import ledger
from compute._files import clone_file
from compute._sandbox import JobSpec
from compute.exceptions import JobSpecError
from compute.market import _blobs
from compute.market._blobs import (
    BlobDiskFull,
    BlobIndexAsk,
    BlobIndexPage,
    BlobMismatch,
    BlobStore,
    BlobUnavailable,
    blob_root,
    chunk_bytes,
    root_of,
)

MIB = 1024 * 1024


class Cut(Exception):
    """The fake transport's dropped connection (retried by the fetch)."""


class Link:
    """Asks of one fetch, answered by ``server``; faults are switched on per test."""

    def __init__(self, server: BlobStore, root: bytes) -> None:
        self.server = server
        self.root = root
        self.chunks_asked: list[int] = []
        self.cut_after: int | None = None
        """Chunk asks answered before the link goes down for good."""
        self.flaky: set[int] = set()
        """Chunks whose first ask fails (a cut that the retry heals)."""
        self.corrupt: set[int] = set()
        self.index_override: bytes | None = None

    async def index(self, page: int) -> bytes:
        if self.index_override is not None:
            return self.index_override
        return await self.server.serve_index(self.root, page)

    async def chunk(self, index: int) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.cut_after is not None and len(self.chunks_asked) >= self.cut_after:
            raise Cut("connection cut")
        if index in self.flaky:
            self.flaky.discard(index)
            raise Cut("stream reset")
        self.chunks_asked.append(index)
        data = await self.server.serve_chunk(self.root, index)
        if index in self.corrupt:
            data = bytes([data[0] ^ 1]) + data[1:]
        return data


def payload(size: int, seed: int = 1) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}/{counter}".encode()).digest() * 1024
        counter += 1
    return bytes(out[:size])


def contents(path: object) -> bytes:
    return Path(str(path)).read_bytes()


def tear(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"torn")


def fetch(store: BlobStore, link: Link, size: int, **kw: object) -> object:
    return store.fetch(
        link.root,
        size,
        link.index,
        link.chunk,
        retry_on=(Cut,),
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_blobs, "fetch_backoff_s", 0.001)
    monkeypatch.setattr(_blobs, "fetch_backoff_s_max", 0.002)


def test_root_format_is_as_documented() -> None:
    data = payload(2 * chunk_bytes + 5)
    hashes = b"".join(
        hashlib.sha256(data[i : i + chunk_bytes]).digest() for i in range(0, len(data), chunk_bytes)
    )
    head = b"gpumesh-blob/1\0" + len(data).to_bytes(8, "big") + chunk_bytes.to_bytes(4, "big")
    assert blob_root(data) == hashlib.sha256(head + hashes).digest()
    assert root_of(0, b"") == hashlib.sha256(b"gpumesh-blob/1\0" + bytes(8) + head[-4:]).digest()
    assert blob_root(data) != blob_root(data + b"\0"), "the size is part of the root"


async def test_put_path_then_fetch_is_byte_identical(tmp_path: Path) -> None:
    source = tmp_path / "in.bin"
    data = payload(3 * chunk_bytes + 123)
    source.write_bytes(data)
    server = BlobStore(tmp_path / "a")
    root, size = await server.put_path(source)
    assert (root, size) == (blob_root(data), len(data))
    source.write_bytes(b"changed after the put")
    assert server.path(root).read_bytes() == data, "the store holds a copy, not a link"
    client = BlobStore(tmp_path / "b")
    link = Link(server, root)
    path = await fetch(client, link, size)
    assert contents(path) == data
    assert sorted(link.chunks_asked) == [0, 1, 2, 3]
    assert client.partial_roots() == [], "the partial was renamed into place"
    again = Link(server, root)
    await fetch(client, again, size)
    assert again.chunks_asked == [], "a blob already here is not fetched again"


async def test_empty_blob(tmp_path: Path) -> None:
    server = BlobStore(tmp_path / "a")
    root = server.put_bytes(b"")
    path = await fetch(BlobStore(tmp_path / "b"), Link(server, root), 0)
    assert contents(path) == b""


async def test_corrupt_chunk_is_refused_and_nothing_left(tmp_path: Path) -> None:
    server = BlobStore(tmp_path / "a")
    data = payload(3 * chunk_bytes)
    root = server.put_bytes(data)
    client = BlobStore(tmp_path / "b")
    link = Link(server, root)
    link.corrupt = {1}
    with pytest.raises(BlobMismatch, match="chunk 1"):
        await fetch(client, link, len(data))
    assert not client.has(root)
    assert client.partial_roots() == [], "a bad peer's partial is dropped"


async def test_wrong_index_is_refused_before_any_chunk(tmp_path: Path) -> None:
    server = BlobStore(tmp_path / "a")
    data = payload(2 * chunk_bytes)
    root = server.put_bytes(data)
    other = blob_root(payload(2 * chunk_bytes, seed=2))
    link = Link(server, root)
    link.index_override = ledger.encode(BlobIndexPage(len(data), _blobs.index_of_bytes(data[::-1])))
    with pytest.raises(BlobMismatch, match="does not match the root"):
        await fetch(BlobStore(tmp_path / "b"), link, len(data))
    assert link.chunks_asked == []
    link.index_override = b"\x00garbage"
    with pytest.raises(BlobMismatch, match="malformed"):
        await fetch(BlobStore(tmp_path / "c"), link, len(data))
    # A size that is not the blob's: the index cannot match the root either.
    with pytest.raises(BlobMismatch):
        await fetch(BlobStore(tmp_path / "d"), Link(server, root), len(data) + 1)
    assert other != root


async def test_oversize_is_refused(tmp_path: Path) -> None:
    server = BlobStore(tmp_path / "a")
    root = server.put_bytes(payload(2 * chunk_bytes))
    link = Link(server, root)
    with pytest.raises(BlobMismatch, match="over"):
        await fetch(BlobStore(tmp_path / "b"), link, 2 * chunk_bytes, size_max=chunk_bytes)
    assert link.chunks_asked == []


async def test_flaky_link_heals_with_retries(tmp_path: Path) -> None:
    server = BlobStore(tmp_path / "a")
    data = payload(5 * chunk_bytes)
    root = server.put_bytes(data)
    link = Link(server, root)
    link.flaky = {0, 2, 4}
    stats: dict[str, int] = {}
    path = await fetch(BlobStore(tmp_path / "b"), link, len(data), statistics=stats)
    assert contents(path) == data
    assert stats["blob_retries"] == 3


async def test_resume_after_a_cut(tmp_path: Path) -> None:
    server = BlobStore(tmp_path / "a")
    data = payload(6 * chunk_bytes + 7)
    root = server.put_bytes(data)
    client = BlobStore(tmp_path / "b")
    link = Link(server, root)
    link.cut_after = 3
    with pytest.raises(BlobUnavailable, match="connection cut"):
        await fetch(client, link, len(data), window=1)
    assert client.partial_roots() == [root], "the partial is kept for a resume"
    link2 = Link(server, root)
    stats: dict[str, int] = {}
    path = await fetch(client, link2, len(data), statistics=stats)
    assert contents(path) == data
    assert sorted(link2.chunks_asked) == [3, 4, 5, 6], "only the chunks not yet here"
    assert stats["blob_chunks_resumed"] == 3


async def test_resume_after_a_restart_of_both_sides(tmp_path: Path) -> None:
    server = BlobStore(tmp_path / "a")
    data = payload(4 * chunk_bytes)
    root = server.put_bytes(data)
    client = BlobStore(tmp_path / "b")
    link = Link(server, root)
    link.cut_after = 2
    with pytest.raises(BlobUnavailable):
        await fetch(client, link, len(data), window=1)
    # A chunk torn by the crash: it no longer hashes right and is fetched again.
    tear(client.partial_path(root), 10)
    server2, client2 = BlobStore(tmp_path / "a"), BlobStore(tmp_path / "b")
    link2 = Link(server2, root)
    path = await fetch(client2, link2, len(data))
    assert contents(path) == data
    assert sorted(link2.chunks_asked) == [0, 2, 3]


async def test_disk_full_is_refused_before_fetching(tmp_path: Path) -> None:
    server = BlobStore(tmp_path / "a")
    data = payload(2 * chunk_bytes)
    root = server.put_bytes(data)
    client = BlobStore(tmp_path / "b", free_bytes=lambda: 10 * MIB)
    link = Link(server, root)
    with pytest.raises(BlobDiskFull, match="not enough disk"):
        await fetch(client, link, len(data))
    assert link.chunks_asked == []
    assert client.partial_roots() == []
    with pytest.raises(BlobDiskFull):
        await client.put_path(server.path(root))
    assert list((tmp_path / "b" / "tmp").iterdir()) == []


async def test_enospc_mid_fetch_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = BlobStore(tmp_path / "a")
    data = payload(3 * chunk_bytes)
    root = server.put_bytes(data)
    client = BlobStore(tmp_path / "b")
    real = os.pwrite
    calls = []

    def full(fd: int, buf: bytes, offset: int) -> int:
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(fd, buf, offset)

    monkeypatch.setattr(_blobs.os, "pwrite", full)
    with pytest.raises(BlobDiskFull, match="filled up"):
        await fetch(client, Link(server, root), len(data), window=1)
    assert not client.has(root)
    assert client.partial_roots() == []


async def test_keep_only_sweeps_blobs_and_partials(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "a")
    keep = store.put_bytes(b"keep")
    drop = store.put_bytes(b"drop")
    held = store.put_bytes(b"held")
    for root in (keep, drop):
        store.unpin(root)
    store.partial_path(blob_root(b"x")).write_bytes(b"half")
    assert store.keep_only([keep]) == 2
    assert store.has(keep) and not store.has(drop)
    assert store.has(held), "a put not yet named by anything is pinned through a sweep"
    assert store.partial_roots() == []
    store.unpin(held)
    assert store.keep_only([]) == 2


def test_clone_file_is_a_copy_not_a_link(tmp_path: Path) -> None:
    source = tmp_path / "blob"
    source.write_bytes(b"node's copy")
    target = tmp_path / "job-input"
    clone_file(source, target)
    assert target.read_bytes() == b"node's copy"
    assert os.stat(source).st_ino != os.stat(target).st_ino
    target.write_bytes(b"the job wrote here")
    assert source.read_bytes() == b"node's copy", "a job's write reached the node's blob"
    with pytest.raises(FileExistsError):
        clone_file(source, target)


def test_job_spec_input_files_are_checked_like_inline_inputs() -> None:
    JobSpec(("true",), input_files=(("data/a.bin", "/var/blobs/x"),)).validate()
    for bad in (
        (("../a", "/var/blobs/x"),),
        (("a", "relative/path"),),
        (("a", "/x"), ("a", "/y")),
    ):
        with pytest.raises(JobSpecError):
            JobSpec(("true",), input_files=bad).validate()
    with pytest.raises(JobSpecError, match="twice"):
        JobSpec(("true",), inputs=(("a", b""),), input_files=(("a", "/x"),)).validate()


async def test_the_index_comes_in_pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_blobs, "index_page_hashes_max", 2)
    server = BlobStore(tmp_path / "a")
    data = payload(5 * chunk_bytes + 1)
    root = server.put_bytes(data)
    pages = []
    link = Link(server, root)

    async def index(page: int) -> bytes:
        pages.append(page)
        return await server.serve_index(root, page)

    link.index = index  # type: ignore[method-assign]
    path = await fetch(BlobStore(tmp_path / "b"), link, len(data))
    assert contents(path) == data
    assert pages == [0, 1, 2], "six chunk hashes in pages of two"
    with pytest.raises(_blobs.BlobError, match="no index page 3"):
        server.index_page(root, 3)


def test_a_sweep_takes_what_a_crash_left_behind(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "a")
    root = blob_root(b"y")
    (tmp_path / "a" / "partial" / f"{root.hex()}.idx").write_bytes(b"\0" * 32)
    other = blob_root(b"z")
    (tmp_path / "a" / "data" / f"{other.hex()}.idx.tmp").write_bytes(b"half an index")
    (tmp_path / "a" / "tmp" / "put-1-x").write_bytes(b"half a copy")
    store = BlobStore(tmp_path / "a")
    assert list((tmp_path / "a" / "tmp").iterdir()) == [], "a reopened store empties tmp/"
    assert store.keep_only([]) == 2
    assert list((tmp_path / "a" / "partial").iterdir()) == []
    assert list((tmp_path / "a" / "data").iterdir()) == []


async def test_only_regular_files_are_put(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "a")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path, tmp_path / "missing"):
        with pytest.raises(_blobs.BlobError, match=r"not a regular file|cannot read"):
            await store.put_path(path)


@given(
    scope=st.binary(max_size=40),
    root=st.binary(min_size=32, max_size=32),
    number=st.integers(0, 2**40),
    hashes=st.binary(max_size=320),
)
def test_blob_messages_round_trip(scope: bytes, root: bytes, number: int, hashes: bytes) -> None:
    for message in (
        BlobIndexAsk(scope, root, number),
        _blobs.BlobChunkAsk(scope, root, number),
        BlobIndexPage(number, hashes),
    ):
        data = ledger.encode(message)
        assert ledger.decode(type(message), data) == message, f"{message} must round-trip"
