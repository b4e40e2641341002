"""Kernel limits over a job's whole process tree: one cgroup per job.

A cgroup holds every process the job starts, ``setsid`` and double-fork escapees included
(membership is inherited at fork and only root can move a process out). Two layouts:

- **v2** (unified): where ``memory`` and ``pids`` are in the daemon's cgroup's
  ``cgroup.controllers``. Jobs live under ``<own cgroup>/<name>/<job>``; if the daemon's own
  cgroup holds processes (v2 forbids controllers there), the daemon moves itself into a
  ``<own cgroup>/gpumesh-node`` leaf first.
- **v1**: the ``memory`` and ``pids`` hierarchies (and ``cpuacct`` when mounted) each get a
  ``<own cgroup>/<name>/<job>`` directory. This is what a machine that mounts v1 beside an
  empty v2 (this container, CI) uses.

Memory: ``memory.max`` / ``memory.limit_in_bytes`` (+ swap off), the kernel OOM-kills inside the
job only, and the kill count says "memory_limit". Processes: ``pids.max``. CPU time over the
tree: ``cpu.stat`` / ``cpuacct.usage``, polled by the executor. Tmpfs pages the job writes
(bwrap's ``/tmp``, ``/dev/shm``) are charged to its memory cgroup too.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from compute import _reaper
from compute.exceptions import SandboxError

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("gpumesh.compute.cgroups")

CgroupVersion = Literal["v2", "v1"]
V1_REQUIRED = ("memory", "pids")
V1_OPTIONAL = ("cpuacct",)
NODE_LEAF = "gpumesh-node"
PARENT_PREFIX = "gpumesh-"
parent_make_attempts = 5
V2_WANTED = "+memory +pids +cpu"


def _parse_mounts(text: str) -> tuple[Path | None, dict[str, Path]]:
    """``(cgroup2 mount point, {v1 controller: mount point})`` from ``/proc/mounts``."""
    unified: Path | None = None
    v1: dict[str, Path] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        where, kind, options = parts[1], parts[2], parts[3].split(",")
        if kind == "cgroup2" and unified is None:
            unified = Path(where)
        elif kind == "cgroup":
            for option in options:
                if option in (*V1_REQUIRED, *V1_OPTIONAL) and option not in v1:
                    v1[option] = Path(where)
    return unified, v1


def _parse_self(text: str) -> tuple[str | None, dict[str, str]]:
    """``(v2 path, {v1 controller: path})`` of this process from ``/proc/self/cgroup``."""
    unified: str | None = None
    v1: dict[str, str] = {}
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            unified = path
        for name in controllers.split(","):
            if name:
                v1[name] = path
    return unified, v1


def _under(mount: Path, path: str) -> Path:
    return mount / path.lstrip("/")


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read_int(path: Path, key: str | None = None) -> int:
    """An integer file, or the value of ``key`` in a ``key value`` file; 0 if absent."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return 0
    if key is None:
        value = text.strip()
        return 2**63 - 1 if value == "max" else int(value or 0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


@dataclasses.dataclass(frozen=True)
class Cgroups:
    """Where this daemon creates job cgroups: one parent per hierarchy (one for v2)."""

    version: CgroupVersion
    parents: tuple[tuple[str, Path], ...]
    """``(controller, directory)``; v2 has the single entry ``("unified", dir)``."""
    enabled: str = ""
    """v2: the controllers enabled for job cgroups (``"+memory +pids +cpu"``)."""

    def parent(self, controller: str) -> Path | None:
        for name, path in self.parents:
            if name == controller:
                return path
        return None

    def create(self, job: str, *, memory_bytes: int, processes_max: int) -> JobCgroup:
        """A fresh cgroup for ``job`` with its limits set (an old one of that name is removed)."""
        dirs = tuple((name, parent / job) for name, parent in self.parents)
        cgroup = JobCgroup(self.version, dirs)
        cgroup.remove_stale()
        for (_, parent), (_, path) in zip(self.parents, dirs, strict=True):
            try:
                try:
                    path.mkdir(mode=0o755)
                except FileNotFoundError:
                    # Another daemon's start pruned our idle parent: make it again.
                    parent.mkdir(exist_ok=True)
                    if self.version == "v2":
                        _enable(parent, self.enabled)
                    path.mkdir(mode=0o755)
            except OSError as exc:
                cgroup.remove()
                raise SandboxError(f"cannot create cgroup {path}: {exc}") from exc
        try:
            cgroup.set_limits(memory_bytes=memory_bytes, processes_max=processes_max)
        except OSError as exc:
            cgroup.remove()
            raise SandboxError(f"cannot set the limits of cgroup {dirs[0][1]}: {exc}") from exc
        return cgroup

    def sweep(self) -> int:
        """Kill and remove every job cgroup under our parents (left by a crashed daemon whose
        jobs may still run); how many there were."""
        names: set[str] = set()
        for _, parent in self.parents:
            try:
                names.update(p.name for p in parent.iterdir() if p.is_dir())
            except FileNotFoundError:
                # Another daemon starting at the same moment pruned our parent while it was
                # still idle: nothing of ours is in it, and create() makes it again.
                continue
        for job in sorted(names):
            JobCgroup(self.version, tuple((n, p / job) for n, p in self.parents)).remove_stale()
        return len(names)

    def close(self) -> None:
        """Remove our parent directories once no job cgroup is left in them."""
        for _, parent in self.parents:
            try:
                parent.rmdir()
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                log.info("cgroup %s still holds job cgroups; left in place", parent)

    def to_json(self) -> dict[str, object]:
        return {"version": self.version, "parents": {n: str(p) for n, p in self.parents}}


class JobCgroup:
    """One job's cgroup (a directory per hierarchy under v1)."""

    def __init__(self, version: CgroupVersion, dirs: tuple[tuple[str, Path], ...]) -> None:
        self.version = version
        self.dirs = dirs
        self.memory_bytes = 0
        self.procs_files: tuple[bytes, ...] = tuple(
            os.fsencode(path / "cgroup.procs") for _, path in dirs
        )
        """What the child writes its pid into, between fork and exec."""

    def _dir(self, controller: str) -> Path:
        for name, path in self.dirs:
            if name == controller or name == "unified":
                return path
        raise KeyError(controller)

    def _has(self, controller: str) -> bool:
        return any(name in (controller, "unified") for name, _ in self.dirs)

    def set_limits(self, *, memory_bytes: int, processes_max: int) -> None:
        self.memory_bytes = memory_bytes
        if self.version == "v2":
            path = self._dir("memory")
            _write(path / "memory.max", str(memory_bytes))
            if (path / "memory.swap.max").exists():
                _write(path / "memory.swap.max", "0")
            if (path / "memory.oom.group").exists():
                _write(path / "memory.oom.group", "1")  # one OOM kill takes the whole job
            _write(path / "pids.max", str(processes_max))
            return
        memory = self._dir("memory")
        _write(memory / "memory.limit_in_bytes", str(memory_bytes))
        if (memory / "memory.memsw.limit_in_bytes").exists():
            _write(memory / "memory.memsw.limit_in_bytes", str(memory_bytes))  # no swap either
        _write(self._dir("pids") / "pids.max", str(processes_max))

    def pids(self) -> set[int]:
        """Every live member (zombies are not members)."""
        return _reaper.members(path for _, path in self.dirs)

    def is_empty(self) -> bool:
        return not self.pids()

    def kill(self) -> None:
        """SIGKILL every member, however it left the job's process group or session (one
        pass: see ``_reaper.kill_once``)."""
        _reaper.kill_once(self.version, (path for _, path in self.dirs))

    def oom_kills(self) -> int:
        """How many processes the kernel killed for going over the memory cap."""
        path = self._dir("memory")
        if self.version == "v2":
            events = path / "memory.events"
            return _read_int(events, "oom_kill") + _read_int(events, "oom_group_kill")
        return _read_int(path / "memory.oom_control", "oom_kill")

    def memory_peak_bytes(self) -> int:
        path = self._dir("memory")
        if self.version == "v2":
            return _read_int(path / "memory.peak")
        return _read_int(path / "memory.max_usage_in_bytes")

    def processes_refused(self) -> int:
        """How many forks ``pids.max`` refused."""
        return _read_int(self._dir("pids") / "pids.events", "max")

    def cpu_usage_ns(self) -> int | None:
        """CPU time of every process that ever ran in the job; None where it is not counted."""
        if self.version == "v2":
            return _read_int(self._dir("memory") / "cpu.stat", "usage_usec") * 1000
        if not self._has("cpuacct"):
            return None
        return _read_int(self._dir("cpuacct") / "cpuacct.usage")

    def remove(self) -> None:
        """Remove the (empty) cgroup directories; ``SandboxError`` if a process is left."""
        for _, path in reversed(self.dirs):
            try:
                path.rmdir()
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    raise SandboxError(f"cgroup {path} still has processes: {exc}") from exc
                raise SandboxError(f"cannot remove cgroup {path}: {exc}") from exc

    def remove_stale(self) -> None:
        """A cgroup of the same name left by a crashed run: kill what is in it, remove it."""
        if any(path.exists() for _, path in self.dirs):
            log.warning("removing a stale job cgroup %s", self.dirs[0][1])
            _reaper.kill_until_empty(self.version, (path for _, path in self.dirs))
            self.remove()


reaper_exit_wait_s = 5.0
"""How long ``Lifeline.close`` waits for the reaper to exit."""


class Lifeline:
    """This daemon's end of its job reaper (``compute._reaper``): a process of its own that
    kills every job cgroup it holds once this process ends, however it ends.

    ``hold`` a job's cgroup before the job's first process starts, ``release`` it once the
    cgroup is removed, ``close`` at a clean stop. A reaper that was killed is started again,
    and told every cgroup still held, at the next ``hold`` or ``release``."""

    def __init__(self, cgroups: Cgroups) -> None:
        script = _reaper.__file__
        assert script is not None, "compute._reaper is a file"
        parents = [str(path) for _, path in cgroups.parents]
        self._argv = [sys.executable, "-I", "-S", script, cgroups.version, *parents]
        self._held: set[str] = set()
        self._proc: subprocess.Popen[bytes] | None = None
        self._fd = -1
        self.restarts = 0
        self.unrecorded = 0
        """Holds or releases the reaper did not get (its pipe was full: it is not reading)."""
        self._start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        read, write = os.pipe()  # not inheritable: no job, nor anything else we start, holds it
        try:
            self._proc = subprocess.Popen(
                self._argv,
                stdin=read,
                stdout=subprocess.DEVNULL,
                cwd="/",
                start_new_session=True,  # a signal to our process group is not its end
            )
        except OSError as exc:
            os.close(write)
            raise SandboxError(f"cannot start the job reaper {self._argv}: {exc}") from exc
        finally:
            os.close(read)
        os.set_blocking(write, False)
        self._fd = write
        lines = b"".join(b"+" + name.encode() + b"\n" for name in sorted(self._held))
        if lines:
            os.write(self._fd, lines)  # far below a fresh pipe's capacity

    def hold(self, name: str) -> None:
        self._held.add(name)
        self._send(b"+" + name.encode() + b"\n")

    def release(self, name: str) -> None:
        self._held.discard(name)
        self._send(b"-" + name.encode() + b"\n")

    def _send(self, line: bytes) -> None:
        assert self._fd >= 0, "the lifeline is closed"
        try:
            os.write(self._fd, line)  # shorter than PIPE_BUF: whole or not at all
        except BrokenPipeError:
            log.warning("the job reaper (pid %s) is gone; starting another", self.pid)
            os.close(self._fd)
            self._fd = -1
            if self._proc is not None:
                self._proc.wait()
            self.restarts += 1
            self._start()  # it is told every held cgroup, this line's included
        except BlockingIOError:
            self.unrecorded += 1
            log.error(
                "the job reaper (pid %s) is not reading its pipe; %r not recorded", self.pid, line
            )

    def close(self) -> None:
        """Close our end: the reaper kills what is still held (nothing, after a clean stop)
        and exits; wait for that, at most ``reaper_exit_wait_s``."""
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        if self._proc is None:
            return
        try:
            self._proc.wait(timeout=reaper_exit_wait_s)
        except subprocess.TimeoutExpired:
            log.warning(
                "the job reaper (pid %s) did not exit in %.0f s", self.pid, reaper_exit_wait_s
            )

    def __del__(self) -> None:
        # Dropped without close() (a test's executor): the reaper must not wait for our exit,
        # and it exits at once when it holds nothing.
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=reaper_exit_wait_s)
                except subprocess.TimeoutExpired:
                    pass  # Popen's own warning names it


