"""Images over the mesh: the provider fetches a job's image blob by blob from the requester,
verified, bounded and resumable, into its store (its cache), and evicts unused ones."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

import compute
import ledger
from compute import testing
from compute.market import _imagemesh
from compute.market._imagemesh import (
    PROTOCOL_IMAGE_BLOB,
    ImageFetcher,
    describe_image,
    image_refusal,
    serve_image_blob,
)
from compute.market.exceptions import InvalidSubmission, MarketError, NetError
from compute.market.types import BlobRequest, ImageDescriptor, JobManifest

CI = os.environ.get("CI") == "true"
JOB = b"\x01" * 32
Serve = Callable[[bytes], Awaitable[bytes]]


@pytest.fixture
def base() -> Iterator[Path]:
    problems = [t for t in ("umoci", testing.BUSYBOX) if shutil.which(t) is None]
    if problems:
        if CI:
            pytest.fail(f"CI=true and images cannot be built here: {problems} missing")
        pytest.skip(f"{problems} missing")
    root = Path(tempfile.mkdtemp(prefix="gpumesh-imagemesh-", dir="/var/tmp"))
    yield root
    shutil.rmtree(root)


@dataclasses.dataclass
class FakeCtx:
    """What the fetcher uses of the market's Context: ``request`` and the counters."""

    serve: Serve
    counters: dict[str, int] = dataclasses.field(default_factory=dict)
    asks: list[BlobRequest] = dataclasses.field(default_factory=list)

    async def request(self, peer_id: str, protocol: str, payload: bytes) -> bytes:
        assert protocol == PROTOCOL_IMAGE_BLOB
        self.asks.append(ledger.decode(BlobRequest, payload))
        return await self.serve(payload)


def stores(base: Path) -> tuple[compute.ImageStore, compute.ImageStore, compute.Image]:
    requester = compute.ImageStore(base / "req", roots_dir=base / "req-roots")
    provider = compute.ImageStore(base / "prov", roots_dir=base / "prov-roots")
    archive = testing.write_docker_archive(base / "busybox.tar", testing.busybox_layers())
    return requester, provider, requester.import_archive(archive)


def honest(requester: compute.ImageStore, manifest: JobManifest) -> Serve:
    async def serve(payload: bytes) -> bytes:
        return await serve_image_blob(requester, manifest, ledger.decode(BlobRequest, payload))

    return serve


def fetcher(ctx: FakeCtx, provider: compute.ImageStore, **kw: int) -> ImageFetcher:
    return ImageFetcher(
        ctx,  # type: ignore[arg-type]
        provider,
        cache_bytes_max=kw.get("cache_bytes_max", 1 << 40),
        retry_s=0,
    )


def job_manifest(image: ImageDescriptor) -> JobManifest:
    return JobManifest(("true",), (), (), image)


async def test_a_fetched_image_is_the_requesters_and_a_second_job_hits_the_cache(
    base: Path,
) -> None:
    requester, provider, image = stores(base)
    descriptor = describe_image(requester, image.hex[:16])
    assert descriptor.manifest_sha256.hex() == image.hex
    manifest = job_manifest(descriptor)
    ctx = FakeCtx(honest(requester, manifest))
    ref = await fetcher(ctx, provider).ensure("peer", JOB, descriptor)
    assert ref == image.ref
    got = provider.get(ref)
    assert got.layers == image.layers and got.config == image.config
    assert got.origin == "mesh", "a fetched image is a cache entry"
    assert (provider.rootfs(ref) / testing.IMAGE_MARKER).read_text() == "inside the image\n"
    layer_bytes = sum(
        requester.blob_path(h.removeprefix("sha256:")).stat().st_size  # type: ignore[union-attr]
        for h in image.layers
    )
    assert layer_bytes > 1024 * 1024, "the test needs a layer of several chunks"
    assert ctx.counters["image_fetches"] == 1
    assert ctx.counters["image_blobs_fetched"] == 2 + len(image.layers)
    asked = len(ctx.asks)
    assert not list((provider.directory / "fetch").iterdir()), "the fetch directory is removed"

    again = await fetcher(ctx, provider).ensure("peer", JOB, descriptor)
    assert again == ref
    assert len(ctx.asks) == asked + 1, "a cached image is not fetched again (one chunk proves)"
    assert ctx.counters["image_cache_hits"] == 1 and ctx.counters["image_holder_checks"] == 1


