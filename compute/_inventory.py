"""What this machine has: GPUs through NVML (or simulated ones), CPU cores and memory.

The real NVML path fails soft: no library, no driver or no device makes a CPU-only node, and
the reason is kept in ``Inventory.nvml_error`` so ``compute_resources`` can show it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import TYPE_CHECKING, Any, Literal

from compute.exceptions import NvmlUnavailableError, SimulateSpecError
from compute.types import GpuDevice, GpuUuid

if TYPE_CHECKING:
    from compute.abc import NvmlAPI

GIB = 1024**3
simulated_gpus_per_model_max = 16
simulated_gpus_max = 64
simulate_spec_chars_max = 1024
nvml_devices_max = 64
"""More devices than this on one host is a broken driver answer, not a machine."""

SIMULATED_DRIVER_VERSION = "550.54.15"
SIMULATED_CUDA_VERSION = (12, 4)


@dataclasses.dataclass(frozen=True)
class KnownModel:
    vram_bytes: int
    compute_capability: tuple[int, int]


KNOWN_GPU_MODELS: dict[str, KnownModel] = {
    "H100-80GB": KnownModel(80 * GIB, (9, 0)),
    "A100-80GB": KnownModel(80 * GIB, (8, 0)),
    "A100-40GB": KnownModel(40 * GIB, (8, 0)),
    "L40S": KnownModel(48 * GIB, (8, 9)),
    "L4": KnownModel(24 * GIB, (8, 9)),
    "A10": KnownModel(24 * GIB, (8, 6)),
    "A6000": KnownModel(48 * GIB, (8, 6)),
    "V100-32GB": KnownModel(32 * GIB, (7, 0)),
    "V100-16GB": KnownModel(16 * GIB, (7, 0)),
    "T4": KnownModel(16 * GIB, (7, 5)),
    "RTX4090": KnownModel(24 * GIB, (8, 9)),
    "RTX4080": KnownModel(16 * GIB, (8, 9)),
    "RTX3090": KnownModel(24 * GIB, (8, 6)),
    "RTX3080": KnownModel(10 * GIB, (8, 6)),
}
"""Models ``simulate_gpus`` accepts: name -> VRAM and CUDA compute capability."""

_SIM_ITEM = re.compile(r"^(?P<model>[A-Za-z0-9][A-Za-z0-9_.-]{0,31}):(?P<count>[0-9]{1,3})$")


def parse_simulate_gpus(spec: str) -> tuple[tuple[str, int], ...]:
    """Parse ``"A100-80GB:2,RTX4090:1"`` into ``(("A100-80GB", 2), ("RTX4090", 1))``.

    Model names match ``KNOWN_GPU_MODELS`` case-insensitively; an empty string means none.
    """
    if len(spec) > simulate_spec_chars_max:
        raise SimulateSpecError(f"simulate_gpus is longer than {simulate_spec_chars_max} chars")
    if not spec.strip():
        return ()
    by_upper = {name.upper(): name for name in KNOWN_GPU_MODELS}
    result: list[tuple[str, int]] = []
    seen: set[str] = set()
    for raw in spec.split(","):
        item = raw.strip()
        match = _SIM_ITEM.match(item)
        if match is None:
            raise SimulateSpecError(
                f"simulate_gpus item {item!r} is not MODEL:COUNT (e.g. 'A100-80GB:2')"
            )
        model = by_upper.get(match["model"].upper())
        if model is None:
            raise SimulateSpecError(
                f"simulate_gpus: unknown GPU model {match['model']!r}; "
                f"known: {', '.join(sorted(KNOWN_GPU_MODELS))}"
            )
        if model in seen:
            raise SimulateSpecError(f"simulate_gpus names {model} twice")
        seen.add(model)
        count = int(match["count"])
        if not 1 <= count <= simulated_gpus_per_model_max:
            raise SimulateSpecError(
                f"simulate_gpus: count for {model} must be 1..{simulated_gpus_per_model_max}"
            )
        result.append((model, count))
    if sum(count for _, count in result) > simulated_gpus_max:
        raise SimulateSpecError(f"simulate_gpus: more than {simulated_gpus_max} GPUs in total")
    return tuple(result)


def simulated_devices(spec: str, *, seed: str = "") -> tuple[GpuDevice, ...]:
    """Devices for a ``simulate_gpus`` spec; ``seed`` (e.g. the node address) makes UUIDs unique."""
    devices: list[GpuDevice] = []
    for model, count in parse_simulate_gpus(spec):
        known = KNOWN_GPU_MODELS[model]
        for _ in range(count):
            index = len(devices)
            devices.append(
                GpuDevice(
                    index=index,
                    uuid=GpuUuid(
                        f"GPU-sim-{seed[:16]}-{index:02d}" if seed else f"GPU-sim-{index:02d}"
                    ),
                    model=model,
                    vram_total_bytes=known.vram_bytes,
                    vram_free_bytes=known.vram_bytes,
                    utilization_pct=0,
                    compute_capability=known.compute_capability,
                    driver_version=SIMULATED_DRIVER_VERSION,
                    cuda_version=SIMULATED_CUDA_VERSION,
                    minor_number=-1,
                )
            )
    return tuple(devices)


def normalize_model_name(nvml_name: str) -> str:
    """``"NVIDIA GeForce RTX 4090"`` -> ``"RTX4090"``: the name prices and filters use."""
    name = nvml_name.strip()
    for prefix in ("NVIDIA ", "GeForce ", "Tesla ", "Quadro "):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.replace(" ", "")[:64] or "unknown"


class PynvmlAPI:
    """``NvmlAPI`` over the real ``pynvml`` bindings; every NVML failure becomes
    ``NvmlUnavailableError``."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: dict[int, Any] = {}

    def _call(self, name: str, *args: Any) -> Any:
        if self._nvml is None:
            raise NvmlUnavailableError("NVML is not initialised")
        try:
            return getattr(self._nvml, name)(*args)
        except self._nvml.NVMLError as exc:
            raise NvmlUnavailableError(f"{name}: {exc}") from exc

    def init(self) -> None:
        # pynvml warns on import that it is deprecated in favour of nvidia-ml-py (same module
        # name); the warning is not ours to act on and must not fail a warnings-as-errors run.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            try:
                import pynvml
            except ImportError as exc:
                raise NvmlUnavailableError(f"pynvml is not installed: {exc}") from exc
        self._nvml = pynvml
        self._call("nvmlInit")

    def shutdown(self) -> None:
        if self._nvml is not None:
            self._call("nvmlShutdown")
            self._handles.clear()

    def _handle(self, index: int) -> Any:
        handle = self._handles.get(index)
        if handle is None:
            handle = self._call("nvmlDeviceGetHandleByIndex", index)
            self._handles[index] = handle
        return handle

    @staticmethod
    def _text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    def driver_version(self) -> str:
        return self._text(self._call("nvmlSystemGetDriverVersion"))

    def cuda_driver_version(self) -> int:
        return int(self._call("nvmlSystemGetCudaDriverVersion"))

    def device_count(self) -> int:
        return int(self._call("nvmlDeviceGetCount"))

    def device_name(self, index: int) -> str:
        return self._text(self._call("nvmlDeviceGetName", self._handle(index)))

    def device_uuid(self, index: int) -> str:
        return self._text(self._call("nvmlDeviceGetUUID", self._handle(index)))

    def device_memory(self, index: int) -> tuple[int, int]:
        info = self._call("nvmlDeviceGetMemoryInfo", self._handle(index))
        return int(info.total), int(info.free)

    def device_utilization_pct(self, index: int) -> int:
        return int(self._call("nvmlDeviceGetUtilizationRates", self._handle(index)).gpu)

    def device_compute_capability(self, index: int) -> tuple[int, int]:
        major, minor = self._call("nvmlDeviceGetCudaComputeCapability", self._handle(index))
        return int(major), int(minor)

    def device_minor_number(self, index: int) -> int:
        return int(self._call("nvmlDeviceGetMinorNumber", self._handle(index)))


