"""Container images over the mesh: a job's image travels from the requester to the provider
blob by blob, into the provider's image store, which is its cache.

The requester names the image in the manifest (``ImageDescriptor``: the sha256 and size of the
OCI image manifest, and the total of its blobs) and demands the ``bwrap-image`` runtime in the
request, so only providers whose offer lists it bid. A provider that already holds the image
(its store is keyed by the manifest's digest) runs it at once. Otherwise it fetches the
manifest, then the config and every layer it does not hold yet (layers are shared between
images by digest), each over ``PROTOCOL_IMAGE_BLOB`` in ``chunk_bytes_max`` chunks into
``<store>/fetch/<manifest hex>/blobs/sha256/<hex>.part``, resuming from what is on disk after
a cut or a restart, bounded by the sizes the manifest states, and checked against its digest
before it is kept. The fetched OCI layout is then imported exactly as an archive is
(``ImageStore.import_layout``: every digest and diff_id checked again, unsafe entries refused,
unpacked by umoci), with origin ``mesh``: a cache entry that ``ImageStore.evict`` removes,
least recently used first and never while a job runs in it, once the store passes the
provider's ``cache_bytes_max``.

A provider configured with a registry (``[images] registry``: a skopeo source with ``{hex}``
for the manifest digest, e.g. ``docker://mirror.example/gpumesh@sha256:{hex}`` or
``oci:/srv/images:{hex}``) pulls a missing image from it first (``skopeo copy
--preserve-digests`` into an OCI layout, imported the same way); the digest pins the content,
so a registry can only fail, never substitute. Without skopeo, or when the pull fails, it
says why in the log and fetches from the requester as usual.

The requester serves only the blobs of the image of the job the asking peer was awarded
(``serve_image_blob``). An image the provider has without this requester sending it (cached
for another job, pulled, imported there) runs only once the requester has served one chunk,
at a random offset, that matches: knowing a digest does not let anyone run, and so read,
someone else's image. Transport is ``Context.request``, so the seeded simulation runs it too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from typing import TYPE_CHECKING, Any

import trio

import ledger
from compute.exceptions import ImageError, ImageNotFound, ImageRejected
from compute.market._transfers import read_chunk
from compute.market._wire import Mismatch
from compute.market.exceptions import InvalidSubmission, MarketError, NetError
from compute.market.types import BlobRequest, ImageDescriptor, chunk_bytes_max
from compute.types import RUNTIME_BWRAP_IMAGE

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from compute import ImageStore
    from compute.market._context import Context
    from compute.market._store import JobStore
    from compute.market.types import JobManifest, JobRecord, JobSubmission

log = logging.getLogger("gpumesh.compute.market.images")

PROTOCOL_IMAGE_BLOB = "/gpumesh/market/image-blob/1"
"""Provider -> requester: one chunk of one blob (manifest, config, layer) of a job's image."""
fetch_attempts_max = 5
fetch_retry_s = 0.5
fetch_window = 4
"""Chunk requests of one blob in flight (a peer serves 8 streams of ours at a time)."""
fetch_lookahead_chunks = 8
"""How far past the whole prefix chunks may be asked: what a cut can cost again."""
fetch_dirs_max = 16
"""Partial fetches kept for resuming; the oldest beyond this are removed."""
disk_headroom_factor = 3
"""Free disk a fetch needs: the blobs plus room for their unpacked root (gzip layers grow)."""
skopeo_timeout_s = 600.0
skopeo_error_chars_max = 500


def image_ref(image: ImageDescriptor) -> str:
    return f"sha256:{image.manifest_sha256.hex()}"


def with_image_runtime(sub: JobSubmission) -> JobSubmission:
    """A submission with an image demands the ``bwrap-image`` runtime of its provider."""
    if not sub.image or sub.requirements.runtime == RUNTIME_BWRAP_IMAGE:
        return sub
    requirements = dataclasses.replace(sub.requirements, runtime=RUNTIME_BWRAP_IMAGE)
    return dataclasses.replace(sub, requirements=requirements)


