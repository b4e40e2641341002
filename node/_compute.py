"""The node's compute side: inventory, slots, sandbox, offer gossip and the offer directory."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

import compute
from compute import market
from node._json import to_json
from p2p import P2PError
from rpc import INTERNAL_ERROR, INVALID_PARAMS, SERVER_BUSY, Param, Result, RpcError

if TYPE_CHECKING:
    from collections.abc import Callable

    from trio_typing import TaskStatus

    from ledger import SigningKey
    from node._config import ComputeSection
    from p2p import GossipMessage, Mesh
    from rpc import MethodRegistry

log = logging.getLogger("node.compute")

OFFERS_PURPOSE = "offers"
OFFER_TYPE_TAG = "gpumesh/offer/1"
offer_prune_interval_s = 1.0
job_dir_sweep_interval_s = 60.0
image_import_wait_s = 20.0
"""How long one ``image_import`` call waits (under the RPC call timeout); a longer import goes
on in the node and the next call for the same path waits for it again."""
image_imports_max = 4
RELEASE_STATES = frozenset(
    {market.JobState.FAILED, market.JobState.CANCELLED, market.JobState.REFUNDED}
)
"""Provider states whose outputs nobody will fetch: the job directory goes at once. A DONE job
keeps it until the market releases it (outputs fetched) or the retention runs out."""


def make_executor(
    config: ComputeSection, work_root: Path, images: compute.ImageStore | None = None
) -> compute.Executor:
    """The executor ``[compute]`` asks for; ``SandboxError`` if that sandbox does not work."""
    uids: range | None = None
    if os.geteuid() == 0:
        uids = range(config.job_uid_first, config.job_uid_first + config.job_uid_count)
    if config.sandbox == "bwrap":
        # Probes bwrap and cgroups; raises if either does not work. Unprivileged, every job
        # runs as this daemon's uid, each in its own mount namespace.
        return compute.Executor(work_root, job_uids=uids, images=images)
    if uids is None:
        raise compute.SandboxError(
            'sandbox = "process" needs the daemon to run as root: without its own uid a job '
            "could read this node's key and files"
        )
    log.warning("sandbox = process: jobs run without filesystem or network isolation")
    return compute.Executor(work_root, sandbox="process", job_uids=uids)


def jobs_root(address: bytes) -> Path:
    # Jobs run as an unprivileged uid: their directory must not sit under a 0700 home.
    return Path("/var/tmp") / f"gpumesh-jobs-{address.hex()[:16]}"


def image_roots(address: bytes) -> Path:
    # Unpacked image roots: job uids must traverse to them, so not under the 0700 data dir.
    return Path("/var/tmp") / f"gpumesh-images-{address.hex()[:16]}"


class _Import:
    """One image import running in the node (an RPC call may time out before it ends)."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.image: compute.Image | None = None
        self.error: compute.ImageError | None = None


