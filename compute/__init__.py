"""compute: what this node has, what it offers, and how it runs other people's jobs.

Where things live:
- ``types``: wire types (``Offer``, ``OfferGpu``, ``ModelPrice``, ``OutputFile``) and records
  (``GpuDevice``); ids (``GpuUuid``, ``JobId``).
- ``_inventory``: NVML (through the ``abc.NvmlAPI`` seam) or ``simulate_gpus`` -> ``Inventory``.
- ``_allocator``: ``SlotAllocator`` hands out GPU / CPU slots, never double booked.
- ``_offers``: ``OfferConfig``, building/validating signed offers, the ``OfferPublisher`` service.
- ``_directory``: ``OfferDirectory`` of live offers and ``OfferQuery`` over it.
- ``_sandbox``: ``Executor`` runs a ``JobSpec`` under bwrap or the process sandbox, each job
  with its own uid, cgroup, capped ``/tmp`` and job directory.
- ``_images``: ``ImageStore``, the content-addressed store of OCI images (docker-save or OCI
  archives in, verified, unpacked by ``umoci`` into read-only roots jobs run in).
- ``_gpu_mounts``: ``gpu_mount_plan`` binds a GPU job's device nodes, driver libraries and
  tools into its sandbox (as the NVIDIA Container Toolkit does), over the ``GpuHost`` seam.
- ``_cgroups``: the job cgroups (v2, or v1 ``memory``/``pids``/``cpuacct``) and their limits.
- ``abc``: ``NvmlAPI``, ``ExecutorAPI`` (what the market needs of an executor), callbacks.
- ``_runner``: ``run_job`` = allocate, run in the sandbox, release.
- ``testing``: ``FakeNvml`` and offer factories for tests of this and other packages.
- ``exceptions``: ``ComputeError`` and its subclasses.

``compute`` imports ``ledger`` (codec and signing) and nothing else of gpumesh.
"""

from __future__ import annotations

from compute._allocator import Allocation, SlotAllocator
from compute._directory import AddOutcome, OfferDirectory, OfferMatch, OfferQuery, QueryError
from compute._gpu_mounts import GpuHost, GpuMountPlan, gpu_mount_plan
from compute._images import Image, ImageConfig, ImageLimits, ImageRef, ImageStore
from compute._inventory import (
    KNOWN_GPU_MODELS,
    Inventory,
    PynvmlAPI,
    normalize_model_name,
    parse_simulate_gpus,
    read_inventory,
    simulated_devices,
)
from compute._offers import (
    OfferConfig,
    OfferPublisher,
    build_offer,
    decode_offer,
    usage_cost,
    validate_offer,
    wall_clock_ms,
)
from compute._runner import run_job
from compute._sandbox import (
    Executor,
    JobLimits,
    JobOutcome,
    JobResult,
    JobSpec,
    LogTail,
    collect_outputs,
    default_sandbox_uid,
    outputs_digest,
    probe_bwrap,
)
from compute.exceptions import (
    AllocationError,
    ComputeError,
    GpuDriverError,
    ImageBusy,
    ImageError,
    ImageNotFound,
    ImageRejected,
    ImageToolError,
    JobSpecError,
    NoCapacityError,
    NvmlUnavailableError,
    OfferDecodeError,
    OfferInvalidError,
    OfferRejected,
    OfferSignatureError,
    OfferWrongChainError,
    SandboxError,
    SimulateSpecError,
)
from compute.types import (
    CPU_MODEL,
    GpuDevice,
    GpuUuid,
    JobId,
    ModelPrice,
    Offer,
    OfferGpu,
    OutputFile,
    SandboxKind,
)


def resources_snapshot(
    *,
    inventory: Inventory,
    allocator: SlotAllocator,
    sandbox: str,
    executor: Executor | None = None,
    offer: Offer | None = None,
) -> dict[str, object]:
    """The ``compute_resources`` RPC result: devices, slots, sandbox, current offer."""
    return {
        "inventory": inventory.to_json(),
        "slots": allocator.to_json(),
        "sandbox": executor.to_json() if executor is not None else {"sandbox": sandbox},
        "offer": offer.to_json() if offer is not None else None,
    }


__all__ = [
    "CPU_MODEL",
    "KNOWN_GPU_MODELS",
    "AddOutcome",
    "Allocation",
    "AllocationError",
    "ComputeError",
    "Executor",
    "GpuDevice",
    "GpuDriverError",
    "GpuHost",
    "GpuMountPlan",
    "GpuUuid",
    "Image",
    "ImageBusy",
    "ImageConfig",
    "ImageError",
    "ImageLimits",
    "ImageNotFound",
    "ImageRef",
    "ImageRejected",
    "ImageStore",
    "ImageToolError",
    "Inventory",
    "JobId",
    "JobLimits",
    "JobOutcome",
    "JobResult",
    "JobSpec",
    "JobSpecError",
    "LogTail",
    "ModelPrice",
    "NoCapacityError",
    "NvmlUnavailableError",
    "Offer",
    "OfferConfig",
    "OfferDecodeError",
    "OfferDirectory",
    "OfferGpu",
    "OfferInvalidError",
    "OfferMatch",
    "OfferPublisher",
    "OfferQuery",
    "OfferRejected",
    "OfferSignatureError",
    "OfferWrongChainError",
    "OutputFile",
    "PynvmlAPI",
    "QueryError",
    "SandboxError",
    "SandboxKind",
    "SimulateSpecError",
    "SlotAllocator",
    "build_offer",
    "collect_outputs",
    "decode_offer",
    "default_sandbox_uid",
    "gpu_mount_plan",
    "normalize_model_name",
    "outputs_digest",
    "parse_simulate_gpus",
    "probe_bwrap",
    "read_inventory",
    "resources_snapshot",
    "run_job",
    "simulated_devices",
    "usage_cost",
    "validate_offer",
    "wall_clock_ms",
]