async def test_a_cached_image_runs_only_for_a_requester_that_holds_it(base: Path) -> None:
    requester, provider, image = stores(base)
    descriptor = describe_image(requester, image.ref)
    manifest = job_manifest(descriptor)
    await fetcher(FakeCtx(honest(requester, manifest)), provider).ensure("a", JOB, descriptor)

    async def guess(payload: bytes) -> bytes:  # knows the digest, not the bytes
        return b"\0" * 1024 * 1024

    with pytest.raises(MarketError, match="does not hold image"):
        await fetcher(FakeCtx(guess), provider).ensure("b", JOB, descriptor)

    async def unable(payload: bytes) -> bytes:
        raise NetError("not a blob of this job's image")

    with pytest.raises(NetError, match="did not show it holds"):
        await fetcher(FakeCtx(unable), provider).ensure("b", JOB, descriptor)
    assert provider.has(image.ref), "the cached image stays for requesters that hold it"


async def test_a_blob_with_a_wrong_digest_is_refused_and_not_kept(base: Path) -> None:
    requester, provider, image = stores(base)
    descriptor = describe_image(requester, image.ref)
    serve = honest(requester, job_manifest(descriptor))
    layer = bytes.fromhex(image.layers[0].removeprefix("sha256:"))

    async def flip(payload: bytes) -> bytes:
        data = await serve(payload)
        ask = ledger.decode(BlobRequest, payload)
        if ask.sha256 == layer and ask.offset == 0:
            return bytes([data[0] ^ 1]) + data[1:]
        return data

    with pytest.raises(MarketError, match="does not match its sha256"):
        await fetcher(FakeCtx(flip), provider).ensure("peer", JOB, descriptor)
    assert not provider.has(image.ref)
    assert not list((provider.directory / "fetch").rglob(f"{layer.hex()}*")), "bad bytes kept"


async def test_oversized_blobs_and_understated_totals_are_refused(base: Path) -> None:
    requester, provider, image = stores(base)
    descriptor = describe_image(requester, image.ref)
    serve = honest(requester, job_manifest(descriptor))

    async def longer(payload: bytes) -> bytes:
        data = await serve(payload)
        ask = ledger.decode(BlobRequest, payload)
        return data + b"x" if ask.sha256.hex() == image.config_digest[7:] else data

    with pytest.raises(MarketError, match=r"is not \d+ bytes as stated"):
        await fetcher(FakeCtx(longer), provider).ensure("peer", JOB, descriptor)

    small = dataclasses.replace(descriptor, total_bytes=descriptor.manifest_bytes + 10)
    with pytest.raises(MarketError, match=r"blobs are \d+ bytes, not"):
        await fetcher(FakeCtx(serve), provider).ensure("peer", JOB, small)
    huge = dataclasses.replace(descriptor, total_bytes=provider.limits.archive_bytes_max + 1)
    assert "this node takes" in (image_refusal(huge, provider) or "")
    assert image_refusal(descriptor, None) == "this node runs no container images"
    assert not provider.has(image.ref)


async def test_a_missing_blob_fails_clearly_after_bounded_retries(base: Path) -> None:
    requester, provider, image = stores(base)
    descriptor = describe_image(requester, image.ref)
    layer = image.layers[-1].removeprefix("sha256:")
    requester.blob_path(layer).unlink()  # type: ignore[union-attr]
    ctx = FakeCtx(honest(requester, job_manifest(descriptor)))
    with pytest.raises(NetError, match="missing from the requester's store"):
        await fetcher(ctx, provider).ensure("peer", JOB, descriptor)
    assert not provider.has(image.ref)