def describe_image(images: ImageStore | None, ref: str) -> ImageDescriptor:
    """The manifest's description of the requester's image ``ref``; ``InvalidSubmission`` if
    this node has no image store or no such image."""
    if images is None:
        raise InvalidSubmission("this node has no image store: it cannot submit image jobs")
    try:
        image = images.get(ref)
    except ImageNotFound as exc:
        raise InvalidSubmission(f"{exc} (import it first: gpumesh image import FILE)") from None
    manifest = images.blob_path(image.hex)
    if manifest is None:
        raise InvalidSubmission(f"image {image.ref} has lost its manifest blob")
    return ImageDescriptor(
        manifest_sha256=bytes.fromhex(image.hex),
        manifest_bytes=manifest.stat().st_size,
        total_bytes=image.blob_bytes,
    )


def image_refusal(image: ImageDescriptor | None, images: ImageStore | None) -> str | None:
    """Why this provider cannot take a job in ``image`` (checked on the award), or None."""
    if image is None:
        return None
    if images is None:
        return "this node runs no container images"
    limits = images.limits
    if len(image.manifest_sha256) != 32:
        return "the image's manifest digest is not 32 bytes"
    if not 0 < image.manifest_bytes <= limits.json_bytes_max:
        return f"the image manifest must be 1..{limits.json_bytes_max} bytes"
    if image.total_bytes < image.manifest_bytes:
        return "the image's total size is less than its manifest's"
    if image.total_bytes > limits.archive_bytes_max:
        return f"the image is {image.total_bytes} bytes; this node takes {limits.archive_bytes_max}"
    return None


async def serve_image_blob(
    images: ImageStore | None, manifest: JobManifest | None, ask: BlobRequest
) -> bytes:
    """One chunk of a blob of the job's image (requester side): only that image's blobs."""
    if manifest is None or manifest.image is None:
        raise NetError("this job runs in no image")
    if images is None:
        raise NetError("this node has no image store")
    ref = image_ref(manifest.image)
    try:
        image = await trio.to_thread.run_sync(images.get, ref)
    except ImageNotFound:
        raise NetError(f"image {ref} was removed from the requester's store") from None
    hex_ = ask.sha256.hex()
    if hex_ not in images.blob_hexes(image):
        raise NetError("not a blob of this job's image")
    path = images.blob_path(hex_)
    if path is None:
        raise NetError(f"blob {hex_[:12]} of image {ref} is missing from the requester's store")
    if ask.offset < 0:
        raise NetError("negative offset")
    return await read_chunk(path, ask.offset)


def images_in_use(records: Iterable[JobRecord], store: JobStore) -> dict[str, int]:
    """Image hex -> how many unfinished jobs of ``records`` run in it (a requester must not
    remove an image its providers may still fetch)."""
    using: dict[str, int] = {}
    for record in records:
        if record.state.terminal:
            continue
        manifest = store.manifest(record.job_id)
        if manifest is not None and manifest.image is not None:
            hex_ = manifest.image.manifest_sha256.hex()
            using[hex_] = using.get(hex_, 0) + 1
    return using


@dataclasses.dataclass(frozen=True)
class _Blob:
    hex: str
    size: int


def _descriptor(doc: Any, what: str, size_max: int) -> _Blob:
    if not isinstance(doc, dict):
        raise Mismatch(f"the image manifest's {what} is not a descriptor")
    digest, size = doc.get("digest"), doc.get("size")
    match = re.fullmatch(r"sha256:([0-9a-f]{64})", digest) if isinstance(digest, str) else None
    if match is None:
        raise Mismatch(f"the image manifest's {what} digest is not sha256:<hex>")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= size_max:
        raise Mismatch(f"the image manifest's {what} size is not 0..{size_max}")
    return _Blob(match.group(1), size)


