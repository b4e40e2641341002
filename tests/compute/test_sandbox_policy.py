"""Which sandbox a node provides in, and how a requester's sandbox requirement is matched.

No silent weak fallback: a node whose bwrap does not work does not provide at all, unless the
operator chose ``[compute] sandbox = "process"`` by name; the kind shows in the offer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import compute
import ledger
from compute.market import JobState, Requirements, Role, explain_unsatisfiable, fit_on_node
from compute.testing import make_offer
from node._compute import ComputeService
from node._config import ComputeSection
from node.cli import build_parser
from node.commands.info import provider_text
from node.commands.job import submit_params
from node.exceptions import ConfigError
from tests.compute.test_sandbox import need_bwrap

KEY = ledger.SigningKey(b"\x07" * 32)
CHAIN = "gpumesh-test"
NOW = 1_700_000_000_000


@pytest.fixture
def work_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="gpumesh-policy-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    yield root
    shutil.rmtree(root)


@pytest.fixture
def no_bwrap(monkeypatch: pytest.MonkeyPatch, work_root: Path) -> None:
    """A machine without bubblewrap: PATH holds only a directory without it."""
    empty = work_root / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert compute.probe_bwrap() is not None


def service(work_root: Path, monkeypatch: pytest.MonkeyPatch, **config: Any) -> ComputeService:
    monkeypatch.setattr("node._compute.jobs_root", lambda _address: work_root / "jobs")
    section = ComputeSection(simulate_gpus="RTX4090:1", **config)
    return ComputeService(key=KEY, chain_id=CHAIN, mesh=None, config=section)  # type: ignore[arg-type]


@pytest.mark.usefixtures("no_bwrap")
def test_executor_does_not_fall_back_to_plain_processes(work_root: Path) -> None:
    with pytest.raises(compute.SandboxError, match="bwrap"):
        compute.Executor(work_root / "jobs")


@pytest.mark.usefixtures("no_bwrap")
def test_node_without_bwrap_refuses_to_provide(
    work_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = service(work_root, monkeypatch)
    assert svc.executor is None, "a node without a working bwrap must not run other people's jobs"
    assert svc.publisher is None, "and must not publish an offer"
    info = svc.provider_json()
    assert info["providing"] is False
    assert "bwrap" in str(info["refused"]), "the operator is told why"


@pytest.mark.usefixtures("no_bwrap")
def test_process_sandbox_only_when_chosen_and_it_shows(
    work_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = service(work_root, monkeypatch, sandbox="process")
    assert svc.executor is not None and svc.executor.sandbox == "process"
    assert svc.publisher is not None
    assert svc.publisher.make_offer().sandbox == "process", "the offer names the weak sandbox"
    assert svc.provider_json() == {"providing": True, "sandbox": "process", "refused": None}
    with pytest.raises(ConfigError, match="sandbox"):
        ComputeSection(sandbox="none")


def test_requester_can_require_a_sandbox_kind() -> None:
    allocator = compute.SlotAllocator(compute.simulated_devices("RTX4090:1"))
    weak = compute.OfferConfig(sandbox="process")
    strong = compute.OfferConfig(sandbox="bwrap")
    need_bwrap = Requirements(gpus=1, sandbox="bwrap")
    assert fit_on_node(need_bwrap, allocator, weak) is None, "a process node must not bid"
    assert fit_on_node(need_bwrap, allocator, strong) is not None
    assert fit_on_node(Requirements(gpus=1), allocator, weak) is not None, "no requirement: any"
    offer = make_offer(KEY, chain_id=CHAIN, now_ms=NOW, simulate_gpus="RTX4090:1")
    assert offer.sandbox == "process"
    why = explain_unsatisfiable([offer], need_bwrap, 10**6)
    assert why is not None and "bwrap" in why, why
    assert explain_unsatisfiable([offer], Requirements(gpus=1), 10**6) is None
    with pytest.raises(ValueError, match="sandbox"):
        Requirements(sandbox="chroot")
    decoded = ledger.decode(Requirements, ledger.encode(need_bwrap))
    assert decoded == need_bwrap, "the requirement travels in the signed job request"


@pytest.mark.usefixtures("no_bwrap")
def test_process_sandbox_refused_without_per_job_uids(
    work_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # an unprivileged daemon
    svc = service(work_root, monkeypatch, sandbox="process")
    assert svc.executor is None, "process jobs under the daemon's own uid could read its key"
    assert "root" in str(svc.provider_refused)


def test_requester_limits_are_bounded_by_what_the_offer_advertises() -> None:
    config = compute.OfferConfig(job_memory_bytes_max=1 << 30, job_disk_bytes_max=2 << 30)
    limits = config.job_limits(5_000, memory_bytes=256 << 20, disk_bytes=1 << 30)
    assert (limits.wall_time_ms, limits.memory_bytes, limits.disk_bytes) == (
        5_000,
        256 << 20,
        1 << 30,
    ), "the job runs under the limits its requester stated"
    default = config.job_limits(5_000)
    assert default.memory_bytes == 1 << 30, "no stated memory: the default, capped at the max"
    with pytest.raises(compute.JobSpecError, match="allows"):
        config.job_limits(5_000, memory_bytes=2 << 30)
    allocator = compute.SlotAllocator(compute.simulated_devices("RTX4090:1"))
    assert fit_on_node(Requirements(gpus=1, memory_bytes=1 << 30), allocator, config) is not None
    assert fit_on_node(Requirements(gpus=1, memory_bytes=3 << 30), allocator, config) is None
    assert fit_on_node(Requirements(gpus=1, disk_bytes=3 << 30), allocator, config) is None
    offer = make_offer(KEY, chain_id=CHAIN, now_ms=NOW, simulate_gpus="RTX4090:1", config=config)
    assert (offer.job_memory_bytes_max, offer.job_disk_bytes_max) == (1 << 30, 2 << 30)
    compute.validate_offer(offer, chain_id=CHAIN, now_ms=NOW)
    assert compute.decode_offer(ledger.encode(offer)) == offer
    why = explain_unsatisfiable([offer], Requirements(gpus=1, memory_bytes=3 << 30), 10**6)
    assert why is not None and "memory" in why, why
    assert explain_unsatisfiable([offer], Requirements(gpus=1, memory_bytes=1 << 30), 10**6) is None


async def test_node_deletes_job_dirs_the_market_is_done_with(
    work_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = service(work_root, monkeypatch, sandbox="process")
    assert svc.executor is not None
    failed, settled = b"\x01" * 32, b"\x02" * 32
    for attempt in (failed, settled):
        job = compute.JobId(attempt.hex())
        await svc.executor.run(job, compute.JobSpec(("/bin/true",)))
    send, receive = trio.open_memory_channel[Any](8)

    class Event:
        def __init__(self, attempt: bytes, state: JobState) -> None:
            self.role, self.state, self.attempt_job_id = Role.PROVIDER, state, attempt

    async with send:
        await send.send(Event(failed, JobState.FAILED))
        await send.send(Event(settled, JobState.DONE))
    await svc.release_finished_jobs(receive)
    assert not svc.executor.job_dir(compute.JobId(failed.hex())).exists(), "failed job kept"
    assert svc.executor.job_dir(compute.JobId(settled.hex())).exists(), (
        "a settled job keeps its outputs until fetched or past the retention"
    )


def test_job_submit_flags_carry_sandbox_memory_and_disk() -> None:
    argv = ["job", "submit", "--sandbox", "bwrap", "--memory", "2GB", "--disk", "10GB"]
    args = build_parser().parse_args([*argv, "--", "/bin/true"])
    params = submit_params(args)
    assert params["sandbox"] == "bwrap"
    assert (params["memory_bytes"], params["disk_bytes"]) == (2 << 30, 10 << 30)
    plain = submit_params(build_parser().parse_args(["job", "submit", "--", "/bin/true"]))
    assert "sandbox" not in plain and "memory_bytes" not in plain, "unset: provider defaults"
    assert provider_text({"providing": False, "refused": "bwrap broke"}).endswith("bwrap broke")
    assert "process" in provider_text({"providing": True, "sandbox": "process"})


async def test_default_node_runs_jobs_under_bwrap_with_its_own_uids(
    work_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need_bwrap()
    svc = service(work_root, monkeypatch, job_uid_first=1_950_000_000, job_uid_count=4)
    assert svc.executor is not None and svc.executor.sandbox == "bwrap"
    assert svc.provider_json() == {"providing": True, "sandbox": "bwrap", "refused": None}
    result = await svc.executor.run(compute.JobId("node-1"), compute.JobSpec(("/usr/bin/id", "-u")))
    assert result.succeeded, result.reason
    if os.geteuid() == 0:
        assert result.uid in range(1_950_000_000, 1_950_000_004), "the configured uid range"
    assert await svc.sweep_job_dirs() == 0, "a fresh job's directory stays for the retention"
    svc.executor.close()
