"""Interfaces of the compute package: the NVML seam, the publish callback, the executor."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    from compute._allocator import Allocation
    from compute._sandbox import JobResult, JobSpec, LogTail
    from compute.types import JobId, SandboxKind

PublishFn = Callable[[bytes], Awaitable[None]]
"""Hands encoded offer bytes to the gossip mesh (wired by the node)."""

ClockMs = Callable[[], int]
"""Wall-clock milliseconds since the Unix epoch (injected so tests control time)."""


class NvmlAPI(Protocol):
    """The slice of NVML the inventory reads; every method raises ``NvmlUnavailableError``.

    The production implementation is ``compute.PynvmlAPI``; tests pass fake devices.
    """

    def init(self) -> None: ...

    def shutdown(self) -> None: ...

    def driver_version(self) -> str: ...

    def cuda_driver_version(self) -> int:
        """CUDA version in NVML's encoding: ``major * 1000 + minor * 10`` (12040 = 12.4)."""
        ...

    def device_count(self) -> int: ...

    def device_name(self, index: int) -> str: ...

    def device_uuid(self, index: int) -> str: ...

    def device_memory(self, index: int) -> tuple[int, int]:
        """``(total_bytes, free_bytes)``."""
        ...

    def device_utilization_pct(self, index: int) -> int: ...

    def device_compute_capability(self, index: int) -> tuple[int, int]: ...

    def device_minor_number(self, index: int) -> int: ...


class ExecutorAPI(Protocol):
    """What the market needs of the sandboxed executor (``compute.Executor``; the market
    simulation passes its own)."""

    sandbox: SandboxKind

    async def run(
        self, job_id: JobId, spec: JobSpec, allocation: Allocation | None = None
    ) -> JobResult: ...

    def job_dir(self, job_id: JobId) -> Path: ...

    def remove_job_dir(self, job_id: JobId) -> None: ...

    def log_tail(self, job_id: JobId, stream: str, offset: int, bytes_max: int) -> LogTail:
        """Bytes of a running job's stdout or stderr from ``offset`` (live logs)."""
        ...
