"""The allocator never double books: a hypothesis state machine against a simple model."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import compute

GPUS = compute.simulated_devices("A100-80GB:2,RTX4090:3")


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.per_gpu = 2
        self.allocator = compute.SlotAllocator(GPUS, jobs_per_gpu=self.per_gpu, cpu_slots=2)
        self.held: dict[str, compute.Allocation] = {}
        self.counter = 0

    @rule(
        gpus=st.integers(0, 4),
        model=st.sampled_from([None, "A100-80GB", "rtx4090"]),
        min_vram=st.sampled_from([0, 40 * 1024**3]),
    )
    def allocate(self, gpus: int, model: str | None, min_vram: int) -> None:
        self.counter += 1
        job = compute.JobId(f"job-{self.counter}")
        try:
            allocation = self.allocator.allocate(job, gpus, model=model, min_vram_bytes=min_vram)
        except compute.NoCapacityError:
            return
        assert len(allocation.gpu_indices) == gpus, "a job gets exactly what it asked for"
        assert len(set(allocation.gpu_indices)) == gpus, "a job's GPUs are distinct"
        assert len({GPUS[i].model for i in allocation.gpu_indices}) <= 1, "one model per job"
        for i in allocation.gpu_indices:
            assert GPUS[i].vram_total_bytes >= min_vram, "VRAM filter respected"
        self.held[job] = allocation

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if not self.held:
            return
        job = data.draw(st.sampled_from(sorted(self.held)))
        self.allocator.release(compute.JobId(job))
        del self.held[job]

    @rule()
    def double_allocate_is_refused(self) -> None:
        if self.held:
            job = next(iter(self.held))
            with pytest.raises(compute.AllocationError):
                self.allocator.allocate(compute.JobId(job), 0)

    @invariant()
    def never_double_booked(self) -> None:
        load = [0] * len(GPUS)
        cpu = 0
        for allocation in self.held.values():
            for i in allocation.gpu_indices:
                load[i] += 1
            cpu += not allocation.gpu_indices
        assert all(n <= self.per_gpu for n in load), f"GPU over-booked: {load}"
        assert cpu <= 2, "CPU slots over-booked"
        free = self.allocator.free_slots_per_gpu()
        assert list(free) == [self.per_gpu - n for n in load], "free slots match the bookings"
        assert self.allocator.free_cpu_slots == 2 - cpu


AllocatorMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40)
TestAllocator = AllocatorMachine.TestCase


def test_one_job_per_gpu_by_default() -> None:
    allocator = compute.SlotAllocator(compute.simulated_devices("RTX4090:2"))
    allocator.allocate(compute.JobId("a"), 2)
    with pytest.raises(compute.NoCapacityError):
        allocator.allocate(compute.JobId("b"), 1)
    with pytest.raises(compute.NoCapacityError):
        allocator.allocate(compute.JobId("c"), 0)  # a GPU node has no CPU slots by default
    allocator.release(compute.JobId("a"))
    assert allocator.allocate(compute.JobId("b"), 1).slot_count == 1
    with pytest.raises(compute.AllocationError):
        allocator.release(compute.JobId("zzz"))