def probe_cgroups(
    name: str,
    *,
    mounts: Path = Path("/proc/mounts"),
    own: Path = Path("/proc/self/cgroup"),
) -> Cgroups:
    """Set up ``<own cgroup>/<name>`` for job cgroups, v2 first, else v1.

    Raises ``SandboxError`` naming what is missing when neither can be used.
    """
    unified_mount, v1_mounts = _parse_mounts(mounts.read_text())
    unified_path, v1_paths = _parse_self(own.read_text())
    problems: list[str] = []
    if unified_mount is not None and unified_path is not None:
        try:
            return _prune(_setup_v2(unified_mount, unified_path, name))
        except _Unusable as exc:
            problems.append(f"cgroup v2 at {unified_mount}: {exc}")
    else:
        problems.append("no cgroup v2 mounted")
    missing = [c for c in V1_REQUIRED if c not in v1_mounts or c not in v1_paths]
    if missing:
        problems.append(f"cgroup v1 has no {' or '.join(missing)} hierarchy mounted")
    else:
        try:
            return _prune(_setup_v1(v1_mounts, v1_paths, name))
        except _Unusable as exc:
            problems.append(f"cgroup v1: {exc}")
    raise SandboxError(
        "no usable cgroups to limit jobs' memory and processes: " + "; ".join(problems)
    )