class ComputeService:
    def __init__(
        self,
        *,
        key: SigningKey,
        chain_id: str,
        mesh: Mesh,
        config: ComputeSection,
        images_dir: Path | None = None,
    ):
        self.key = key
        self.chain_id = chain_id
        self.mesh = mesh
        self.config = config
        self.inventory = compute.read_inventory(
            simulate_gpus=config.simulate_gpus, simulate_seed=key.address.hex()
        )
        self.allocator = compute.SlotAllocator(self.inventory.gpus)
        self.directory = compute.OfferDirectory(chain_id)
        self.executor: compute.Executor | None = None
        self.provider_refused: str | None = None
        """Why this node does not provide although ``[compute] provider`` is on."""
        self.images: compute.ImageStore | None = None
        if images_dir is not None:
            try:
                self.images = compute.ImageStore(images_dir, roots_dir=image_roots(key.address))
            except OSError as exc:
                # The node runs without images (its offer says so) rather than not at all.
                log.error("no image store: %s", exc)
        self._imports: dict[str, _Import] = {}
        self._nursery: trio.Nursery | None = None
        self.images_in_use: Callable[[], dict[str, int]] = dict
        """Image hex -> unfinished jobs requested here in it (the node wires the market's)."""
        if config.provider:
            try:
                self.executor = make_executor(config, jobs_root(key.address), self.images)
            except compute.SandboxError as exc:
                # No weak fallback: a node whose sandbox does not work stays a requester.
                self.provider_refused = str(exc)
                log.error("not providing compute: %s", exc)
        self.offer_config = compute.OfferConfig(
            price_per_gpu_second=config.price_per_gpu_second,
            tags=config.tags,
            sandbox=self.executor.sandbox if self.executor is not None else "bwrap",
            job_memory_bytes_max=config.job_memory_bytes_max,
            job_disk_bytes_max=config.job_disk_bytes_max,
            runtimes=self.executor.runtimes if self.executor is not None else (),
        )
        self.publisher: compute.OfferPublisher | None = None
        if self.executor is not None:
            self.publisher = compute.OfferPublisher(
                key=key,
                chain_id=chain_id,
                inventory=self.inventory,
                allocator=self.allocator,
                config=self.offer_config,
                sandbox=self.executor.sandbox,
                publish=self._publish_offer,
            )

    @property
    def sandbox(self) -> str | None:
        """The sandbox kind jobs run in; ``None`` when this node does not provide."""
        return self.executor.sandbox if self.executor is not None else None

    def provider_json(self) -> dict[str, Any]:
        """Whether this node provides, in which sandbox, or why not (node_info, status)."""
        return {
            "providing": self.executor is not None,
            "sandbox": self.sandbox,
            "refused": self.provider_refused,
        }

    async def _publish_offer(self, data: bytes) -> None:
        # The mesh runs our own messages through the topic validator too, which files the
        # offer in our directory; adding it first would make the validator see a duplicate
        # and refuse to send it. The add afterwards covers a publish that failed.
        try:
            await self.mesh.publish(OFFERS_PURPOSE, OFFER_TYPE_TAG, data)
        except P2PError as exc:
            log.warning("offer gossip failed", extra={"err": str(exc)})
        self.directory.add(data, compute.wall_clock_ms())

    def _validate_offer(self, message: GossipMessage) -> bool:
        try:
            offer = compute.decode_offer(message.payload)
            if bytes(offer.provider) != message.sender_public_key:
                # Offers are gossiped by their provider only; a relayed copy keeps its envelope.
                raise compute.OfferInvalidError("offer provider is not the gossip sender")
            outcome = self.directory.add(offer, compute.wall_clock_ms())
        except compute.OfferRejected as exc:
            log.info("offer rejected", extra={"peer": message.sender_peer_id, "err": str(exc)})
            return False
        return outcome.is_new

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.executor is not None:
            await self.sweep_job_dirs()  # whatever a previous run left past its retention
        offers = self.mesh.subscribe(OFFERS_PURPOSE, validator=self._validate_offer)
        log.info(
            "compute ready",
            extra={
                "inventory": self.inventory.source,
                "gpus": len(self.inventory.gpus),
                "sandbox": self.sandbox,
                "refused": self.provider_refused,
            },
        )
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._drain, offers)
            nursery.start_soon(self._prune)
            if self.executor is not None:
                nursery.start_soon(self._sweep_periodically)
            if self.publisher is not None:
                await nursery.start(self.publisher.run)  # type: ignore[arg-type]
            task_status.started()

    async def _drain(self, channel: trio.MemoryReceiveChannel[GossipMessage]) -> None:
        # The validator already stored each offer; the channel only has to be emptied.
        async for _ in channel:
            pass

    async def sweep_job_dirs(self) -> int:
        assert self.executor is not None
        removed = await trio.to_thread.run_sync(
            self.executor.sweep_job_dirs, self.config.job_dir_retention_s
        )
        if removed:
            log.info("removed %d job directories past their retention", removed)
        return removed

    async def _sweep_periodically(self) -> None:
        while True:
            await trio.sleep(job_dir_sweep_interval_s)
            await self.sweep_job_dirs()

    async def release_finished_jobs(self, events: trio.MemoryReceiveChannel[Any]) -> None:
        """Delete a provider job's directory when the market is done with it (wired by the
        daemon to ``MarketService.subscribe()``)."""
        async with events:
            async for record in events:
                if self.executor is None or record.role is not market.Role.PROVIDER:
                    continue
                if record.state in RELEASE_STATES:
                    job = compute.JobId(record.attempt_job_id.hex())
                    await trio.to_thread.run_sync(self.executor.release, job)

    async def _prune(self) -> None:
        while True:
            await trio.sleep(offer_prune_interval_s)
            self.directory.prune(compute.wall_clock_ms())

    async def import_image(self, path: Path) -> compute.Image | None:
        """Import the archive at ``path`` (on this machine); ``None`` if it is still going
        after ``image_import_wait_s`` (call again with the same path to wait on)."""
        if self.images is None or self._nursery is None:
            raise RpcError(INTERNAL_ERROR, "this node has no image store")
        key = str(path)
        job = self._imports.get(key)
        if job is None:
            if len(self._imports) >= image_imports_max:
                raise RpcError(SERVER_BUSY, f"{image_imports_max} image imports are running")
            job = self._imports[key] = _Import()
            self._nursery.start_soon(self._run_import, path, job)
        with trio.move_on_after(image_import_wait_s):
            await job.done.wait()
        if not job.done.is_set():
            return None
        self._imports.pop(key, None)
        if job.error is not None:
            raise job.error
        return job.image

    async def _run_import(self, path: Path, job: _Import) -> None:
        assert self.images is not None
        try:
            # Abandoned on shutdown: the store removes a half-done import at its next start.
            job.image = await trio.to_thread.run_sync(
                self.images.import_archive,
                path,
                abandon_on_cancel=True,  # type: ignore[call-arg]
            )
        except compute.ImageError as exc:
            job.error = exc
        finally:
            job.done.set()

    # -- RPC ------------------------------------------------------------------------------------

    def register_methods(self, registry: MethodRegistry) -> None:
        async def compute_resources() -> dict[str, Any]:
            snapshot = dict(
                compute.resources_snapshot(
                    inventory=self.inventory,
                    allocator=self.allocator,
                    sandbox=self.sandbox or "none",
                    executor=self.executor,
                    offer=None if self.publisher is None else self.publisher.current_offer(),
                )
            )
            snapshot["provider"] = self.provider_json()
            return snapshot

        async def market_offers(**query: Any) -> list[dict[str, Any]]:
            given = {k: v for k, v in query.items() if v is not None}
            try:
                parsed = compute.OfferQuery.from_json(given)
            except compute.QueryError as exc:
                raise RpcError(INVALID_PARAMS, str(exc)) from None
            return [dict(r) for r in self.directory.rows(parsed, compute.wall_clock_ms())]

        async def image_import(path: str) -> dict[str, Any]:
            if not isinstance(path, str) or not os.path.isabs(path):
                raise RpcError(
                    INVALID_PARAMS, "path must be an absolute path on the node's machine"
                )
            try:
                image = await self.import_image(Path(path))
            except (compute.ImageRejected, compute.ImageNotFound) as exc:
                raise RpcError(INVALID_PARAMS, str(exc)) from None
            except compute.ImageError as exc:
                raise RpcError(INTERNAL_ERROR, str(exc)) from None
            if image is None:
                return {"done": False, "path": path}
            return {"done": True, **image.to_json()}

        async def image_list() -> list[dict[str, Any]]:
            if self.images is None:
                return []
            images = await trio.to_thread.run_sync(self.images.images)
            return [image.to_json() for image in images]

        async def image_remove(ref: str) -> dict[str, Any]:
            if self.images is None:
                raise RpcError(INVALID_PARAMS, "this node has no image store")
            try:
                target = await trio.to_thread.run_sync(self.images.get, str(ref))
                jobs = self.images_in_use().get(target.hex, 0)
                if jobs:
                    raise compute.ImageBusy(
                        f"image {target.ref} is named by {jobs} unfinished job(s) of this node "
                        "(their providers may still fetch it)"
                    )
                image = await trio.to_thread.run_sync(self.images.remove, target.ref)
            except (compute.ImageNotFound, compute.ImageBusy) as exc:
                raise RpcError(INVALID_PARAMS, str(exc)) from None
            return image.to_json()

        registry.register(
            "image_import",
            image_import,
            description="Import an OCI image archive or a docker save archive from a path on "
            "this machine into the node's image store (blobs verified, layers unpacked). "
            f"Waits up to {image_import_wait_s:.0f} s: done=false means still importing, call "
            "again with the same path.",
            params=(Param("path", "string", True, "Absolute path of the archive."),),
            result=Result("object", "{done, ref, config, layers, blob_bytes, ...}"),
        )
        registry.register(
            "image_list",
            image_list,
            description="The images in this node's store, oldest import first.",
            result=Result("array"),
        )
        registry.register(
            "image_remove",
            image_remove,
            description="Remove an image (sha256:<hex> or a unique prefix of 12+ hex), its "
            "unpacked root and the blobs no other image uses; refused while a job runs in it.",
            params=(Param("ref", "string", True, "The image reference."),),
            result=Result("object", "The removed image."),
        )
        registry.register(
            "compute_resources",
            compute_resources,
            description="This node's devices, slots, sandbox and current offer.",
            result=Result("object"),
        )
        registry.register(
            "market_offers",
            market_offers,
            description="Live offers from every provider, filtered, cheapest first.",
            params=(
                Param("gpu_count", "integer", False, "At least this many GPUs free."),
                Param("min_vram_bytes", "integer", False, "Per-GPU VRAM at least this."),
                Param("model", "string", False, "GPU model, e.g. A100-80GB."),
                Param("min_cuda_version", "string", False, 'e.g. "12.1".'),
                Param("min_compute_capability", "string", False, 'e.g. "8.0".'),
                Param("max_price", "integer", False, "Max price per GPU-second."),
                Param("tags", "array", False, "Required tags."),
                Param("sandbox", "string", False, '"bwrap" or "process".'),
                Param("cpu_only", "boolean", False, "CPU-only offers."),
                Param("limit", "integer", False, "At most this many rows."),
            ),
            result=Result("array"),
        )

    def statistics(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"directory": to_json(self.directory.statistics())}
        if self.images is not None:
            stats["images"] = self.images.statistics()
        return stats
