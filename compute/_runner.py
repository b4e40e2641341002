"""Allocate, run, release: the one call a node makes to execute a job on its own slots."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from compute._allocator import SlotAllocator
    from compute._sandbox import Executor, JobResult, JobSpec
    from compute.types import JobId


async def run_job(
    executor: Executor,
    allocator: SlotAllocator,
    job_id: JobId,
    spec: JobSpec,
    *,
    gpu_count: int,
    model: str | None = None,
    min_vram_bytes: int = 0,
) -> JobResult:
    """Reserve slots (raises ``NoCapacityError`` at once if there are none), run the job in
    the sandbox, and give the slots back however the run ends (cancellation included)."""
    allocation = allocator.allocate(job_id, gpu_count, model=model, min_vram_bytes=min_vram_bytes)
    try:
        return await executor.run(job_id, spec, allocation)
    finally:
        allocator.release(job_id)
