"""The executor with real subprocesses, under bwrap (when it works here) and plain processes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import msgpack
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import compute
import ledger

BWRAP_ERROR = compute.probe_bwrap(sandbox_uid=compute.default_sandbox_uid())
CI = os.environ.get("CI") == "true"
"""Under CI a missing bwrap fails the bwrap tests (scripts/setup.sh installs it); else skips."""
PYTHON = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
KINDS = [
    pytest.param(
        "bwrap",
        marks=pytest.mark.skipif(BWRAP_ERROR is not None and not CI, reason=f"{BWRAP_ERROR}"),
    ),
    "process",
]


def need_bwrap() -> None:
    if BWRAP_ERROR is not None:
        if CI:
            pytest.fail(f"CI=true and bwrap does not work: {BWRAP_ERROR}")
        pytest.skip(BWRAP_ERROR)


@pytest.fixture
def work_root() -> Iterator[Path]:
    # Not tmp_path: its base is 0700 (job uids cannot cross it) and under /tmp (private to jobs).
    root = Path(tempfile.mkdtemp(prefix="gpumesh-compute-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    yield root / "jobs"
    shutil.rmtree(root)


@pytest.fixture(params=KINDS)
def executor(request: pytest.FixtureRequest, work_root: Path) -> Iterator[compute.Executor]:
    ex = compute.Executor(work_root, sandbox=request.param, memory_poll_ms=50)
    yield ex
    ex.close()


def marker() -> str:
    """A unique ``sleep`` argument, so the test can find the job's processes in /proc."""
    return f"{random.randrange(10**5, 10**6)}.{random.randrange(10**6):06d}"