class ImageFetcher:
    """The provider's side: make the job's image present in its store, fetching what lacks."""

    def __init__(
        self,
        ctx: Context,
        images: ImageStore | None,
        *,
        cache_bytes_max: int,
        registry: str = "",
        retry_s: float = fetch_retry_s,
    ) -> None:
        self.ctx = ctx
        self.images = images
        self.cache_bytes_max = cache_bytes_max
        self.registry = registry
        self.skopeo = shutil.which("skopeo") if registry else None
        self.retry_s = retry_s
        self._fetching: dict[str, trio.Event] = {}

    def _count(self, name: str, amount: int = 1) -> None:
        self.ctx.counters[name] = self.ctx.counters.get(name, 0) + amount

    async def ensure(self, peer: str, job_id: bytes, image: ImageDescriptor) -> str:
        """The store's reference of ``image``, fetched from ``peer`` (the requester of
        ``job_id``) unless it is cached. ``MarketError`` when it cannot be had."""
        images = self.images
        why = image_refusal(image, images)
        if why is not None:
            raise MarketError(why)
        assert images is not None
        ref = image_ref(image)
        hex_ = image.manifest_sha256.hex()
        while True:
            if await trio.to_thread.run_sync(images.has, ref):
                try:
                    await self._check_holder(peer, job_id, ref, images)
                    await trio.to_thread.run_sync(images.touch, ref)
                except ImageNotFound:
                    continue  # evicted for another fetch meanwhile: fetch it again
                self._count("image_cache_hits")
                return ref
            busy = self._fetching.get(hex_)
            if busy is None:
                break
            await busy.wait()  # another job fetches the same image: then it is cached
        done = self._fetching[hex_] = trio.Event()
        try:
            if self.registry and await self._pull(image, images):
                await self._check_holder(peer, job_id, ref, images)
            else:
                await self._fetch(peer, job_id, image, images)
                self._count("image_fetches")
        finally:
            del self._fetching[hex_]
            done.set()
        return ref

    async def _check_holder(self, peer: str, job_id: bytes, ref: str, images: ImageStore) -> None:
        """An image this node has without ``peer`` sending it (cached for another job, pulled,
        imported here) runs only for a requester that holds it: knowing a digest must not let
        anyone run (and read) someone else's image. ``peer`` serves one chunk, at a random
        offset of the image's largest blob, that must equal ours."""
        image = await trio.to_thread.run_sync(images.get, ref)
        sizes = {}
        for hex_ in (*(h.removeprefix("sha256:") for h in image.layers), image.config_digest[7:]):
            path = images.blob_path(hex_)
            if path is not None:
                sizes[hex_] = path.stat().st_size
        if not sizes:
            raise ImageNotFound(f"image {ref[:19]} has lost its blobs here")
        hex_ = max(sizes, key=lambda h: (sizes[h], h))
        chunks = max((sizes[hex_] + chunk_bytes_max - 1) // chunk_bytes_max, 1)
        offset = secrets.randbelow(chunks) * chunk_bytes_max
        path = images.blob_path(hex_)
        if path is None:
            raise ImageNotFound(f"image {ref[:19]} was evicted")
        ours = await read_chunk(path, offset)
        ask = ledger.encode(BlobRequest(job_id, bytes.fromhex(hex_), offset))
        last = ""
        for _ in range(fetch_attempts_max):
            try:
                theirs = await self.ctx.request(peer, PROTOCOL_IMAGE_BLOB, ask)
            except NetError as exc:
                last = str(exc)
                await trio.sleep(self.retry_s)
                continue
            if theirs != ours:
                break
            self._count("image_holder_checks")
            return
        else:
            raise NetError(f"the requester did not show it holds image {ref[:19]}: {last}")
        raise MarketError(f"the requester does not hold image {ref[:19]}, which it names")

    async def _make_room(self, images: ImageStore, need: int, keep: str) -> None:
        """Evict cached images so ``need`` more bytes (blobs and root) fit the cache."""
        target = max(self.cache_bytes_max - need, 0)
        await trio.to_thread.run_sync(lambda: images.evict(target, keep=frozenset({keep})))

    async def _pull(self, image: ImageDescriptor, images: ImageStore) -> bool:
        """The image from the configured registry; False (and why, in the log) if not."""
        hex_ = image.manifest_sha256.hex()
        if self.skopeo is None:
            log.warning(
                "[images] registry is set but skopeo is not installed (apt-get install "
                "skopeo): image %s is fetched from the requester",
                hex_[:12],
            )
            self._count("image_pull_failures")
            return False
        source = self.registry.replace("{hex}", hex_)
        root = images.directory / "pull" / hex_
        await trio.to_thread.run_sync(shutil.rmtree, root, True)
        root.mkdir(parents=True, mode=0o700)
        await self._make_room(images, image.total_bytes * 2, hex_)
        argv = [self.skopeo, "copy", "--preserve-digests", "--quiet", source, f"oci:{root}:image"]
        why = ""
        try:
            # A process trio kills when the job is cancelled (a stalled registry must not
            # hold a job past its deadline), and at skopeo_timeout_s in any case.
            done = None
            with trio.move_on_after(skopeo_timeout_s):
                done = await trio.run_process(
                    argv, stdin=b"", capture_stdout=True, capture_stderr=True, check=False
                )
            if done is None:
                raise TimeoutError(f"skopeo took over {skopeo_timeout_s:.0f} s")
            if done.returncode != 0:
                tail = done.stderr[-skopeo_error_chars_max:].decode(errors="replace").strip()
                why = f"skopeo exited {done.returncode}: {tail}"
            else:
                index = json.loads((root / "index.json").read_bytes())
                digests = [m.get("digest") for m in index.get("manifests") or ()]
                if digests != [image_ref(image)]:
                    why = f"the registry gave manifest(s) {digests}, not {image_ref(image)}"
                else:
                    await trio.to_thread.run_sync(images.import_layout, root)
        except (OSError, ValueError, AttributeError) as exc:
            why = f"{type(exc).__name__}: {exc}"
        except ImageError as exc:
            why = f"the pulled image is not acceptable: {exc}"
        finally:
            await trio.to_thread.run_sync(shutil.rmtree, root, True)
        if why:
            log.warning(
                "pulling image %s from %s failed (%s): fetching it from the requester",
                hex_[:12],
                source,
                why,
            )
            self._count("image_pull_failures")
            return False
        self._count("image_pulls")
        log.info("image %s pulled from %s", hex_[:12], source)
        return True

    async def _fetch(
        self, peer: str, job_id: bytes, image: ImageDescriptor, images: ImageStore
    ) -> None:
        hex_ = image.manifest_sha256.hex()
        root = images.directory / "fetch" / hex_
        blobs = root / "blobs" / "sha256"
        await trio.to_thread.run_sync(self._prune_fetch_dirs, images.directory / "fetch", hex_)
        blobs.mkdir(parents=True, exist_ok=True, mode=0o700)
        started_s = trio.current_time()
        bytes_before = self.ctx.counters.get("image_bytes_fetched", 0)
        last = ""
        for _ in range(fetch_attempts_max):
            try:
                await self._fetch_blobs(peer, job_id, image, images, blobs)
                break
            except NetError as exc:
                last = str(exc)
                await trio.sleep(self.retry_s)
            except Mismatch as exc:
                raise MarketError(f"bad image from the requester: {exc}") from exc
        else:
            raise NetError(f"cannot fetch the job's image {image_ref(image)[:19]}: {last}")
        moved = self.ctx.counters.get("image_bytes_fetched", 0) - bytes_before
        fetch_s = trio.current_time() - started_s
        (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": image_ref(image),
                    "size": image.manifest_bytes,
                }
            ],
        }
        (root / "index.json").write_text(json.dumps(index))
        try:
            await trio.to_thread.run_sync(images.import_layout, root)
        except ImageRejected as exc:
            await trio.to_thread.run_sync(shutil.rmtree, root, True)
            raise MarketError(f"the job's image is not acceptable: {exc}") from exc
        except ImageError as exc:
            raise MarketError(f"the job's image cannot be unpacked here: {exc}") from exc
        await trio.to_thread.run_sync(shutil.rmtree, root, True)
        log.info(
            "image %s fetched from %s: %d bytes in %.2f s (%.1f MiB/s), unpacked in %.2f s",
            hex_[:12],
            peer,
            moved,
            fetch_s,
            moved / max(fetch_s, 1e-6) / 2**20,
            trio.current_time() - started_s - fetch_s,
        )

    async def _fetch_blobs(
        self,
        peer: str,
        job_id: bytes,
        image: ImageDescriptor,
        images: ImageStore,
        blobs: Path,
    ) -> None:
        limits = images.limits
        manifest_blob = _Blob(image.manifest_sha256.hex(), image.manifest_bytes)
        path = await self._fetch_blob(peer, job_id, manifest_blob, blobs)
        try:
            doc = json.loads(path.read_bytes())
        except ValueError as exc:
            raise Mismatch(f"the image manifest is not JSON: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("layers"), list):
            raise Mismatch("the image manifest has no list of layers")
        if len(doc["layers"]) > limits.layers_max:
            raise Mismatch(f"the image has over {limits.layers_max} layers")
        config = _descriptor(doc.get("config"), "config", limits.json_bytes_max)
        wanted = {config.hex: config}
        for i, layer in enumerate(doc["layers"]):
            blob = _descriptor(layer, f"layer {i}", limits.archive_bytes_max)
            wanted.setdefault(blob.hex, blob)
        total = manifest_blob.size + sum(b.size for b in wanted.values())
        if total > image.total_bytes:
            raise Mismatch(f"the image's blobs are {total} bytes, not {image.total_bytes}")
        missing = [b for b in wanted.values() if images.blob_path(b.hex) is None]
        need = sum(b.size for b in missing)
        await self._make_room(images, need * 2, manifest_blob.hex)
        free = (await trio.to_thread.run_sync(shutil.disk_usage, blobs)).free
        if free < need * disk_headroom_factor:
            raise MarketError(
                f"the image needs about {need * disk_headroom_factor} bytes of disk, "
                f"{free} are free"
            )
        self._count("image_blobs_cached", len(wanted) - len(missing))
        for blob in missing:
            await self._fetch_blob(peer, job_id, blob, blobs)

    async def _fetch_blob(self, peer: str, job_id: bytes, blob: _Blob, blobs: Path) -> Path:
        """``blob`` into ``blobs/<hex>``: ``fetch_window`` chunk requests in flight, each chunk
        written at its offset in ``<hex>.part``; ``<hex>.have`` records the prefix that is
        whole on disk, where a later try resumes (chunks past it are asked again, at most
        ``fetch_lookahead_chunks``). Checked against the digest, then renamed."""
        final = blobs / blob.hex
        if final.is_file() and final.stat().st_size == blob.size:
            return final  # fetched and checked by an earlier try
        partial = blobs / f"{blob.hex}.part"
        mark = blobs / f"{blob.hex}.have"
        have = await trio.to_thread.run_sync(_resume_point, partial, mark, blob.size)
        digest = bytes.fromhex(blob.hex)
        window = _Window(have, blob.size, fetch_lookahead_chunks * chunk_bytes_max)
        written = have
        marking = trio.Lock()
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT, 0o600)
        try:

            async def worker() -> None:
                nonlocal written
                while (offset := await window.take()) is not None:
                    ask = ledger.encode(BlobRequest(job_id, digest, offset))
                    chunk = await self.ctx.request(peer, PROTOCOL_IMAGE_BLOB, ask)
                    if len(chunk) != min(chunk_bytes_max, blob.size - offset):
                        raise Mismatch(
                            f"image blob {blob.hex[:12]} is not {blob.size} bytes as stated"
                        )
                    await trio.to_thread.run_sync(os.pwrite, fd, chunk, offset)
                    self._count("image_bytes_fetched", len(chunk))
                    if window.land(offset):
                        async with marking:  # one writer; the newest prefix wins
                            if window.prefix > written:
                                written = window.prefix
                                await trio.to_thread.run_sync(_write_mark, mark, written)

            try:
                async with trio.open_nursery() as nursery:
                    for _ in range(fetch_window):
                        nursery.start_soon(worker)
            except BaseExceptionGroup as group:
                known, other = group.split((Mismatch, NetError))
                if other is not None or known is None:
                    raise  # cancellation and bugs pass as they are
                leaves = _leaves(known)
                bad = [e for e in leaves if isinstance(e, Mismatch)]
                if bad:
                    await trio.to_thread.run_sync(_discard, partial, mark)
                    raise bad[0] from None
                raise leaves[0] from None  # the next try resumes from the mark
        finally:
            os.close(fd)
        got = await trio.to_thread.run_sync(_sha256_hex, partial)
        if got != blob.hex:
            await trio.to_thread.run_sync(_discard, partial, mark)
            raise Mismatch(f"image blob {blob.hex[:12]} does not match its sha256")
        partial.rename(final)
        mark.unlink(missing_ok=True)
        self._count("image_blobs_fetched")
        return final

    @staticmethod
    def _prune_fetch_dirs(directory: Path, current: str) -> None:
        try:
            entries = sorted(
                (p for p in directory.iterdir() if p.name != current),
                key=lambda p: p.stat().st_mtime_ns,
            )
        except FileNotFoundError:
            return
        for old in entries[: max(len(entries) - fetch_dirs_max + 1, 0)]:
            shutil.rmtree(old, ignore_errors=True)


