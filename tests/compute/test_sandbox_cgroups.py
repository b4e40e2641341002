"""Finding the cgroups to put jobs in: v2 where it has the controllers, v1 beside an empty v2
(this machine and CI), a clear error where neither works. The real hierarchy is exercised by
every executor test; here ``/proc/mounts`` and ``/proc/self/cgroup`` are given, over a plain
directory standing in for a v2 cgroupfs (no kernel behaviour is claimed from it)."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import compute
from compute import _reaper
from compute._cgroups import JobCgroup, _check_v1_parent, _make_parent, probe_cgroups


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_v2_with_controllers_is_preferred(tmp_path: Path) -> None:
    fs = tmp_path / "unified"
    own = fs / "system.slice" / "gpumesh.service"
    own.mkdir(parents=True)
    write(own / "cgroup.controllers", "cpuset cpu io memory pids\n")
    write(own / "cgroup.subtree_control", "")
    (own / "gpumesh-t").mkdir()  # the kernel fills a new cgroup directory; here we do
    write(own / "gpumesh-t" / "cgroup.subtree_control", "memory pids cpu")
    mounts = write(tmp_path / "mounts", f"cgroup2 {fs} cgroup2 rw,nosuid 0 0\n")
    self_cg = write(tmp_path / "self", "0::/system.slice/gpumesh.service\n")
    cgroups = probe_cgroups("gpumesh-t", mounts=mounts, own=self_cg)
    assert cgroups.version == "v2"
    assert cgroups.parents == (("unified", own / "gpumesh-t"),)
    assert (own / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"


def test_v1_beside_an_empty_v2(tmp_path: Path) -> None:
    fs = tmp_path / "cg"
    for name in ("unified", "memory/box", "pids", "cpuacct"):
        (fs / name).mkdir(parents=True)
    write(fs / "unified" / "cgroup.controllers", "")
    mounts = write(
        tmp_path / "mounts",
        f"cgroup {fs}/memory cgroup rw,memory 0 0\ncgroup {fs}/pids cgroup rw,pids 0 0\n"
        f"cgroup {fs}/cpuacct cgroup rw,cpuacct 0 0\ncgroup2 {fs}/unified cgroup2 rw 0 0\n",
    )
    self_cg = write(tmp_path / "self", "4:memory:/box\n8:pids:/\n2:cpuacct:/\n0::/\n")
    for name in ("memory/box/gpumesh-t", "pids/gpumesh-t", "cpuacct/gpumesh-t"):
        (fs / name).mkdir()  # the kernel fills a new cgroup directory; here we do
        write(fs / name / "cgroup.procs", "")
    cgroups = probe_cgroups("gpumesh-t", mounts=mounts, own=self_cg)
    assert cgroups.version == "v1", "an empty v2 has no memory controller: v1 is used"
    assert dict(cgroups.parents) == {
        "memory": fs / "memory/box/gpumesh-t",
        "pids": fs / "pids/gpumesh-t",
        "cpuacct": fs / "cpuacct/gpumesh-t",
    }


def test_no_usable_cgroups_is_a_clear_error(tmp_path: Path) -> None:
    mounts = write(tmp_path / "mounts", "proc /proc proc rw 0 0\n")
    self_cg = write(tmp_path / "self", "0::/\n")
    with pytest.raises(compute.SandboxError) as caught:
        probe_cgroups("gpumesh-t", mounts=mounts, own=self_cg)
    message = str(caught.value)
    assert "no cgroup v2 mounted" in message
    assert "memory or pids" in message, message


async def test_idle_parents_are_pruned_and_made_again_when_needed() -> None:
    root = Path(tempfile.mkdtemp(prefix="gpumesh-cg-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    try:
        first = compute.Executor(root / "a", sandbox="process")
        parents = [p for _, p in first.cgroups.parents]
        second = compute.Executor(root / "b", sandbox="process")  # its probe prunes idle ones
        assert not any(p.exists() for p in parents), "an idle parent of another executor stays"
        result = await first.run(compute.JobId("again-1"), compute.JobSpec(("/bin/true",)))
        assert result.succeeded, result.reason
        assert all(p.exists() for p in parents), "the parent is made again for the next job"
        first.close()
        second.close()
    finally:
        shutil.rmtree(root)


async def test_a_parent_pruned_by_a_daemon_starting_beside_ours_is_no_error() -> None:
    # Testnet daemons start together: one's probe can prune another's parent between that
    # one's probe and its sweep. The sweep finds nothing to do and the next job makes it again.
    root = Path(tempfile.mkdtemp(prefix="gpumesh-cg-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    try:
        first = compute.Executor(root / "a", sandbox="process")
        for _, parent in first.cgroups.parents:
            parent.rmdir()
        assert first.cgroups.sweep() == 0
        result = await first.run(compute.JobId("pruned-1"), compute.JobSpec(("/bin/true",)))
        assert result.succeeded, result.reason
        first.close()
    finally:
        shutil.rmtree(root)


def test_a_parent_pruned_between_its_mkdir_and_its_check_is_made_again(tmp_path: Path) -> None:
    # The probe's own window (a CI run: one of four testnet nodes provided no compute): the
    # parent is made, another daemon's prune removes it (still idle), then the check runs.
    parent = tmp_path / "gpumesh-t"
    checks: list[bool] = []

    def pruned_once_then_checked(made: Path) -> None:
        if not checks:
            made.rmdir()  # what the other daemon's _prune does to an idle gpumesh-* parent
        else:
            write(made / "cgroup.procs", "")  # the kernel fills a new cgroup directory
        checks.append(made.exists())
        _check_v1_parent(made)

    _make_parent(parent, pruned_once_then_checked)
    assert checks == [False, True] and parent.is_dir()

    def always_pruned(made: Path) -> None:
        made.rmdir()
        _check_v1_parent(made)

    with pytest.raises(FileNotFoundError, match="removed 5 times"):
        _make_parent(tmp_path / "gpumesh-u", always_pruned)
    write(parent / "cgroup.procs", "")
    os.chmod(parent / "cgroup.procs", 0o444)
    if os.geteuid() != 0:  # root may write anything: the refusal is only seen unprivileged
        with pytest.raises(PermissionError):
            _make_parent(parent, _check_v1_parent)


def test_daemons_probing_at_the_same_moment_all_get_their_cgroups() -> None:
    # The real hierarchy: four processes probe side by side (each pruning the others' idle
    # parents), released together, ten rounds; every one must come out with cgroups.
    code = (
        "import sys\n"
        "from compute._cgroups import probe_cgroups\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "cgroups = probe_cgroups(sys.argv[1])\n"
        "print(cgroups.version, flush=True)\n"
        "sys.stdin.readline()\n"
        "cgroups.close()\n"
    )
    repo = Path(__file__).resolve().parents[2]
    for round_ in range(10):
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, f"gpumesh-race{round_}-{index}"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=repo,
            )
            for index in range(4)
        ]
        try:
            for proc in procs:  # all imported and waiting to be released together
                assert proc.stdout is not None
                ready, _, _ = select.select([proc.stdout], [], [], 30)
                assert ready and proc.stdout.readline() == "ready\n", f"round {round_}: no start"
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            for proc in procs:
                assert proc.stdout is not None
                ready, _, _ = select.select([proc.stdout], [], [], 30)
                line = proc.stdout.readline() if ready else ""
                _, err = ("", "") if line else proc.communicate(timeout=30)
                assert line.strip() in ("v1", "v2"), f"round {round_}: no cgroups: {err[-800:]}"
        finally:
            for proc in procs:
                if proc.poll() is None and proc.stdin is not None:
                    try:
                        proc.stdin.write("done\n")
                        proc.stdin.close()
                    except BrokenPipeError:
                        pass
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                for pipe in (proc.stdout, proc.stderr):
                    if pipe is not None:
                        pipe.close()


def test_a_restarted_executor_kills_what_a_crashed_one_left() -> None:
    root = Path(tempfile.mkdtemp(prefix="gpumesh-cg-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    try:
        crashed = compute.Executor(root / "jobs", sandbox="process")
        cgroup = crashed.cgroups.create("left-1", memory_bytes=1 << 30, processes_max=16)
        procs = cgroup.procs_files

        def join() -> None:
            for path in procs:
                with open(path, "w") as handle:
                    handle.write(str(os.getpid()))

        # A job process that outlived its daemon (as a setsid child of a SIGKILLed one would).
        orphan = subprocess.Popen(["sleep", "600"], preexec_fn=join)
        try:
            assert cgroup.pids() == {orphan.pid}
            restarted = compute.Executor(root / "jobs", sandbox="process")
            assert orphan.wait(timeout=10) == -9, "the leftover job process was not killed"
            assert not any(p.exists() for _, p in cgroup.dirs), "the stale cgroup stayed"
            restarted.close()
        finally:
            if orphan.poll() is None:
                orphan.kill()
                orphan.wait()
    finally:
        shutil.rmtree(root)


def test_the_reaper_kills_what_is_held_when_the_daemon_end_closes() -> None:
    """The lifeline's reaper, killed itself, is started again and told every held cgroup; when
    the daemon's end closes (as at the daemon's death), it kills and removes the held ones and
    leaves a released one alone."""
    root = Path(tempfile.mkdtemp(prefix="gpumesh-cg-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        executor = compute.Executor(root / "jobs", sandbox="process")
        lifeline = executor.lifeline

        def start_in(name: str) -> tuple[subprocess.Popen[bytes], JobCgroup]:
            cgroup = executor.cgroups.create(name, memory_bytes=1 << 30, processes_max=16)

            def join() -> None:
                for path in cgroup.procs_files:
                    with open(path, "w") as handle:
                        handle.write(str(os.getpid()))

            proc = subprocess.Popen(["sleep", "600"], preexec_fn=join)
            procs.append(proc)
            return proc, cgroup

        lifeline.hold("held-1")
        held, held_cgroup = start_in("held-1")
        first = lifeline.pid
        assert first is not None
        pidfd = os.pidfd_open(first)
        os.kill(first, 9)
        try:  # until it has exited, and its end of the pipe with it
            assert select.select([pidfd], [], [], 10)[0], "the killed reaper did not exit"
        finally:
            os.close(pidfd)
        lifeline.hold("freed-1")  # finds the pipe broken: a new reaper, told of held-1 too
        freed, freed_cgroup = start_in("freed-1")
        assert lifeline.restarts == 1 and lifeline.pid != first
        lifeline.release("freed-1")
        lifeline.close()
        assert held.wait(timeout=10) == -9, "the held cgroup's process was not killed"
        assert not any(p.exists() for _, p in held_cgroup.dirs), "the held cgroup stayed"
        assert freed.poll() is None, "a released cgroup was killed"
        freed.kill()
        freed.wait()
        freed_cgroup.remove()
        executor.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(root)


def test_reaper_lines_that_are_not_holds_or_releases_are_ignored() -> None:
    lines = [b"+a\n", b"+b\n", b"-a\n", b"+../x\n", b"+\n", b"?c\n", b"+" + b"n" * 200 + b"\n"]
    assert _reaper.read_held(lines) == {"b"}
    assert _reaper.main(["v3"]) == 2
