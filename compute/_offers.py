"""Offers: building and signing this node's offer, validating peers' offers, publishing.

Validation order is cheap-first: decode, chain id, bounds, times, then the Ed25519 signature.
Every failure raises an ``OfferRejected`` subclass the caller counts against the sender.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

import trio

import ledger
from compute._sandbox import JobLimits
from compute.exceptions import (
    JobSpecError,
    OfferDecodeError,
    OfferInvalidError,
    OfferSignatureError,
    OfferWrongChainError,
)
from compute.types import (
    CPU_MODEL,
    RUNTIME_KINDS,
    SANDBOX_KINDS,
    ModelPrice,
    Offer,
    OfferGpu,
    SandboxKind,
)

if TYPE_CHECKING:
    # trio 0.35's trio._core does not re-export TaskStatus, so strict mypy does not see
    # ``trio.TaskStatus``; the class itself is public API.
    from trio._core._run import TaskStatus

    from compute._allocator import SlotAllocator
    from compute._inventory import Inventory
    from compute.abc import ClockMs, PublishFn

log = logging.getLogger("gpumesh.compute.offers")

offer_bytes_max = 64 * 1024
offer_gpus_max = 64
offer_prices_max = 65
offer_tags_max = 16
tag_chars_max = 32
model_chars_max = 64
text_chars_max = 64
offer_ttl_ms_max = 5 * 60 * 1000
"""An offer may promise at most five minutes; heartbeats keep a live provider listed."""
clock_skew_ms_max = 30_000
"""How far in the future a peer's ``issued_at_ms`` may be before we call it invalid."""
vram_bytes_max = 2**40
memory_bytes_max = 2**50
cpu_cores_max = 1 << 16
slots_max = 1024
price_max = 10**15
cuda_major_max = 99


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def usage_cost(price_per_gpu_second: int, usage_gpu_ms: int) -> int:
    """What ``usage_gpu_ms`` costs at ``price_per_gpu_second``, rounded up to the unit."""
    if price_per_gpu_second < 0 or usage_gpu_ms < 0:
        raise ValueError("price and usage must be >= 0")
    return -(-price_per_gpu_second * usage_gpu_ms // 1000)


@dataclasses.dataclass(frozen=True)
class OfferConfig:
    """What this provider asks and how often it re-advertises (one per node)."""

    price_per_gpu_second: int = 100
    model_prices: tuple[tuple[str, int], ...] = ()
    """Per-model overrides of ``price_per_gpu_second``, e.g. ``(("RTX4090", 40),)``."""
    cpu_price_per_slot_second: int = 10
    tags: tuple[str, ...] = ()
    sandbox: SandboxKind = "bwrap"
    """The sandbox this node runs jobs in (the executor's kind); requesters may require one."""
    job_memory_bytes_max: int = JobLimits.memory_bytes
    """The most memory a requester may ask for (``Requirements.memory_bytes``); advertised."""
    job_disk_bytes_max: int = JobLimits.disk_bytes
    """The most job-directory disk a requester may ask for; advertised."""
    runtimes: tuple[str, ...] = ()
    """How jobs can run here (``Executor.runtimes``: ``bwrap``, ``bwrap-image``, ``process``)."""
    heartbeat_ms: int = 10_000
    ttl_ms: int = 30_000
    publish_interval_ms_min: int = 1_000
    """Changes within this interval are coalesced into one publish (the gossip budget)."""

    def __post_init__(self) -> None:
        prices = [self.price_per_gpu_second, self.cpu_price_per_slot_second]
        prices += [p for _, p in self.model_prices]
        if any(not 0 <= p <= price_max for p in prices):
            raise ValueError(f"[compute] prices must be 0..{price_max}")
        if len(self.tags) > offer_tags_max or any(
            not 0 < len(t) <= tag_chars_max for t in self.tags
        ):
            raise ValueError(f"[compute] tags: at most {offer_tags_max}, each 1..{tag_chars_max}")
        if not 0 < self.heartbeat_ms < self.ttl_ms <= offer_ttl_ms_max:
            raise ValueError(f"[compute] need 0 < heartbeat_ms < ttl_ms <= {offer_ttl_ms_max}")
        if not 0 <= self.publish_interval_ms_min <= self.heartbeat_ms:
            raise ValueError("[compute] publish_interval_ms_min must be 0..heartbeat_ms")
        if self.sandbox not in SANDBOX_KINDS:
            raise ValueError(f"[compute] sandbox must be one of {', '.join(SANDBOX_KINDS)}")
        if not 0 < self.job_memory_bytes_max <= memory_bytes_max:
            raise ValueError("[compute] job_memory_bytes_max out of range")
        if not 0 < self.job_disk_bytes_max <= memory_bytes_max:
            raise ValueError("[compute] job_disk_bytes_max out of range")
        if any(r not in RUNTIME_KINDS for r in self.runtimes):
            raise ValueError(f"[compute] runtimes must be among {', '.join(RUNTIME_KINDS)}")

    @classmethod
    def for_tests(cls) -> OfferConfig:
        return cls(heartbeat_ms=1_000, ttl_ms=3_000, publish_interval_ms_min=100)

    def job_limits(
        self, wall_time_ms: int, memory_bytes: int = 0, disk_bytes: int = 0
    ) -> JobLimits:
        """The limits a job runs under: what the requester stated (0: this node's default),
        never over the advertised maxima (``JobSpecError``)."""
        if memory_bytes > self.job_memory_bytes_max or disk_bytes > self.job_disk_bytes_max:
            raise JobSpecError(
                f"the job asks for {memory_bytes} bytes memory / {disk_bytes} bytes disk; this "
                f"node allows {self.job_memory_bytes_max} / {self.job_disk_bytes_max}"
            )
        default = JobLimits()
        return JobLimits(
            wall_time_ms=wall_time_ms,
            memory_bytes=memory_bytes or min(default.memory_bytes, self.job_memory_bytes_max),
            disk_bytes=disk_bytes or min(default.disk_bytes, self.job_disk_bytes_max),
        )

    def price_for(self, model: str) -> int:
        for name, price in self.model_prices:
            if name.lower() == model.lower():
                return price
        return self.price_per_gpu_second


def build_offer(
    *,
    chain_id: str,
    sequence: int,
    now_ms: int,
    inventory: Inventory,
    allocator: SlotAllocator,
    config: OfferConfig,
    sandbox: SandboxKind,
) -> Offer:
    """The unsigned offer for this node's current inventory and free slots."""
    free = allocator.free_slots_per_gpu()
    gpus = tuple(
        OfferGpu(
            index=gpu.index,
            uuid=gpu.uuid,
            model=gpu.model,
            vram_bytes=gpu.vram_total_bytes,
            compute_capability=gpu.compute_capability,
            cuda_version=gpu.cuda_version,
            driver_version=gpu.driver_version,
            free_slots=free[i],
            total_slots=allocator.jobs_per_gpu,
        )
        for i, gpu in enumerate(allocator.gpus)
    )
    models = sorted({gpu.model for gpu in gpus})
    prices = [ModelPrice(model, config.price_for(model)) for model in models]
    if allocator.total_cpu_slots:
        prices.append(ModelPrice(CPU_MODEL, config.cpu_price_per_slot_second))
    return Offer(
        chain_id=chain_id,
        sequence=sequence,
        issued_at_ms=now_ms,
        expiry_ms=now_ms + config.ttl_ms,
        gpus=gpus,
        cpu_cores=inventory.cpu_cores,
        memory_bytes=inventory.memory_bytes,
        free_cpu_slots=allocator.free_cpu_slots,
        total_cpu_slots=allocator.total_cpu_slots,
        prices=tuple(prices),
        tags=tuple(config.tags),
        sandbox=sandbox,
        job_memory_bytes_max=config.job_memory_bytes_max,
        job_disk_bytes_max=config.job_disk_bytes_max,
        runtimes=tuple(config.runtimes),
    )


def decode_offer(data: bytes) -> Offer:
    """Decode gossip bytes into an ``Offer`` (not yet validated)."""
    try:
        return ledger.decode(Offer, data, max_bytes=offer_bytes_max)
    except ledger.DecodeError as exc:
        raise OfferDecodeError(f"offer does not decode: {exc}") from exc


def _invalid(reason: str) -> OfferInvalidError:
    return OfferInvalidError(reason)


def _check_text(name: str, value: str, chars_max: int) -> None:
    if not 0 < len(value) <= chars_max or not value.isprintable():
        raise _invalid(f"{name} must be 1..{chars_max} printable chars")


def _check_version(name: str, value: tuple[int, int]) -> None:
    if not (0 <= value[0] <= cuda_major_max and 0 <= value[1] <= cuda_major_max):
        raise _invalid(f"{name} {value} is out of range")


def validate_offer(offer: Offer, *, chain_id: str, now_ms: int) -> None:
    """Raise an ``OfferRejected`` subclass unless ``offer`` is well-formed and signed.

    Expiry in the past is *not* checked here: a late offer is stale, not malicious.
    """
    if offer.chain_id != chain_id:
        raise OfferWrongChainError(f"offer is for chain {offer.chain_id[:64]!r}, not {chain_id!r}")
    if len(offer.signer) != 32 or len(offer.signature) != 64:
        raise OfferSignatureError("offer signer or signature has the wrong length")
    if len(offer.gpus) > offer_gpus_max:
        raise _invalid(f"offer lists {len(offer.gpus)} GPUs (max {offer_gpus_max})")
    if len(offer.prices) > offer_prices_max:
        raise _invalid(f"offer lists {len(offer.prices)} prices (max {offer_prices_max})")
    if len(offer.tags) > offer_tags_max:
        raise _invalid(f"offer lists {len(offer.tags)} tags (max {offer_tags_max})")
    if offer.sequence < 0:
        raise _invalid("sequence must be >= 0")
    if offer.issued_at_ms <= 0 or offer.issued_at_ms > now_ms + clock_skew_ms_max:
        raise _invalid("issued_at_ms is not a plausible time (zero or in the future)")
    ttl = offer.expiry_ms - offer.issued_at_ms
    if not 0 < ttl <= offer_ttl_ms_max:
        raise _invalid(f"offer lifetime {ttl} ms is not in 1..{offer_ttl_ms_max}")
    if offer.sandbox not in SANDBOX_KINDS:
        raise _invalid(f"unknown sandbox kind {offer.sandbox[:16]!r}")
    if not 0 < offer.cpu_cores <= cpu_cores_max:
        raise _invalid("cpu_cores out of range")
    if not 0 < offer.memory_bytes <= memory_bytes_max:
        raise _invalid("memory_bytes out of range")
    if not 0 <= offer.job_memory_bytes_max <= memory_bytes_max:
        raise _invalid("job_memory_bytes_max out of range")
    if not 0 <= offer.job_disk_bytes_max <= memory_bytes_max:
        raise _invalid("job_disk_bytes_max out of range")
    if len(offer.runtimes) > len(RUNTIME_KINDS) or any(
        r not in RUNTIME_KINDS for r in offer.runtimes
    ):
        raise _invalid(f"offer runtimes must be among {', '.join(RUNTIME_KINDS)}")
    if not 0 <= offer.free_cpu_slots <= offer.total_cpu_slots <= slots_max:
        raise _invalid("CPU slots out of range (need 0 <= free <= total)")
    seen_index: set[int] = set()
    seen_uuid: set[str] = set()
    for gpu in offer.gpus:
        if gpu.index in seen_index or gpu.uuid in seen_uuid:
            raise _invalid(f"GPU {gpu.index} listed twice")
        seen_index.add(gpu.index)
        seen_uuid.add(gpu.uuid)
        if not 0 <= gpu.index < offer_gpus_max:
            raise _invalid(f"GPU index {gpu.index} out of range")
        _check_text("GPU uuid", gpu.uuid, text_chars_max)
        _check_text("GPU model", gpu.model, model_chars_max)
        _check_text("driver_version", gpu.driver_version, text_chars_max)
        if not 0 < gpu.vram_bytes <= vram_bytes_max:
            raise _invalid(f"GPU {gpu.index} VRAM {gpu.vram_bytes} is impossible")
        _check_version("compute_capability", gpu.compute_capability)
        _check_version("cuda_version", gpu.cuda_version)
        if not 0 <= gpu.free_slots <= gpu.total_slots <= slots_max or gpu.total_slots == 0:
            raise _invalid(f"GPU {gpu.index} slots out of range (need 0 <= free <= total)")
    priced: set[str] = set()
    for price in offer.prices:
        _check_text("price model", price.model, model_chars_max)
        if price.model in priced:
            raise _invalid(f"model {price.model!r} priced twice")
        priced.add(price.model)
        if not 0 <= price.price_per_gpu_second <= price_max:
            raise _invalid(f"price for {price.model!r} out of range")
    missing = {gpu.model for gpu in offer.gpus} - priced
    if missing:
        raise _invalid(f"no price for model(s) {sorted(missing)}")
    if offer.total_cpu_slots and CPU_MODEL not in priced:
        raise _invalid("CPU slots offered without a 'cpu' price")
    for tag in offer.tags:
        _check_text("tag", tag, tag_chars_max)
    if not ledger.verify_object(offer, chain_id):
        raise OfferSignatureError("offer signature does not verify for its provider")


class OfferPublisher:
    """Signs and publishes this node's offer: on start, on change (coalesced) and as a heartbeat.

    The node wires ``publish`` to its gossip topic; the allocator's changes reach the
    publisher through ``notify_changed`` (subscribed in the constructor).
    """

    def __init__(
        self,
        *,
        key: ledger.SigningKey,
        chain_id: str,
        inventory: Inventory,
        allocator: SlotAllocator,
        config: OfferConfig,
        sandbox: SandboxKind,
        publish: PublishFn,
        clock_ms: ClockMs = wall_clock_ms,
    ) -> None:
        self._key = key
        self._chain_id = chain_id
        self._inventory = inventory
        self._allocator = allocator
        self._config = config
        self._sandbox: SandboxKind = sandbox
        self._publish = publish
        self._clock_ms = clock_ms
        self._sequence = 0
        self._current: Offer | None = None
        self._changed = trio.Event()
        self._published = 0
        self._publish_failures = 0
        allocator.subscribe(self.notify_changed)

    def notify_changed(self) -> None:
        """Ask for a prompt re-publish (coalesced with others within the minimum interval)."""
        self._changed.set()

    def current_offer(self) -> Offer | None:
        return self._current

    def make_offer(self) -> Offer:
        """Build and sign a fresh offer with the next sequence number."""
        now_ms = self._clock_ms()
        self._sequence = max(self._sequence + 1, now_ms)
        offer = build_offer(
            chain_id=self._chain_id,
            sequence=self._sequence,
            now_ms=now_ms,
            inventory=self._inventory,
            allocator=self._allocator,
            config=self._config,
            sandbox=self._sandbox,
        )
        return ledger.sign_object(offer, self._key, self._chain_id)

    async def _publish_once(self) -> None:
        self._changed = trio.Event()
        offer = self.make_offer()
        self._current = offer
        try:
            await self._publish(ledger.encode(offer))
        except (OSError, RuntimeError, ValueError) as exc:
            # A failed publish (no peers yet, mesh restarting) is retried by the next
            # heartbeat; the offer stays current locally.
            self._publish_failures += 1
            log.warning("offer publish failed: %s", exc)
        else:
            self._published += 1

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._publish_once()
        task_status.started()
        interval_s = self._config.publish_interval_ms_min / 1000
        heartbeat_s = self._config.heartbeat_ms / 1000
        while True:
            last = trio.current_time()
            with trio.move_on_after(heartbeat_s):
                await self._changed.wait()
                # Coalesce a burst of allocations into one message per interval.
                await trio.sleep_until(last + interval_s)
            await self._publish_once()

    def statistics(self) -> dict[str, int]:
        return {
            "published": self._published,
            "publish_failures": self._publish_failures,
            "sequence": self._sequence,
        }