class _Window:
    """The chunks of one blob fetch: hands out offsets at most ``lookahead_bytes`` past the
    prefix that is whole on disk (so a cut costs at most that much again), and tracks it."""

    def __init__(self, start: int, size: int, lookahead_bytes: int) -> None:
        self.prefix = start
        self._next = start
        self._size = size
        self._lookahead = lookahead_bytes
        self._landed: set[int] = set()
        self._moved = trio.Event()

    async def take(self) -> int | None:
        """The next chunk's offset to ask for (waits while too far ahead); None: all asked."""
        while self._next < self._size:
            if self._next < self.prefix + self._lookahead:
                offset = self._next
                self._next += chunk_bytes_max
                return offset
            await self._moved.wait()
        return None

    def land(self, offset: int) -> bool:
        """Chunk ``offset`` is on disk; whether the whole prefix grew."""
        self._landed.add(offset)
        old = self.prefix
        while self.prefix in self._landed:
            self._landed.discard(self.prefix)
            self.prefix = min(self.prefix + chunk_bytes_max, self._size)
        if self.prefix == old:
            return False
        self._moved.set()
        self._moved = trio.Event()
        return True


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def _resume_point(partial: Path, mark: Path, size: int) -> int:
    """Where a fetch of ``partial`` resumes: the whole prefix its mark records (chunks past
    it may have holes and are fetched again); the file is cut back to it."""
    try:
        have = int(mark.read_text() or 0)
    except (FileNotFoundError, ValueError):
        have = 0
    try:
        length = partial.stat().st_size
    except FileNotFoundError:
        length = 0
    have = max(0, min(have, length, size))
    have -= have % chunk_bytes_max if have < size else 0
    if length != have:
        with open(partial, "ab") as handle:
            handle.truncate(have)
    return have


def _write_mark(mark: Path, have: int) -> None:
    tmp = mark.with_suffix(".tmp")
    tmp.write_text(str(have))
    tmp.rename(mark)


def _discard(partial: Path, mark: Path) -> None:
    partial.unlink(missing_ok=True)
    mark.unlink(missing_ok=True)


def _sha256_hex(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes_max):
            hasher.update(chunk)
    return hasher.hexdigest()