def live_processes_with(text: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            state = Path(f"/proc/{name}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if text.encode() in cmdline and state != b"Z":
            found.append(int(name))
    return found


def spec(script: str, **limits: int) -> compute.JobSpec:
    return compute.JobSpec(("/bin/sh", "-c", script), limits=compute.JobLimits(**limits))


async def test_job_runs_with_inputs_and_hashed_outputs(executor: compute.Executor) -> None:
    job = compute.JobSpec(
        ("/bin/sh", "-c", 'cat data/in.txt; printf abc > "$GPUMESH_OUTPUT_DIR/a.txt"; '
         "mkdir out/sub; printf xyz > out/sub/b.bin; ln -s /etc/passwd out/link; echo err >&2"),
        inputs=(("data/in.txt", b"hello input\n"),),
    )  # fmt: skip
    result = await executor.run(compute.JobId("ok-1"), job)
    assert result.outcome is compute.JobOutcome.SUCCEEDED, result.reason
    assert result.stdout == b"hello input\n", "inputs land in the working directory"
    assert result.stderr == b"err\n"
    assert [o.path for o in result.outputs] == ["a.txt", "sub/b.bin"], "links are not outputs"
    assert result.outputs[0].sha256 == hashlib.sha256(b"abc").digest()
    # The digest definition from the docs, computed independently of the implementation.
    expected = hashlib.sha256(
        msgpack.packb([[o.path, o.size_bytes, o.sha256] for o in result.outputs])
    ).digest()
    assert result.outputs_digest == expected, "outputs digest differs from its definition"
    assert result.usage_gpu_ms == result.wall_ms, "a CPU job counts as one slot"
    assert result.sandbox == executor.sandbox


async def test_an_ended_job_keeps_only_its_outputs_on_disk(executor: compute.Executor) -> None:
    """The job's copies of its inputs and its scratch go when it ends (the node keeps its own
    inputs); its outputs stay, one hard-linked to an input included."""
    job = compute.JobSpec(
        ("/bin/sh", "-c", "mkdir -p scratch/deep && head -c 4096 /dev/zero > scratch/deep/z; "
         "ln data/in.bin out/same.bin; printf ok > out/ok.txt; ln -s /etc scratch/etc"),
        inputs=(("data/in.bin", b"x" * 10_000),),
    )  # fmt: skip
    result = await executor.run(compute.JobId("scratch-1"), job)
    assert result.outcome is compute.JobOutcome.SUCCEEDED, result.reason
    work = executor.job_dir(compute.JobId("scratch-1")) / "work"
    assert sorted(p.name for p in work.iterdir()) == ["out"], "scratch or inputs stayed"
    assert (work / "out" / "same.bin").read_bytes() == b"x" * 10_000
    assert [o.path for o in result.outputs] == ["ok.txt", "same.bin"]


async def test_timeout_kills_the_job_and_its_grandchildren(executor: compute.Executor) -> None:
    tag = marker()
    script = f"sleep {tag} & (sleep {tag} &) ; sleep {tag}; wait"
    result = await executor.run(compute.JobId("timeout-1"), spec(script, wall_time_ms=1500))
    assert result.outcome is compute.JobOutcome.TIMED_OUT, result.reason
    assert live_processes_with(tag) == [], "a child or grandchild of the job survived the kill"


async def test_bwrap_kills_even_a_setsid_escapee(work_root: Path) -> None:
    need_bwrap()
    executor = compute.Executor(work_root, sandbox="bwrap")
    tag = marker()
    result = await executor.run(
        compute.JobId("escape-1"), spec(f"setsid sleep {tag} & sleep 0.2; exit 0")
    )
    assert result.outcome is compute.JobOutcome.SUCCEEDED, result.reason
    assert live_processes_with(tag) == [], "a setsid grandchild outlived the bwrap sandbox"


async def test_cancelled_job_stops_within_a_second(executor: compute.Executor) -> None:
    tag = marker()
    job = compute.JobId("cancel-1")
    started_file = executor.job_dir(job) / "work" / "out" / "started"
    done = trio.Event()

    async def run_job() -> None:
        try:
            await executor.run(job, spec(f"touch out/started; sleep {tag} & sleep {tag}"))
        finally:
            done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_job)
        # Poll a condition the job sets, bounded in count and time (no event crosses processes).
        with trio.fail_after(20):
            for _ in range(1000):
                if started_file.exists():
                    break
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
        cancelled_at = trio.current_time()
        await done.wait()
    assert trio.current_time() - cancelled_at < 1.0, "cancellation took more than a second"
    assert live_processes_with(tag) == [], "the job survived cancellation"


@pytest.mark.skipif(PYTHON is None, reason="no python3 under /usr/bin for the job")
async def test_memory_cap_fails_with_a_clear_reason(executor: compute.Executor) -> None:
    assert PYTHON is not None
    job = compute.JobSpec(
        (PYTHON, "-c", "import time; a = b'x' * (160 << 20); time.sleep(30)"),
        limits=compute.JobLimits(memory_bytes=64 << 20, wall_time_ms=30_000),
    )
    result = await executor.run(compute.JobId("mem-1"), job)
    assert result.outcome is compute.JobOutcome.MEMORY_LIMIT, (result.outcome, result.reason)
    assert "memory" in result.reason


async def test_stdout_cap_fails_the_job(executor: compute.Executor) -> None:
    result = await executor.run(compute.JobId("spam-1"), spec("yes", stdout_bytes_max=10_000))
    assert result.outcome is compute.JobOutcome.STDOUT_LIMIT, result.reason
    assert len(result.stdout) == 10_000, "captured output is cut at the cap"


async def test_output_cap_fails_the_job(executor: compute.Executor) -> None:
    script = "head -c 300000 /dev/zero > out/a; head -c 300000 /dev/zero > out/b"
    result = await executor.run(compute.JobId("out-1"), spec(script, output_bytes_max=500_000))
    assert result.outcome is compute.JobOutcome.OUTPUT_LIMIT, result.reason
    assert result.outputs == (), "no partial output set is reported"


async def test_file_size_and_cpu_time_limits(executor: compute.Executor) -> None:
    result = await executor.run(
        compute.JobId("fsize-1"),
        spec("head -c 3000000 /dev/zero > out/big", file_size_bytes=1_000_000),
    )
    assert result.outcome is compute.JobOutcome.FILE_SIZE_LIMIT, result.reason
    result = await executor.run(
        compute.JobId("cpu-1"), spec("while :; do :; done", cpu_time_s=1, wall_time_ms=60_000)
    )
    assert result.outcome is compute.JobOutcome.CPU_TIME_LIMIT, result.reason


async def test_job_sees_only_its_gpus_and_a_scrubbed_environment(
    executor: compute.Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUMESH_TEST_SECRET", "do-not-leak")
    allocator = compute.SlotAllocator(compute.simulated_devices("RTX4090:3"))
    allocator.allocate(compute.JobId("other"), 1)  # GPU 0 belongs to someone else
    mine = allocator.allocate(compute.JobId("gpu-1"), 2)
    job = compute.JobSpec(("/usr/bin/env",), env=(("MY_SETTING", "1"),))
    result = await executor.run(compute.JobId("gpu-1"), job, mine)
    assert result.outcome is compute.JobOutcome.SUCCEEDED, result.reason
    env = dict(line.split("=", 1) for line in result.stdout.decode().splitlines())
    assert env["CUDA_VISIBLE_DEVICES"] == ",".join(mine.gpu_uuids), "only the allocated GPUs"
    assert allocator.gpus[0].uuid not in env["CUDA_VISIBLE_DEVICES"]
    assert "GPUMESH_TEST_SECRET" not in env, "the daemon's environment leaked into the job"
    assert env["MY_SETTING"] == "1", "the job's own environment is passed"
    assert result.usage_gpu_ms == result.wall_ms * 2, "usage is wall time x GPUs"

    cpu = await executor.run(compute.JobId("gpu-2"), compute.JobSpec(("/usr/bin/env",)))
    cpu_env = dict(line.split("=", 1) for line in cpu.stdout.decode().splitlines())
    assert cpu_env["CUDA_VISIBLE_DEVICES"] == "", "a CPU job sees no GPU at all"


async def test_bwrap_isolates_network_and_filesystem(work_root: Path) -> None:
    need_bwrap()
    executor = compute.Executor(work_root, sandbox="bwrap")
    result = await executor.run(
        compute.JobId("iso-1"),
        spec("cat /proc/net/dev; test -e /work && echo HOST-VISIBLE; touch /usr/x || echo RO"),
    )
    assert result.outcome is compute.JobOutcome.SUCCEEDED, result.reason
    interfaces = [ln.split(b":")[0].strip() for ln in result.stdout.splitlines()[2:] if b":" in ln]
    assert interfaces == [b"lo"], f"the job saw network interfaces {interfaces}"
    assert b"HOST-VISIBLE" not in result.stdout, "the host's /work is visible in the sandbox"
    assert b"RO" in result.stdout, "/usr must be read-only"


def test_job_dirs_are_private_and_bad_specs_refused(work_root: Path) -> None:
    executor = compute.Executor(work_root, sandbox="process")
    assert stat.S_IMODE(executor.work_root.stat().st_mode) & 0o077 in (0, 0o011)
    for bad in (
        compute.JobSpec(()),
        compute.JobSpec(("/bin/true",), inputs=(("../escape", b""),)),
        compute.JobSpec(("/bin/true",), inputs=(("/abs", b""),)),
        compute.JobSpec(("/bin/true",), env=(("CUDA_VISIBLE_DEVICES", "0,1,2,3"),)),
    ):
        with pytest.raises(compute.JobSpecError):
            bad.validate()
    with pytest.raises(compute.JobSpecError):
        compute.JobLimits(wall_time_ms=0)


async def test_run_job_releases_slots_however_it_ends(executor: compute.Executor) -> None:
    allocator = compute.SlotAllocator(compute.simulated_devices("RTX4090:1"))
    result = await compute.run_job(
        executor, allocator, compute.JobId("rj-1"), spec("exit 3"), gpu_count=1
    )
    assert result.outcome is compute.JobOutcome.EXIT_NONZERO, result.reason
    assert result.exit_code == 3
    assert allocator.free_slots_per_gpu() == (1,), "a failed job must give its GPU back"
    with trio.move_on_after(0.5):
        await compute.run_job(
            executor, allocator, compute.JobId("rj-2"), spec("sleep 30"), gpu_count=1
        )
    assert allocator.free_slots_per_gpu() == (1,), "a cancelled job must give its GPU back"
    assert sorted(executor.leftover_jobs()) == ["rj-1", "rj-2"]
    executor.remove_job_dir(compute.JobId("rj-1"))
    assert executor.leftover_jobs() == ["rj-2"]


async def test_resources_snapshot_is_json(executor: compute.Executor) -> None:
    inventory = compute.read_inventory(simulate_gpus="A100-80GB:2")
    allocator = compute.SlotAllocator(inventory.gpus)
    allocator.allocate(compute.JobId("snap"), 1)
    snapshot = compute.resources_snapshot(
        inventory=inventory, allocator=allocator, sandbox=executor.sandbox, executor=executor
    )
    decoded = json.loads(json.dumps(snapshot))
    assert decoded["inventory"]["gpu_count"] == 2
    assert decoded["slots"]["gpu_slots_free"] == 1, "the allocation shows in the snapshot"
    assert decoded["sandbox"]["sandbox"] == executor.sandbox


def live_jobs_running(comm: str, text: str) -> list[int]:
    """Live processes named ``comm`` (``/proc/PID/comm``) with ``text`` in their command line:
    the job itself, not the bwrap around it (whose command line holds the job's too)."""
    found = []
    for pid in live_processes_with(text):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                found.append(pid)
        except OSError:
            continue
    return found


DAEMON = """
import sys, trio, compute
async def main():
    ex = compute.Executor(sys.argv[1], sandbox=sys.argv[2])
    print(ex.lifeline.pid, flush=True)
    async with trio.open_nursery() as n:
        n.start_soon(ex.run, compute.JobId("orphan"), compute.JobSpec(tuple(sys.argv[3:])))
trio.run(main)
"""

JOBS = {
    "leader": lambda tag: ("sleep", tag),
    # A grandchild in a session of its own: neither the leader's death nor a signal to its
    # process group reaches it; only its cgroup does.
    "setsid-grandchild": lambda tag: ("/bin/sh", "-c", f"setsid sleep {tag} & wait"),
}


@pytest.mark.parametrize("job", sorted(JOBS))
@pytest.mark.parametrize("when", ["running", "starting"])
@pytest.mark.parametrize("kind", KINDS)
async def test_job_dies_with_a_killed_daemon(
    work_root: Path, kind: str, when: str, job: str
) -> None:
    """kill -9 of the daemon, once the job runs or while its sandbox is still being set up
    (bwrap's own ``--die-with-parent`` has a gap there): nothing of the job lives on."""
    tag = marker()
    async with trio.open_nursery() as nursery:
        daemon = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-c", DAEMON, str(work_root), kind, *JOBS[job](tag)],
                stdout=subprocess.PIPE,
                check=False,
                cwd=str(Path(compute.__file__).parents[1]),
            )
        )
        with trio.fail_after(20):
            reaper = os.pidfd_open(int(await daemon.stdout.receive_some(100)))
            seen: set[int] = set()
            for _ in range(2000):
                # The daemon's own command line holds the tag too; a child of it that does
                # is being forked into the job (or is the job's bwrap). Read once: a process
                # in the middle of an exec may show no command line for a moment.
                if when == "starting":
                    seen = set(live_processes_with(tag)) - {daemon.pid}
                else:
                    seen = set(live_jobs_running("sleep", tag))
                if seen:
                    break
                await trio.sleep(0.005 if when == "starting" else 0.02)
        assert seen, "the job never started"
        daemon.kill()
    # The reaper exits once it has killed the job's cgroup until it was empty (its pidfd then
    # reads as ready).
    try:
        with trio.fail_after(10):
            await trio.lowlevel.wait_readable(reaper)
    finally:
        os.close(reaper)
    assert live_processes_with(tag) == [], "the job outlived its killed daemon"


