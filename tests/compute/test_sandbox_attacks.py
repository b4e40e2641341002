"""One test per attack that got through (issue 10), as a hostile job would try it.

Each runs under both sandbox kinds (the process sandbox as root: a uid per job and its own
network, IPC and mount namespaces); each failed on the executor before issue 10 in at least
one kind (docs/compute.md lists what is still open).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import compute
from node._config import NodeConfig
from node._home import Home, write_private
from tests.compute.test_sandbox import KINDS, PYTHON, live_processes_with, marker, spec

MIB = 1 << 20


@pytest.fixture
def work_root() -> Iterator[Path]:
    # Under /var/tmp like the node's own (0711 so the job uids can reach their directories).
    root = Path(tempfile.mkdtemp(prefix="gpumesh-attack-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    yield root
    shutil.rmtree(root)


@pytest.fixture(params=KINDS)
def executor(request: pytest.FixtureRequest, work_root: Path) -> Iterator[compute.Executor]:
    ex = compute.Executor(work_root / "jobs", sandbox=request.param, memory_poll_ms=20)
    yield ex
    ex.close()


def python() -> str:
    if PYTHON is None:
        pytest.fail("no python3 under /usr/bin for the job")
    return PYTHON


async def test_job_cannot_read_the_node_key_cookie_or_job_store(
    executor: compute.Executor, work_root: Path
) -> None:
    home = Home(work_root / "home")
    home.init(NodeConfig.default())
    write_private(home.cookie_path, "cookie-secret-123\n")
    store = home.data_dir / "jobs"
    store.mkdir()
    (store / "000001.log").write_text("someone-elses-input\n")  # as LevelDB writes: 0644
    key_hex = home.key_path.read_text().strip()
    script = (
        f"cat {home.key_path} {home.cookie_path} {store}/000001.log; ls {home.root} {store}; id -u"
    )
    result = await executor.run(compute.JobId("steal-1"), spec(script))
    out = result.stdout.decode()
    assert key_hex not in out, "the job read the node key"
    assert "cookie-secret-123" not in out, "the job read the RPC cookie"
    assert "someone-elses-input" not in out, "the job read the job store"
    assert "node_key" not in out, "the job listed the node home"
    assert stat.S_IMODE(home.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(home.data_dir.stat().st_mode) == 0o700
    assert out.split()[-1] != "0", "the job ran as root"


async def test_job_cannot_reach_the_rpc_port(executor: compute.Executor) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    probe = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=2); print('CONNECTED')\n"
        "except OSError as exc:\n"
        "    print('refused', exc)\n"
    )
    try:
        job = compute.JobSpec((python(), "-c", probe))
        result = await executor.run(compute.JobId("rpc-1"), job)
    finally:
        await listener.aclose()
    assert result.outcome is compute.JobOutcome.SUCCEEDED, result.reason
    assert b"CONNECTED" not in result.stdout, "the job connected to the node's RPC port"


async def test_setsid_child_cannot_keep_memory_over_the_cap(executor: compute.Executor) -> None:
    hog = "import time; a = b'x' * (150 << 20); open('out/hog-alive', 'w'); time.sleep(30)"
    script = f'setsid {python()} -c "{hog}" & sleep 20'
    job = compute.JobSpec(
        ("/bin/sh", "-c", script),
        limits=compute.JobLimits(memory_bytes=64 * MIB, wall_time_ms=30_000),
    )
    result = await executor.run(compute.JobId("setsid-mem-1"), job)
    assert result.outcome is compute.JobOutcome.MEMORY_LIMIT, (result.outcome, result.reason)
    assert "memory" in result.reason
    assert not (executor.job_dir(compute.JobId("setsid-mem-1")) / "work/out/hog-alive").exists()
    assert result.memory_peak_bytes <= 64 * MIB + MIB, "the tree went over the cap"


async def test_job_cannot_fill_tmp(executor: compute.Executor) -> None:
    script = "head -c 100000000 /dev/zero > /tmp/fill; wc -c < /tmp/fill"
    result = await executor.run(
        compute.JobId("tmp-1"), spec(script, tmp_bytes=16 * MIB, memory_bytes=512 * MIB)
    )
    written = int(result.stdout.split()[-1])
    assert written <= 16 * MIB, f"the job wrote {written} bytes to a 16 MiB /tmp"
    assert b"No space left" in result.stderr, result.stderr


async def test_job_cannot_fill_its_directory(executor: compute.Executor) -> None:
    # Many files, each under the per-file cap: only a cap on the directory stops this.
    script = "for i in $(seq 60); do head -c 1000000 /dev/zero > scratch$i || exit 9; done"
    result = await executor.run(
        compute.JobId("disk-1"), spec(script, disk_bytes=10_000_000, wall_time_ms=60_000)
    )
    assert result.outcome is compute.JobOutcome.DISK_LIMIT, (result.outcome, result.reason)
    assert "disk" in result.reason or "job directory" in result.reason
    assert result.outputs == (), "a job stopped at its disk cap delivers nothing"


async def test_job_leaves_no_process_behind(executor: compute.Executor) -> None:
    tag = marker()
    # The leader waits until both escapees have left its process group, then exits.
    escape = f"setsid sh -c 'echo > escaped$0; exec sleep {tag}'"
    script = (
        f"{escape} 1 & ({escape} 2 &); for i in $(seq 500); do "
        "[ -e escaped1 ] && [ -e escaped2 ] && exit 0; sleep 0.01; done; exit 7"
    )
    result = await executor.run(compute.JobId("leave-1"), spec(script))
    assert result.outcome is compute.JobOutcome.SUCCEEDED, result.reason
    assert result.processes_left == 0, "the job's cgroup was not empty when it ended"
    assert live_processes_with(tag) == [], "a setsid process outlived the job"
    cgroup_dirs = [p / "leave-1" for _, p in executor.cgroups.parents]
    assert not any(d.exists() for d in cgroup_dirs), "the job's cgroup was not removed"


async def test_job_cannot_read_or_overwrite_another_jobs_files(
    executor: compute.Executor,
) -> None:
    first = compute.JobId("victim-1")
    secret = executor.job_dir(first) / "work" / "out" / "secret"
    done = await executor.run(first, spec("echo finished-secret > out/secret"))
    assert done.succeeded, done.reason
    running = executor.job_dir(compute.JobId("victim-2")) / "work" / "out" / "secret"
    attack = (
        f"cat {secret} {running}; echo tampered > {secret}; echo tampered > {running}; "
        f"ls {executor.work_root}"
    )

    async def victim() -> None:
        await executor.run(
            compute.JobId("victim-2"), spec("echo running-secret > out/secret; sleep 30")
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(victim)
        with trio.fail_after(20):
            for _ in range(1000):  # the victim's file appears once its job runs
                if running.exists():
                    break
                await trio.sleep(0.02)
        result = await executor.run(compute.JobId("attacker-1"), spec(attack))
        nursery.cancel_scope.cancel()
    assert b"secret" not in result.stdout, "a job read another job's outputs"
    assert b"victim" not in result.stdout, "a job listed the other jobs"
    assert secret.read_text() == "finished-secret\n", "a job overwrote another job's outputs"
    if executor.sandbox_uid is not None:
        assert done.uid != result.uid, "two jobs shared a uid"


async def test_job_dirs_are_released_and_swept(executor: compute.Executor) -> None:
    kept = compute.JobId("kept-1")
    result = await executor.run(kept, spec("head -c 100000 /dev/zero > out/big"))
    assert result.succeeded, result.reason
    assert executor.sweep_job_dirs(3600) == 0, "a fresh job's outputs stay for the retention"
    assert executor.sweep_job_dirs(3600, now_s=time.time() + 3601) == 1
    assert not executor.job_dir(kept).exists(), "the sweep deleted an expired job's directory"

    done = compute.JobId("done-1")
    await executor.run(done, spec("true"))
    assert executor.release(done) and not executor.job_dir(done).exists()
    assert executor.release(done) is False, "releasing twice is harmless"

    running = compute.JobId("running-1")
    started = executor.job_dir(running) / "work" / "out" / "started"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(executor.run, running, spec("touch out/started; sleep 30"))
        with trio.fail_after(20):
            for _ in range(1000):
                if started.exists():
                    break
                await trio.sleep(0.02)
        assert executor.sweep_job_dirs(0) == 0, "a running job's directory is never swept"
        assert executor.release(running) is False, "released while running: deleted at the end"
        assert executor.job_dir(running).exists()
        nursery.cancel_scope.cancel()
    assert not executor.job_dir(running).exists(), "the released job's directory outlived it"


async def test_cpu_time_is_capped_over_the_whole_tree(executor: compute.Executor) -> None:
    # Three spinners that left the group: each alone stays under RLIMIT_CPU (per process).
    spin = "setsid sh -c 'while :; do :; done'"
    script = f"{spin} & {spin} & {spin} & sleep 60"
    result = await executor.run(
        compute.JobId("cpu-tree-1"), spec(script, cpu_time_s=1, wall_time_ms=60_000)
    )
    assert result.outcome is compute.JobOutcome.CPU_TIME_LIMIT, (result.outcome, result.reason)
    assert "processes" in result.reason, "the tree's CPU time, not one process's, stopped it"
    assert result.cpu_ms < 2_000, f"the tree used {result.cpu_ms} ms of CPU against a 1 s cap"
