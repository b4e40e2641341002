"""Test helpers for compute and for packages that wire it: fake NVML devices, offer factories.

``FakeNvml`` stands in for the NVML driver library (there is no GPU on CI machines); it is the
seam the brief asks for, not a replacement for anything else.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from compute._allocator import SlotAllocator
from compute._inventory import read_inventory
from compute._offers import OfferConfig, build_offer
from compute.exceptions import NvmlUnavailableError

if TYPE_CHECKING:
    import ledger
    from compute.types import Offer, SandboxKind


@dataclasses.dataclass
class FakeGpu:
    name: str = "NVIDIA GeForce RTX 4090"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    total_bytes: int = 24 * 1024**3
    free_bytes: int = 20 * 1024**3
    utilization_pct: int = 7
    compute_capability: tuple[int, int] = (8, 9)
    minor_number: int = 0
    broken: bool = False


class FakeNvml:
    """An ``NvmlAPI`` over a list of ``FakeGpu``; ``init_error`` simulates a missing driver."""

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        driver: str = "550.54.15",
        cuda: int = 12040,
        init_error: str | None = None,
    ) -> None:
        self.gpus = gpus
        self.driver = driver
        self.cuda = cuda
        self.init_error = init_error
        self.initialised = False

    def _gpu(self, index: int) -> FakeGpu:
        if not self.initialised:
            raise NvmlUnavailableError("not initialised")
        gpu = self.gpus[index]
        if gpu.broken:
            raise NvmlUnavailableError(f"GPU {index} is lost")
        return gpu

    def init(self) -> None:
        if self.init_error is not None:
            raise NvmlUnavailableError(self.init_error)
        self.initialised = True

    def shutdown(self) -> None:
        self.initialised = False

    def driver_version(self) -> str:
        return self.driver

    def cuda_driver_version(self) -> int:
        return self.cuda

    def device_count(self) -> int:
        return len(self.gpus)

    def device_name(self, index: int) -> str:
        return self._gpu(index).name

    def device_uuid(self, index: int) -> str:
        return self._gpu(index).uuid

    def device_memory(self, index: int) -> tuple[int, int]:
        gpu = self._gpu(index)
        return gpu.total_bytes, gpu.free_bytes

    def device_utilization_pct(self, index: int) -> int:
        return self._gpu(index).utilization_pct

    def device_compute_capability(self, index: int) -> tuple[int, int]:
        return self._gpu(index).compute_capability

    def device_minor_number(self, index: int) -> int:
        return self._gpu(index).minor_number


def make_offer(
    key: ledger.SigningKey,
    *,
    chain_id: str,
    now_ms: int,
    simulate_gpus: str = "RTX4090:2",
    sequence: int = 1,
    config: OfferConfig | None = None,
    sandbox: SandboxKind = "process",
    busy_gpus: int = 0,
) -> Offer:
    """A signed offer from a simulated provider (``busy_gpus`` of its GPUs allocated)."""
    import ledger as _ledger
    from compute.types import JobId

    inventory = read_inventory(simulate_gpus=simulate_gpus, simulate_seed=key.address.hex())
    allocator = SlotAllocator(inventory.gpus)
    for i in range(busy_gpus):
        allocator.allocate(JobId(f"busy-{i}"), 1)
    offer = build_offer(
        chain_id=chain_id,
        sequence=sequence,
        now_ms=now_ms,
        inventory=inventory,
        allocator=allocator,
        config=config or OfferConfig(),
        sandbox=sandbox,
    )
    return _ledger.sign_object(offer, key, chain_id)