@pytest.mark.parametrize("window", [1, _imagemesh.fetch_window])
async def test_a_cut_fetch_resumes_where_it_stopped(
    base: Path, window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_imagemesh, "fetch_window", window)
    requester = compute.ImageStore(base / "req", roots_dir=base / "req-roots")
    provider = compute.ImageStore(base / "prov", roots_dir=base / "prov-roots")
    big = hashlib.sha256(b"seed").digest() * (9 * 1024 * 1024 // 32 + 5)  # ten chunks
    layers = testing.busybox_layers(extra=[testing._entry("big.bin", big)])
    archive = testing.write_docker_archive(base / "big.tar", layers)
    image = requester.import_archive(archive)
    descriptor = describe_image(requester, image.ref)
    serve = honest(requester, job_manifest(descriptor))
    cut_at = 6 * 1024 * 1024
    cut = {"done": False}

    async def cutting(payload: bytes) -> bytes:
        ask = ledger.decode(BlobRequest, payload)
        if ask.offset == cut_at and not cut["done"]:
            cut["done"] = True
            raise NetError("connection reset")
        return await serve(payload)

    ctx = FakeCtx(cutting)
    await fetcher(ctx, provider).ensure("peer", JOB, descriptor)
    assert cut["done"], "no blob had a seventh chunk: the cut never happened"
    offsets = [(a.sha256, a.offset) for a in ctx.asks]
    repeated = {o for o in offsets if offsets.count(o) > 1}
    if window == 1:
        assert [o for _, o in repeated] == [cut_at], f"only the refused chunk again: {repeated}"
    else:  # what was in flight at the cut, or landed past a hole, is asked again: no more
        ahead = _imagemesh.fetch_lookahead_chunks
        assert 1 <= len(repeated) <= ahead, f"not resumed from the whole prefix: {repeated}"
        assert all(o > cut_at - ahead * 1024 * 1024 for _, o in repeated), repeated
    assert (provider.rootfs(image.ref) / "big.bin").read_bytes() == big


async def test_the_requester_serves_only_the_blobs_of_the_jobs_image(base: Path) -> None:
    requester, _, image = stores(base)
    descriptor = describe_image(requester, image.ref)
    manifest = job_manifest(descriptor)
    config = bytes.fromhex(image.config_digest[7:])
    assert await serve_image_blob(requester, manifest, BlobRequest(JOB, config, 0))
    with pytest.raises(NetError, match="not a blob of this job's image"):
        await serve_image_blob(requester, manifest, BlobRequest(JOB, b"\x02" * 32, 0))
    with pytest.raises(NetError, match="runs in no image"):
        await serve_image_blob(
            requester, JobManifest(("true",), (), ()), BlobRequest(JOB, config, 0)
        )
    with pytest.raises(InvalidSubmission, match="image import"):
        describe_image(requester, "0" * 16)
    requester.remove(image.ref)
    with pytest.raises(NetError, match="was removed"):
        await serve_image_blob(requester, manifest, BlobRequest(JOB, config, 0))


async def test_the_cache_evicts_unused_fetched_images_least_recently_used_first(
    base: Path,
) -> None:
    requester, provider, _ = stores(base)
    refs = []
    for i in range(3):
        extra = [testing._entry(f"etc/n{i}", f"{i}\n".encode())]
        archive = testing.write_docker_archive(
            base / f"b{i}.tar", testing.busybox_layers(extra=extra)
        )
        descriptor = describe_image(requester, requester.import_archive(archive).ref)
        ctx = FakeCtx(honest(requester, job_manifest(descriptor)))
        refs.append(await fetcher(ctx, provider).ensure("peer", JOB, descriptor))
    user = provider.import_archive(base / "busybox.tar")  # imported here: never evicted
    provider.touch(refs[0])  # now refs[1] is the least recently used
    pinned = provider.acquire(refs[1])[0]
    size = provider.held_bytes()
    removed = provider.evict(size - 1)
    assert [i.ref for i in removed] == [refs[2]], "the LRU unpinned fetched image goes first"
    provider.release(pinned)
    removed = provider.evict(0)
    assert {i.ref for i in removed} == {refs[0], refs[1]}
    assert [i.ref for i in provider.images()] == [user.ref], "a user's import is never evicted"


async def test_a_provider_with_a_registry_pulls_and_falls_back_to_the_requester(
    base: Path,
) -> None:
    requester, provider, image = stores(base)
    descriptor = describe_image(requester, image.ref)

    ctx = FakeCtx(honest(requester, job_manifest(descriptor)))
    # The requester's store is an OCI layout tagged by hex: a registry skopeo can read.
    registry = f"oci:{requester.directory}:{{hex}}"
    pulling = ImageFetcher(ctx, provider, cache_bytes_max=1 << 40, registry=registry)  # type: ignore[arg-type]
    if pulling.skopeo is None:
        if CI:
            pytest.fail("CI=true and skopeo is missing")
        pytest.skip("skopeo missing")
    assert await pulling.ensure("peer", JOB, descriptor) == image.ref
    assert ctx.counters["image_pulls"] == 1
    assert len(ctx.asks) == 1, "pulled: the requester only proves it holds the image"
    assert provider.get(image.ref).origin == "mesh"
    provider.remove(image.ref)

    # A registry without the image, and no skopeo at all: both fetch from the requester.
    ctx = FakeCtx(honest(requester, job_manifest(descriptor)))
    missing = ImageFetcher(  # type: ignore[arg-type]
        ctx, provider, cache_bytes_max=1 << 40, registry=f"oci:{base}/nowhere:{{hex}}", retry_s=0
    )
    assert await missing.ensure("peer", JOB, descriptor) == image.ref
    assert ctx.counters["image_pull_failures"] == 1 and ctx.counters["image_fetches"] == 1
    provider.remove(image.ref)
    missing.skopeo = None
    assert await missing.ensure("peer", JOB, descriptor) == image.ref
    assert ctx.counters["image_pull_failures"] == 2 and ctx.counters["image_fetches"] == 2


def test_a_resumed_partial_is_cut_back_to_its_whole_prefix(tmp_path: Path) -> None:
    mib = 1024 * 1024
    partial, mark = tmp_path / "x.part", tmp_path / "x.have"
    partial.write_bytes(b"a" * (3 * mib + 10))  # chunks past the prefix may have holes
    mark.write_text(str(2 * mib))
    assert _imagemesh._resume_point(partial, mark, 5 * mib) == 2 * mib
    assert partial.stat().st_size == 2 * mib
    mark.write_text(str(4 * mib))  # a mark past the file (a lost write): the file decides
    assert _imagemesh._resume_point(partial, mark, 5 * mib) == 2 * mib
    mark.write_text("garbage")
    assert _imagemesh._resume_point(partial, mark, 5 * mib) == 0
    assert _imagemesh._resume_point(tmp_path / "none.part", tmp_path / "none.have", 5) == 0


def test_image_jobs_go_only_to_offers_with_the_image_runtime() -> None:
    from compute.market import JobSubmission, Requirements, explain_unsatisfiable, fit_on_node
    from compute.market._checks import check_manifest
    from compute.market._imagemesh import with_image_runtime
    from compute.market.exceptions import InvalidManifest

    key = ledger.SigningKey(b"\x05" * 32)
    plain = testing.make_offer(key, chain_id="c", now_ms=1_000_000)
    images = testing.make_offer(
        key,
        chain_id="c",
        now_ms=1_000_000,
        config=compute.OfferConfig(runtimes=("bwrap", "bwrap-image")),
    )
    need = Requirements(gpus=1)
    sub = with_image_runtime(JobSubmission(argv=(), image="ab" * 8, requirements=need))
    assert sub.requirements.runtime == "bwrap-image"
    assert with_image_runtime(JobSubmission(argv=("true",))).requirements.runtime == ""
    why = explain_unsatisfiable([plain], sub.requirements, 10_000)
    assert why is not None and "bwrap-image runtime" in why, why
    assert explain_unsatisfiable([plain, images], sub.requirements, 10_000) is None
    with pytest.raises(ValueError, match="runtime"):
        Requirements(runtime="docker")
    allocator = compute.SlotAllocator(compute.read_inventory(simulate_gpus="RTX4090:1").gpus)
    assert fit_on_node(sub.requirements, allocator, compute.OfferConfig()) is None, "no bid"
    with_images = compute.OfferConfig(runtimes=("bwrap", "bwrap-image"))
    assert fit_on_node(sub.requirements, allocator, with_images) is not None
    descriptor = ImageDescriptor(b"\x03" * 32, 100, 1000)
    check_manifest(JobManifest((), (), (), descriptor), 0)  # the image's entrypoint runs
    with pytest.raises(InvalidManifest, match="arguments"):
        check_manifest(JobManifest((), (), ()), 0)