class _Unusable(Exception):
    pass


def _prune(cgroups: Cgroups) -> Cgroups:
    """Remove idle ``gpumesh-*`` parents beside ours (executors that ended without ``close``);
    a parent with a job cgroup in it is busy and stays (rmdir refuses)."""
    for _, parent in cgroups.parents:
        for sibling in parent.parent.iterdir():
            if sibling == parent or not sibling.name.startswith(PARENT_PREFIX):
                continue
            if sibling.name == NODE_LEAF or not sibling.is_dir():
                continue
            try:
                sibling.rmdir()
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY, errno.ENOENT):
                    raise SandboxError(f"cannot remove idle cgroup {sibling}: {exc}") from exc
    return cgroups


def _setup_v2(mount: Path, own_path: str, name: str) -> Cgroups:
    own = _under(mount, own_path)
    controllers = (own / "cgroup.controllers").read_text().split()
    lacking = [c for c in V1_REQUIRED if c not in controllers]
    if lacking:
        raise _Unusable(f"controllers {', '.join(lacking)} are not available to {own}")
    wanted = " ".join(c for c in V2_WANTED.split() if c.lstrip("+") in controllers)
    try:
        _enable(own, wanted)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise _Unusable(f"cannot enable controllers in {own}: {exc}") from exc
        # "No internal processes": move this daemon into a leaf, then enable.
        leaf = own / NODE_LEAF
        try:
            leaf.mkdir(exist_ok=True)
            _write(leaf / "cgroup.procs", str(os.getpid()))
            _enable(own, wanted)
        except OSError as exc2:
            raise _Unusable(
                f"{own} holds other processes, so controllers cannot be enabled below it "
                f"({exc2}); run the node in a cgroup of its own (systemd: Delegate=yes)"
            ) from exc2
    parent = own / name
    try:
        _make_parent(parent, lambda made: _enable(made, wanted))
    except OSError as exc:
        raise _Unusable(f"cannot create {parent}: {exc}") from exc
    return Cgroups("v2", (("unified", parent),), wanted)


