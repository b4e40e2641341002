"""Inventory: simulate_gpus parsing, NVML translation through the seam, real fail-soft path."""

from __future__ import annotations

import warnings

import pytest

import compute
from compute.testing import FakeGpu, FakeNvml


def test_simulate_spec_parses_models_and_counts() -> None:
    assert compute.parse_simulate_gpus("A100-80GB:2, rtx4090:1") == (
        ("A100-80GB", 2),
        ("RTX4090", 1),
    ), "models are matched case-insensitively and whitespace is ignored"
    assert compute.parse_simulate_gpus("") == (), "empty spec means no simulated GPUs"


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("A100-80GB", "MODEL:COUNT"),
        ("A100-80GB:0", "count"),
        ("A100-80GB:17", "count"),
        ("B200:1", "unknown GPU model"),
        ("A100-80GB:1,A100-80GB:1", "twice"),
        ("A100-80GB:1;RTX4090:1", "MODEL:COUNT"),
        ("RTX4090:-1", "MODEL:COUNT"),
        ("x" * 2000, "longer"),
    ],
)
def test_simulate_spec_rejects_bad_formats(spec: str, fragment: str) -> None:
    with pytest.raises(compute.SimulateSpecError, match=fragment):
        compute.parse_simulate_gpus(spec)


def test_simulated_inventory_uses_the_model_table() -> None:
    inv = compute.read_inventory(simulate_gpus="A100-80GB:2,RTX4090:1", simulate_seed="ab" * 16)
    assert inv.source == "simulated"
    assert [g.model for g in inv.gpus] == ["A100-80GB", "A100-80GB", "RTX4090"]
    assert inv.gpus[0].vram_total_bytes == 80 * 1024**3, "A100-80GB has 80 GiB"
    assert inv.gpus[2].compute_capability == (8, 9), "RTX4090 is compute capability 8.9"
    assert len({g.uuid for g in inv.gpus}) == 3, "simulated UUIDs must be distinct"
    assert inv.cpu_cores >= 1, "CPU cores are always advertised"
    assert inv.memory_bytes > 0, "memory is always advertised"


def test_nvml_devices_are_translated() -> None:
    nvml = FakeNvml(
        [
            FakeGpu(uuid="GPU-a", minor_number=0),
            FakeGpu(
                name="NVIDIA A100-SXM4-80GB",
                uuid="GPU-b",
                compute_capability=(8, 0),
                total_bytes=80 * 1024**3,
                minor_number=1,
            ),
        ],
        cuda=12020,
    )
    inv = compute.read_inventory(nvml=nvml)
    assert inv.source == "nvml", f"expected NVML inventory, got {inv.nvml_error}"
    assert [g.model for g in inv.gpus] == ["RTX4090", "A100-SXM4-80GB"], "names are normalised"
    assert inv.gpus[0].cuda_version == (12, 2), "12020 is CUDA 12.2"
    assert inv.gpus[1].vram_total_bytes == 80 * 1024**3
    assert inv.gpus[0].vram_free_bytes == 20 * 1024**3
    assert inv.gpus[0].utilization_pct == 7
    assert inv.gpus[0].driver_version == "550.54.15"
    assert not nvml.initialised, "NVML is shut down after the probe"
    row = inv.to_json()
    assert row["gpu_count"] == 2
    assert row["gpus"][1]["compute_capability"] == "8.0"


def test_one_broken_device_does_not_hide_the_others() -> None:
    nvml = FakeNvml([FakeGpu(uuid="GPU-a"), FakeGpu(uuid="GPU-b", broken=True)])
    inv = compute.read_inventory(nvml=nvml)
    assert [g.uuid for g in inv.gpus] == ["GPU-a"], "the healthy GPU is still listed"
    assert inv.device_errors, "the broken GPU is reported"
    assert "lost" in inv.device_errors[0], inv.device_errors


def test_no_driver_means_cpu_only() -> None:
    inv = compute.read_inventory(nvml=FakeNvml([], init_error="Driver Not Loaded"))
    assert inv.source == "none", "a failed init makes a CPU-only node"
    assert inv.gpus == ()
    assert "Driver Not Loaded" in inv.nvml_error
    inv = compute.read_inventory(nvml=FakeNvml([]))
    assert inv.source == "none"
    assert "no usable GPU" in inv.nvml_error


def test_real_nvml_fails_soft_without_the_library() -> None:
    # pynvml is installed here but libnvidia-ml.so is not: the real path must not raise, and
    # must not leak pynvml's import-time FutureWarning into a warnings-as-errors run.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inv = compute.read_inventory()
    if inv.source == "nvml":
        pytest.skip("this machine has a working NVML; the fail-soft path is not reachable")
    assert inv.source == "none"
    assert inv.gpus == ()
    assert "NVML" in inv.nvml_error or "nvml" in inv.nvml_error.lower(), inv.nvml_error
    assert inv.cpu_cores >= 1, "a CPU-only node still advertises its cores"
    allocator = compute.SlotAllocator(inv.gpus)
    assert allocator.total_cpu_slots == 1, "a CPU-only node gets a CPU slot by default"