async def test_jobs_outlive_the_worker_threads_that_started_them(work_root: Path) -> None:
    """trio starts each job from a worker thread that exits after 10 s idle; a parent-death
    signal would kill the job then (it is tied to the thread, not the process). Both sandbox
    kinds at once, with no other thread work while they run (disk polls off)."""
    need_bwrap()
    executors = [
        compute.Executor(work_root / kind, sandbox=kind, disk_poll_ms=60_000)
        for kind in ("bwrap", "process")
    ]
    results: dict[str, compute.JobResult] = {}

    async def run(ex: compute.Executor) -> None:
        results[ex.sandbox] = await ex.run(compute.JobId(f"long-{ex.sandbox}"), spec("sleep 11.5"))

    try:
        async with trio.open_nursery() as nursery:
            for ex in executors:
                nursery.start_soon(run, ex)
    finally:
        for ex in executors:
            ex.close()
    for kind, result in sorted(results.items()):
        assert result.succeeded and result.exit_code == 0, f"{kind}: {result.reason}"
    assert sorted(results) == ["bwrap", "process"]


@given(
    argv=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=5),
    inputs=st.dictionaries(
        st.from_regex(r"[a-z]{1,8}(/[a-z]{1,8}){0,2}", fullmatch=True), st.binary(max_size=64),
        max_size=4,
    ),
    wall=st.integers(1, 10**6),
)  # fmt: skip
def test_job_spec_codec_round_trip(argv: list[str], inputs: dict[str, bytes], wall: int) -> None:
    job = compute.JobSpec(
        tuple(argv), tuple(sorted(inputs.items())), limits=compute.JobLimits(wall_time_ms=wall)
    )
    assert ledger.decode(compute.JobSpec, ledger.encode(job)) == job, "JobSpec must round-trip"


def test_job_spec_with_bad_limits_does_not_decode() -> None:
    bad = ledger.encode(compute.JobSpec(("/bin/true",)))
    plain = msgpack.unpackb(bad)
    plain[3][0] = 0  # wall_time_ms = 0
    with pytest.raises(ledger.DecodeError):
        ledger.decode(compute.JobSpec, msgpack.packb(plain))


async def test_process_count_is_capped(executor: compute.Executor) -> None:
    if executor.sandbox_uid is None:
        pytest.skip("RLIMIT_NPROC is only set when jobs run under a dedicated uid (root daemon)")
    tag = marker()
    script = f"for i in $(seq 40); do sleep {tag} & done; wait"
    result = await executor.run(
        compute.JobId("nproc-1"), spec(script, processes_max=12, wall_time_ms=3000)
    )
    assert b"fork" in result.stderr.lower() or b"resource" in result.stderr.lower(), (
        f"40 forks under a 12-process cap did not fail: {result.stderr[:300]!r}"
    )
    assert live_processes_with(tag) == [], "the job's processes survived"
