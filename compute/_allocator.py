"""GPU and CPU slot allocation: which job runs on which device, never double booked.

A GPU node has ``jobs_per_gpu`` slots per GPU (one by default, so a job owns its GPUs); a
multi-GPU job gets distinct GPUs of one model. A CPU-only job takes one CPU slot; CPU slots
exist on CPU-only nodes (``cpu_slots``, default 1) and only if configured on GPU nodes.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from compute.exceptions import AllocationError, NoCapacityError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from compute.types import GpuDevice, GpuUuid, JobId

jobs_per_gpu_max = 16
cpu_slots_max = 1024
job_gpus_max = 64
allocator_listeners_max = 16


@dataclasses.dataclass(frozen=True)
class Allocation:
    """The slots one job holds: its GPUs (indices and UUIDs), or one CPU slot."""

    job_id: JobId
    gpu_indices: tuple[int, ...]
    gpu_uuids: tuple[GpuUuid, ...]
    model: str
    gpu_minors: tuple[int, ...] = ()
    """``/dev/nvidia<minor>`` numbers of the GPUs (-1 where unknown, e.g. simulated)."""

    @property
    def slot_count(self) -> int:
        """GPU count, or 1 for a CPU-only job: the factor usage is multiplied by."""
        return max(1, len(self.gpu_indices))

    def to_json(self) -> dict[str, object]:
        return {
            "job_id": self.job_id,
            "gpu_indices": list(self.gpu_indices),
            "gpu_uuids": list(self.gpu_uuids),
            "model": self.model,
        }


class SlotAllocator:
    """Hands out slots; all bookkeeping is synchronous, so no two callers can interleave."""

    def __init__(
        self, gpus: Sequence[GpuDevice], *, jobs_per_gpu: int = 1, cpu_slots: int | None = None
    ) -> None:
        if not 1 <= jobs_per_gpu <= jobs_per_gpu_max:
            raise ValueError(f"jobs_per_gpu must be 1..{jobs_per_gpu_max}")
        if cpu_slots is None:
            cpu_slots = 0 if gpus else 1
        if not 0 <= cpu_slots <= cpu_slots_max:
            raise ValueError(f"cpu_slots must be 0..{cpu_slots_max}")
        self._gpus = tuple(gpus)
        self._jobs_per_gpu = jobs_per_gpu
        self._cpu_slots = cpu_slots
        self._gpu_jobs: list[set[JobId]] = [set() for _ in self._gpus]
        self._cpu_jobs: set[JobId] = set()
        self._allocations: dict[JobId, Allocation] = {}
        self._listeners: list[Callable[[], None]] = []

    @property
    def gpus(self) -> tuple[GpuDevice, ...]:
        return self._gpus

    @property
    def jobs_per_gpu(self) -> int:
        return self._jobs_per_gpu

    @property
    def total_cpu_slots(self) -> int:
        return self._cpu_slots

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every allocate and release (the offer publisher's hook)."""
        if len(self._listeners) >= allocator_listeners_max:
            raise ValueError(f"more than {allocator_listeners_max} allocator listeners")
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def free_slots_per_gpu(self) -> tuple[int, ...]:
        return tuple(self._jobs_per_gpu - len(jobs) for jobs in self._gpu_jobs)

    @property
    def free_cpu_slots(self) -> int:
        return self._cpu_slots - len(self._cpu_jobs)

    def allocation(self, job_id: JobId) -> Allocation | None:
        return self._allocations.get(job_id)

    def allocations(self) -> tuple[Allocation, ...]:
        return tuple(self._allocations.values())

    def allocate(
        self, job_id: JobId, gpu_count: int, *, model: str | None = None, min_vram_bytes: int = 0
    ) -> Allocation:
        """Reserve ``gpu_count`` distinct GPUs of one model (0: one CPU slot) for ``job_id``."""
        if job_id in self._allocations:
            raise AllocationError(f"job {job_id!r} already holds an allocation")
        if not 0 <= gpu_count <= job_gpus_max:
            raise AllocationError(f"gpu_count must be 0..{job_gpus_max}, got {gpu_count}")
        if gpu_count == 0:
            if self.free_cpu_slots <= 0:
                raise NoCapacityError(f"no free CPU slot (of {self._cpu_slots})")
            allocation = Allocation(job_id, (), (), "cpu")
            self._cpu_jobs.add(job_id)
        else:
            allocation = self._pick_gpus(job_id, gpu_count, model, min_vram_bytes)
            for index in allocation.gpu_indices:
                self._gpu_jobs[index].add(job_id)
        self._allocations[job_id] = allocation
        self._changed()
        return allocation

    def _pick_gpus(
        self, job_id: JobId, gpu_count: int, model: str | None, min_vram_bytes: int
    ) -> Allocation:
        by_model: dict[str, list[GpuDevice]] = {}
        for gpu, jobs in zip(self._gpus, self._gpu_jobs, strict=True):
            if len(jobs) >= self._jobs_per_gpu or gpu.vram_total_bytes < min_vram_bytes:
                continue
            if model is not None and gpu.model.lower() != model.lower():
                continue
            by_model.setdefault(gpu.model, []).append(gpu)
        for name in sorted(by_model):
            candidates = by_model[name]
            if len(candidates) < gpu_count:
                continue
            # Least-loaded first, then lowest index: spreads shared GPUs, keeps choice stable.
            candidates.sort(key=lambda g: (len(self._gpu_jobs[g.index]), g.index))
            chosen = sorted(candidates[:gpu_count], key=lambda g: g.index)
            return Allocation(
                job_id,
                tuple(g.index for g in chosen),
                tuple(g.uuid for g in chosen),
                name,
                tuple(g.minor_number for g in chosen),
            )
        raise NoCapacityError(
            f"no {gpu_count} free GPU(s)"
            + (f" of model {model}" if model else " of one model")
            + (f" with >= {min_vram_bytes} bytes VRAM" if min_vram_bytes else "")
        )

    def release(self, job_id: JobId) -> Allocation:
        """Give back ``job_id``'s slots; raises ``AllocationError`` if it holds none."""
        allocation = self._allocations.pop(job_id, None)
        if allocation is None:
            raise AllocationError(f"job {job_id!r} holds no allocation")
        if allocation.gpu_indices:
            for index in allocation.gpu_indices:
                self._gpu_jobs[index].discard(job_id)
        else:
            self._cpu_jobs.discard(job_id)
        self._changed()
        return allocation

    def to_json(self) -> dict[str, object]:
        free = self.free_slots_per_gpu()
        return {
            "jobs_per_gpu": self._jobs_per_gpu,
            "gpu_slots_total": self._jobs_per_gpu * len(self._gpus),
            "gpu_slots_free": sum(free),
            "free_slots_per_gpu": list(free),
            "cpu_slots_total": self._cpu_slots,
            "cpu_slots_free": self.free_cpu_slots,
            "allocations": [a.to_json() for a in self._allocations.values()],
        }
