"""Wire types of the compute market and the plain records the inventory produces.

Wire types are frozen dataclasses encoded by ``ledger.encode``; money is an integer number of
the smallest unit, sizes are bytes, times are milliseconds since the Unix epoch (offers travel
between machines, so they carry wall-clock times).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal, NewType

from ledger import Address

GpuUuid = NewType("GpuUuid", str)
"""NVML's device UUID, e.g. ``GPU-1d3c...``; also what ``CUDA_VISIBLE_DEVICES`` is set to."""

JobId = NewType("JobId", str)
"""The executor's and allocator's name for one job run on this node."""

SandboxKind = Literal["bwrap", "process"]
SANDBOX_KINDS: tuple[SandboxKind, ...] = ("bwrap", "process")
RUNTIME_BWRAP = "bwrap"
"""A job runs on the host's ``/usr`` under bubblewrap."""
RUNTIME_BWRAP_IMAGE = "bwrap-image"
"""A job runs in a container image's root filesystem (read-only) under bubblewrap."""
RUNTIME_PROCESS = "process"
RUNTIME_KINDS = (RUNTIME_BWRAP, RUNTIME_BWRAP_IMAGE, RUNTIME_PROCESS)
"""What an offer's ``runtimes`` may list."""

CPU_MODEL = "cpu"
"""The price-table key for a CPU-only slot (priced per slot-second)."""


@dataclasses.dataclass(frozen=True)
class GpuDevice:
    """One GPU as the local inventory sees it, volatile readings included."""

    index: int
    uuid: GpuUuid
    model: str
    vram_total_bytes: int
    vram_free_bytes: int
    utilization_pct: int
    compute_capability: tuple[int, int]
    driver_version: str
    cuda_version: tuple[int, int]
    minor_number: int
    """The ``/dev/nvidia<minor>`` node the sandbox binds for this device (-1: unknown)."""

    def to_json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "model": self.model,
            "vram_total_bytes": self.vram_total_bytes,
            "vram_free_bytes": self.vram_free_bytes,
            "utilization_pct": self.utilization_pct,
            "compute_capability": f"{self.compute_capability[0]}.{self.compute_capability[1]}",
            "driver_version": self.driver_version,
            "cuda_version": f"{self.cuda_version[0]}.{self.cuda_version[1]}",
        }


@dataclasses.dataclass(frozen=True)
class OfferGpu:
    """One advertised GPU: the stable facts plus how many of its job slots are free."""

    index: int
    uuid: str
    model: str
    vram_bytes: int
    compute_capability: tuple[int, int]
    cuda_version: tuple[int, int]
    driver_version: str
    free_slots: int
    total_slots: int

    def to_json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "model": self.model,
            "vram_bytes": self.vram_bytes,
            "compute_capability": f"{self.compute_capability[0]}.{self.compute_capability[1]}",
            "cuda_version": f"{self.cuda_version[0]}.{self.cuda_version[1]}",
            "driver_version": self.driver_version,
            "free_slots": self.free_slots,
            "total_slots": self.total_slots,
        }


@dataclasses.dataclass(frozen=True)
class ModelPrice:
    """Price of one GPU-second of ``model`` (or one slot-second of ``"cpu"``), smallest unit."""

    model: str
    price_per_gpu_second: int


@dataclasses.dataclass(frozen=True)
class Offer:
    """A provider's signed advertisement, gossiped on start, on change and as a heartbeat.

    ``sequence`` orders one provider's offers: a higher one supersedes a lower one. The
    publisher uses ``max(previous + 1, issued_at_ms)`` so it also grows across restarts.
    """

    TYPE_TAG: ClassVar[str] = "compute.offer/1"

    chain_id: str
    sequence: int
    issued_at_ms: int
    expiry_ms: int
    gpus: tuple[OfferGpu, ...]
    cpu_cores: int
    memory_bytes: int
    free_cpu_slots: int
    total_cpu_slots: int
    prices: tuple[ModelPrice, ...]
    tags: tuple[str, ...]
    sandbox: str
    job_memory_bytes_max: int = 0
    """The most memory a requester may ask a job to run with (``Requirements.memory_bytes``)."""
    job_disk_bytes_max: int = 0
    """The most disk a requester may ask for its job directory (``Requirements.disk_bytes``)."""
    runtimes: tuple[str, ...] = ()
    """How this provider can run a job (``RUNTIME_KINDS``): ``bwrap-image`` = container images."""
    signer: bytes = b""
    signature: bytes = b""

    @property
    def provider(self) -> Address:
        """The provider's ledger address: the key that signed the offer."""
        return Address(self.signer)

    @property
    def free_gpu_count(self) -> int:
        return sum(1 for gpu in self.gpus if gpu.free_slots > 0)

    def price_for(self, model: str) -> int | None:
        for price in self.prices:
            if price.model == model:
                return price.price_per_gpu_second
        return None

    def to_json(self) -> dict[str, object]:
        return {
            "provider": self.signer.hex(),
            "chain_id": self.chain_id,
            "sequence": self.sequence,
            "issued_at_ms": self.issued_at_ms,
            "expiry_ms": self.expiry_ms,
            "gpus": [gpu.to_json() for gpu in self.gpus],
            "free_gpus": self.free_gpu_count,
            "cpu_cores": self.cpu_cores,
            "memory_bytes": self.memory_bytes,
            "free_cpu_slots": self.free_cpu_slots,
            "total_cpu_slots": self.total_cpu_slots,
            "prices": {p.model: p.price_per_gpu_second for p in self.prices},
            "tags": list(self.tags),
            "sandbox": self.sandbox,
            "job_memory_bytes_max": self.job_memory_bytes_max,
            "job_disk_bytes_max": self.job_disk_bytes_max,
            "runtimes": list(self.runtimes),
        }


@dataclasses.dataclass(frozen=True)
class OutputFile:
    """One collected output file: path relative to the output directory, size, SHA-256."""

    path: str
    size_bytes: int
    sha256: bytes