def _make_parent(parent: Path, ready: Callable[[Path], None]) -> None:
    """Make ``parent`` and check it with ``ready``, again if it vanished in between.

    Every daemon's probe prunes the idle ``gpumesh-*`` parents beside its own, and a parent
    just made by a daemon starting at the same moment is idle: in a CI run one of four
    testnet nodes lost its parent between ``mkdir`` and its check, and provided no compute.
    ``ready`` raises FileNotFoundError for a parent that is gone; bounded tries.
    """
    for _ in range(parent_make_attempts):
        parent.mkdir(exist_ok=True)
        try:
            ready(parent)
            return
        except FileNotFoundError:
            continue
    raise FileNotFoundError(
        errno.ENOENT,
        f"removed {parent_make_attempts} times by other daemons' pruning as soon as made",
        str(parent),
    )


def _check_v1_parent(parent: Path) -> None:
    procs = parent / "cgroup.procs"
    if not os.access(procs, os.W_OK):
        if not procs.exists():
            raise FileNotFoundError(errno.ENOENT, "the cgroup is gone", str(parent))
        raise PermissionError(errno.EACCES, "cgroup.procs is not writable", str(parent))


def _enable(path: Path, wanted: str) -> None:
    present = (path / "cgroup.subtree_control").read_text().split()
    if all(c.lstrip("+") in present for c in wanted.split()):
        return
    _write(path / "cgroup.subtree_control", wanted)


def _setup_v1(mounts: dict[str, Path], paths: dict[str, str], name: str) -> Cgroups:
    parents: list[tuple[str, Path]] = []
    for controller in (*V1_REQUIRED, *V1_OPTIONAL):
        if controller not in mounts or controller not in paths:
            continue
        parent = _under(mounts[controller], paths[controller]) / name
        try:
            _make_parent(parent, _check_v1_parent)
        except OSError as exc:
            if controller in V1_REQUIRED:
                raise _Unusable(f"cannot create {parent}: {exc}") from exc
            continue
        parents.append((controller, parent))
    return Cgroups("v1", tuple(parents))