InventorySource = Literal["nvml", "simulated", "none"]


@dataclasses.dataclass(frozen=True)
class Inventory:
    """This node's devices at one moment, plus CPU and memory."""

    source: InventorySource
    gpus: tuple[GpuDevice, ...]
    cpu_cores: int
    memory_bytes: int
    nvml_error: str = ""
    device_errors: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "source": self.source,
            "gpus": [gpu.to_json() for gpu in self.gpus],
            "gpu_count": len(self.gpus),
            "cpu_cores": self.cpu_cores,
            "memory_bytes": self.memory_bytes,
            "nvml_error": self.nvml_error,
            "device_errors": list(self.device_errors),
        }


def host_cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) or 1


def host_memory_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _read_nvml(nvml: NvmlAPI) -> tuple[tuple[GpuDevice, ...], tuple[str, ...]]:
    driver = nvml.driver_version()
    cuda_raw = nvml.cuda_driver_version()
    cuda = (cuda_raw // 1000, (cuda_raw % 1000) // 10)
    count = nvml.device_count()
    if not 0 <= count <= nvml_devices_max:
        raise NvmlUnavailableError(f"NVML reported {count} devices")
    devices: list[GpuDevice] = []
    errors: list[str] = []
    for index in range(count):
        # One broken device (fallen off the bus, ECC lockout) must not hide the healthy ones.
        try:
            total, free = nvml.device_memory(index)
            device = GpuDevice(
                index=index,
                uuid=GpuUuid(nvml.device_uuid(index)),
                model=normalize_model_name(nvml.device_name(index)),
                vram_total_bytes=total,
                vram_free_bytes=free,
                utilization_pct=nvml.device_utilization_pct(index),
                compute_capability=nvml.device_compute_capability(index),
                driver_version=driver,
                cuda_version=cuda,
                minor_number=nvml.device_minor_number(index),
            )
        except NvmlUnavailableError as exc:
            errors.append(f"device {index}: {exc}")
            continue
        devices.append(device)
    return tuple(devices), tuple(errors)


def read_inventory(
    *, simulate_gpus: str = "", nvml: NvmlAPI | None = None, simulate_seed: str = ""
) -> Inventory:
    """Probe this machine. ``simulate_gpus`` wins over NVML; NVML failure means CPU-only."""
    cores, memory = host_cpu_cores(), host_memory_bytes()
    if simulate_gpus.strip():
        gpus = simulated_devices(simulate_gpus, seed=simulate_seed)
        return Inventory("simulated", gpus, cores, memory)
    api: NvmlAPI = nvml if nvml is not None else PynvmlAPI()
    try:
        api.init()
    except NvmlUnavailableError as exc:
        return Inventory("none", (), cores, memory, nvml_error=str(exc))
    try:
        gpus, errors = _read_nvml(api)
    except NvmlUnavailableError as exc:
        return Inventory("none", (), cores, memory, nvml_error=str(exc))
    finally:
        try:
            api.shutdown()
        except NvmlUnavailableError:
            pass  # the readings are taken; a failed shutdown changes nothing we report
    if not gpus:
        return Inventory(
            "none", (), cores, memory, nvml_error="NVML found no usable GPU", device_errors=errors
        )
    return Inventory("nvml", gpus, cores, memory, device_errors=errors)
