"""The sandboxed executor: one job, one working directory, one uid, one cgroup, hard limits.

Two sandbox kinds; ``bwrap`` unless ``process`` is asked for by name (no fallback):
- ``bwrap`` (probed at start): bubblewrap gives the job its own mount, PID, network, IPC and UTS
  namespaces; the host is visible read-only (``/usr``, ``/etc``), ``/job`` is the job's
  directory, ``/tmp`` is a capped tmpfs, ``/dev`` is minimal plus the allocated GPUs' device
  nodes only.
- ``process``: a plain subprocess in its own session and cgroup; under root (with job uids) it
  also gets its own network, IPC and mount namespace with a capped ``/tmp`` and ``/dev/shm``,
  but sees the host's filesystem as "others" do and the host's processes.

Kernel limits hold over the job's whole process tree: each job runs in its own cgroup
(``compute._cgroups``: v2, or the v1 ``memory``/``pids``/``cpuacct`` hierarchies) with its
memory and process count capped and its CPU time summed; the child joins the cgroup between
fork and exec, so nothing it starts can leave. ``setrlimit`` adds per-process caps (file size,
CPU, core dumps). When the daemon runs as root each running job gets its own uid and gid from
``job_uids``, owns its 0700 directory, and no other job (nor the node's files) is readable to
it. The job directory's disk use is measured every ``disk_poll_ms`` and at the end, and a job
over its cap fails ``disk_limit``; ``/tmp`` is a tmpfs capped at ``tmp_bytes``.
When the job ends its cgroup is killed and must be empty before its uid is used again.

Output digest (carried by the receipt): the output files, each as ``OutputFile(path, size_bytes,
sha256)`` with ``path`` relative to the output directory, '/'-separated, UTF-8; sorted by the
UTF-8 bytes of ``path``; the digest is ``sha256(ledger.encode(tuple_of_those_files))``, i.e.
SHA-256 of the canonical msgpack array ``[[path, size, sha256], ...]``. No outputs hash the
empty array.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import enum
import hashlib
import logging
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import trio

import ledger
from compute._cgroups import Cgroups, JobCgroup, Lifeline, probe_cgroups
from compute._files import clone_file
from compute._gpu_mounts import GpuHost, GpuMountPlan, gpu_mount_plan
from compute.exceptions import JobSpecError, SandboxError
from compute.types import (
    RUNTIME_BWRAP,
    RUNTIME_BWRAP_IMAGE,
    SANDBOX_KINDS,
    JobId,
    OutputFile,
    SandboxKind,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from compute._allocator import Allocation
    from compute._images import Image, ImageStore

log = logging.getLogger("gpumesh.compute.sandbox")

MIB = 1024 * 1024
argv_items_max = 256
argv_item_chars_max = 4096
env_items_max = 64
env_value_chars_max = 4096
input_files_max = 1000
input_bytes_max = 256 * MIB
image_ref_chars_max = 80
output_depth_max = 32
read_chunk_bytes = 64 * 1024
kill_wait_s = 2.0
"""After SIGKILL, how long to wait for the kernel to reap the group before giving up loudly."""
drain_grace_s = 1.0
"""After the job exits, how long its pipes may stay open (a lingering grandchild) before we stop."""
memory_poll_ms = 100
"""How often the job's cgroup is read (OOM kills, CPU time over the tree)."""
disk_poll_ms = 250
"""How often the job directory's disk use is measured (the overshoot bound: write rate x this)."""
empty_poll_s = 0.005
jobs_listed_max = 10_000
job_dir_entries_max = 100_000
"""Files and directories a job may create in its directory (inodes are disk too)."""
address_space_slack_bytes = 256 * MIB
probe_timeout_s = 10.0
JOB_UID_FIRST = 1_900_000_000
"""Default first uid (and gid) of the job range: far above any account or subuid range."""
JOB_UIDS_COUNT = 1024

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
RESERVED_ENV = frozenset(
    {"CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES", "HOME", "TMPDIR",
     "PATH", "GPUMESH_OUTPUT_DIR", "GPUMESH_JOB_ID"}
)  # fmt: skip
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
BWRAP_JOB_DIR = "/job"


@dataclasses.dataclass(frozen=True)
class JobLimits:
    """Per-job caps; every one is enforced by the executor, none is trusted to the job."""

    wall_time_ms: int = 10 * 60 * 1000
    cpu_time_s: int = 10 * 60
    """CPU time of the whole tree (cgroup), and of each process (``RLIMIT_CPU``)."""
    memory_bytes: int = 4096 * MIB
    """Memory of the whole tree (cgroup): anonymous, page cache and tmpfs (``/tmp``) pages."""
    file_size_bytes: int = 1024 * MIB
    processes_max: int = 256
    disk_bytes: int = 4096 * MIB
    """Disk use of the job directory (inputs, outputs, scratch)."""
    tmp_bytes: int = 256 * MIB
    """Size of the job's private ``/tmp`` tmpfs (bwrap); also counted in ``memory_bytes``."""
    stdout_bytes_max: int = 1 * MIB
    stderr_bytes_max: int = 1 * MIB
    output_bytes_max: int = 1024 * MIB
    output_files_max: int = 1000

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise JobSpecError(f"limit {field.name} must be a positive integer")
        if self.wall_time_ms > 7 * 24 * 3600 * 1000:
            raise JobSpecError("wall_time_ms is over a week")


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """A command, its input files (relative path -> bytes), extra environment, limits, and
    the image to run it in (``""``: the host's ``/usr``; else an ``ImageRef`` of the node's
    image store: the command then follows the image's entrypoint, or is its ``Cmd`` if empty)."""

    argv: tuple[str, ...]
    inputs: tuple[tuple[str, bytes], ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    limits: JobLimits = dataclasses.field(default_factory=JobLimits)
    image: str = ""
    input_files: tuple[tuple[str, str], ...] = ()
    """Inputs given as files (a node's blobs): relative path in the job directory -> absolute
    path of the file, cloned in (``clone_file``: a reflink or a copy, never a link)."""

    def validate(self) -> None:
        least = 0 if self.image else 1
        if not least <= len(self.argv) <= argv_items_max:
            raise JobSpecError(f"argv must have {least}..{argv_items_max} items")
        if len(self.image) > image_ref_chars_max:
            raise JobSpecError("image reference too long")
        for arg in self.argv:
            if len(arg) > argv_item_chars_max or "\0" in arg:
                raise JobSpecError("argv item too long or contains NUL")
        if len(self.inputs) > input_files_max:
            raise JobSpecError(f"more than {input_files_max} input files")
        if len(self.inputs) + len(self.input_files) > input_files_max:
            raise JobSpecError(f"more than {input_files_max} input files")
        if sum(len(data) for _, data in self.inputs) > input_bytes_max:
            raise JobSpecError(f"inline inputs exceed {input_bytes_max} bytes")
        for _, source in self.input_files:
            if not source.startswith("/") or "\0" in source:
                raise JobSpecError(f"input file {source[:64]!r} must be an absolute path")
        seen: set[str] = set()
        for path, _ in (*self.inputs, *self.input_files):
            normal = _safe_relative(path)
            if normal in seen:
                raise JobSpecError(f"input {path!r} given twice")
            seen.add(normal)
        if len(self.env) > env_items_max:
            raise JobSpecError(f"more than {env_items_max} environment variables")
        for name, value in self.env:
            if not _ENV_NAME.match(name) or name in RESERVED_ENV:
                raise JobSpecError(f"environment variable {name!r} is not allowed")
            if len(value) > env_value_chars_max or "\0" in value:
                raise JobSpecError(f"environment value of {name} too long or contains NUL")


def _safe_relative(path: str) -> str:
    parts = path.split("/")
    if (
        not path
        or len(path) > 1024
        or path.startswith("/")
        or "\0" in path
        or any(p in ("", ".", "..") for p in parts)
        or len(parts) > output_depth_max
    ):
        raise JobSpecError(f"input path {path[:64]!r} must be relative, normalised, no '..'")
    return path


class JobOutcome(enum.Enum):
    SUCCEEDED = "succeeded"
    EXIT_NONZERO = "exit_nonzero"
    KILLED_BY_SIGNAL = "killed_by_signal"
    TIMED_OUT = "timed_out"
    MEMORY_LIMIT = "memory_limit"
    CPU_TIME_LIMIT = "cpu_time_limit"
    FILE_SIZE_LIMIT = "file_size_limit"
    STDOUT_LIMIT = "stdout_limit"
    OUTPUT_LIMIT = "output_limit"
    DISK_LIMIT = "disk_limit"
    PROCESS_LIMIT = "process_limit"


@dataclasses.dataclass(frozen=True)
class JobResult:
    """What the executor measured; ``usage_gpu_ms`` is wall time x slots (GPUs, or 1 for CPU)."""

    job_id: JobId
    outcome: JobOutcome
    reason: str
    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    outputs: tuple[OutputFile, ...]
    outputs_digest: bytes
    output_dir: Path
    wall_ms: int
    usage_gpu_ms: int
    gpu_uuids: tuple[str, ...]
    sandbox: SandboxKind
    memory_peak_bytes: int = 0
    cpu_ms: int = 0
    disk_bytes: int = 0
    uid: int | None = None
    processes_left: int = 0
    """Members of the job's cgroup still alive after the kill (0 unless the kernel failed us)."""

    @property
    def succeeded(self) -> bool:
        return self.outcome is JobOutcome.SUCCEEDED

    def to_json(self) -> dict[str, object]:
        return {
            "job_id": self.job_id,
            "outcome": self.outcome.value,
            "reason": self.reason,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "stdout_bytes": len(self.stdout),
            "stderr_bytes": len(self.stderr),
            "outputs": [
                {"path": o.path, "size_bytes": o.size_bytes, "sha256": o.sha256.hex()}
                for o in self.outputs
            ],
            "outputs_digest": self.outputs_digest.hex(),
            "wall_ms": self.wall_ms,
            "usage_gpu_ms": self.usage_gpu_ms,
            "gpu_uuids": list(self.gpu_uuids),
            "sandbox": self.sandbox,
            "memory_peak_bytes": self.memory_peak_bytes,
            "cpu_ms": self.cpu_ms,
            "disk_bytes": self.disk_bytes,
        }


@dataclasses.dataclass(frozen=True)
class LogTail:
    """A slice of a job's stdout or stderr read while it runs (``Executor.log_tail``)."""

    data: bytes
    offset: int
    """Where ``data`` starts in the stream."""
    size: int
    """Bytes the job wrote to the stream so far (at most its ``stdout_bytes_max``)."""
    running: bool
    """False once the run is over (or never started here): ``size`` grows no more."""


def outputs_digest(files: Sequence[OutputFile]) -> bytes:
    """The receipt's output digest; see the module docstring for the exact definition."""
    ordered = tuple(sorted(files, key=lambda f: f.path.encode()))
    return ledger.hash_of(ordered)


class _OutputLimitError(Exception):
    pass


def collect_outputs(
    out_dir: Path, *, files_max: int, bytes_max: int
) -> tuple[tuple[OutputFile, ...], int]:
    """Hash every regular file under ``out_dir`` without following links.

    Returns the files and how many entries were skipped (links, devices, non-UTF-8 names).
    Raises ``_OutputLimitError`` past ``files_max`` files or ``bytes_max`` bytes in total.
    """
    files: list[OutputFile] = []
    skipped = 0
    total = 0
    visited = 0
    # Directories, links and junk count too: a job must not make the walk itself unbounded.
    entries_max = 4 * files_max + 1000
    stack: list[tuple[Path, str, int]] = [(out_dir, "", 0)]
    while stack:
        directory, prefix, depth = stack.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                visited += 1
                if visited > entries_max:
                    raise _OutputLimitError(f"more than {entries_max} entries under out/")
                try:
                    name = entry.name.encode("utf-8").decode("utf-8")
                except UnicodeEncodeError:
                    skipped += 1
                    continue
                rel = f"{prefix}{name}"
                if entry.is_dir(follow_symlinks=False):
                    if depth + 1 >= output_depth_max:
                        skipped += 1
                        continue
                    stack.append((Path(entry.path), rel + "/", depth + 1))
                    continue
                if not entry.is_file(follow_symlinks=False):
                    skipped += 1
                    continue
                if len(files) >= files_max:
                    raise _OutputLimitError(f"more than {files_max} output files")
                size, sha = _hash_file(Path(entry.path), bytes_max - total)
                total += size
                files.append(OutputFile(rel, size, sha))
    files.sort(key=lambda f: f.path.encode())
    return tuple(files), skipped


def _hash_file(path: Path, budget: int) -> tuple[int, bytes]:
    # O_NOFOLLOW + fstat: the job owned this directory and may have swapped a file for a link.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _OutputLimitError(f"output {path.name!r} is not a regular file")
        hasher = hashlib.sha256()
        size = 0
        while chunk := os.read(fd, MIB):
            size += len(chunk)
            if size > budget:
                raise _OutputLimitError("outputs exceed the output size cap")
            hasher.update(chunk)
        return size, hasher.digest()
    finally:
        os.close(fd)


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def probe_bwrap(*, sandbox_uid: int | None = None) -> str | None:
    """Run a trivial job under bwrap; ``None`` if it works, else why not (for the logs)."""
    exe = bwrap_path()
    if exe is None:
        return "bwrap is not installed"
    argv = [exe, *_bwrap_base_args(MIB), "--", "/bin/sh", "-c", "exit 0"]
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=probe_timeout_s,
            cwd="/",
            check=False,
            preexec_fn=_drop_privileges_fn(sandbox_uid),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap probe failed: {exc}"
    if done.returncode != 0:
        return f"bwrap probe exited {done.returncode}: {done.stderr[:300].decode(errors='replace')}"
    return None


_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18


def _isolate_fn(tmp_bytes: int) -> Callable[[], None]:
    """For the process sandbox under root, in the child before the uid drop: no network (a
    fresh network namespace has only a downed ``lo``), private IPC, and a private mount
    namespace whose ``/tmp`` and ``/dev/shm`` are tmpfs capped at ``tmp_bytes``."""
    options = f"size={tmp_bytes},mode=1777".encode()

    def check(result: int, what: str) -> None:
        if result != 0:
            errno_ = ctypes.get_errno()
            raise OSError(errno_, f"{what}: {os.strerror(errno_)}")

    def apply() -> None:
        check(_libc.unshare(_CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWIPC), "unshare")
        check(_libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "make / rprivate")
        for where in (b"/tmp", b"/dev/shm"):
            if os.path.isdir(where):
                flags = _MS_NOSUID | _MS_NODEV
                check(_libc.mount(b"tmpfs", where, b"tmpfs", flags, options), f"mount {where!r}")

    return apply


def probe_process_isolation() -> str | None:
    """Whether the process sandbox can isolate jobs here (root, namespaces, tmpfs mounts)."""
    try:
        done = subprocess.run(
            ["/bin/sh", "-c", "exit 0"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=probe_timeout_s,
            check=False,
            preexec_fn=_isolate_fn(MIB),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"namespaces for the process sandbox do not work: {exc}"
    return None if done.returncode == 0 else f"isolation probe exited {done.returncode}"


def _drop_privileges_fn(sandbox_uid: int | None) -> Callable[[], None]:
    def apply() -> None:  # in the child between fork and exec
        if sandbox_uid is not None:
            os.setgroups([])
            os.setgid(sandbox_uid)
            os.setuid(sandbox_uid)

    return apply


def _bwrap_base_args(tmp_bytes: int, rootfs: Path | None = None) -> list[str]:
    # No --die-with-parent: bwrap's own PR_SET_PDEATHSIG would tie it to the worker thread
    # that forked it (see ``Executor._limits_fn``); the job reaper covers the daemon's death.
    args = ["--unshare-all", "--hostname", "gpumesh-job"]
    if rootfs is not None:
        # An image job: the image's root is all of /, read-only; nothing of the host's.
        args += ["--ro-bind", str(rootfs), "/"]
        args += ["--proc", "/proc", "--dev", "/dev", "--size", str(tmp_bytes), "--tmpfs", "/tmp"]
        return args
    args += ["--ro-bind", "/usr", "/usr"]
    for top in ("bin", "lib", "lib32", "lib64", "sbin"):
        host = Path("/") / top
        if host.is_symlink():
            args += ["--symlink", os.readlink(host), f"/{top}"]
        elif host.is_dir():
            args += ["--ro-bind", str(host), f"/{top}"]
    args += ["--ro-bind", "/etc", "/etc", "--ro-bind-try", "/opt", "/opt"]
    args += ["--proc", "/proc", "--dev", "/dev", "--size", str(tmp_bytes), "--tmpfs", "/tmp"]
    return args


def bwrap_argv(
    bwrap: str,
    argv: Sequence[str],
    *,
    work: Path,
    tmp_bytes: int,
    rootfs: Path | None = None,
    working_dir: str = "",
    gpus: GpuMountPlan | None = None,
) -> list[str]:
    """The bubblewrap command line of a job: the host's ``/usr`` (or the image ``rootfs`` as
    ``/``), the job directory at ``/job``, the start directory (an image's ``WorkingDir``, else
    ``/job``), and the GPU plan's device nodes, libraries and tools."""
    args = [bwrap, *_bwrap_base_args(tmp_bytes, rootfs), "--bind", str(work), BWRAP_JOB_DIR]
    args += ["--chdir", working_dir or BWRAP_JOB_DIR]
    if gpus is not None:
        # Only the allocated GPUs' device nodes exist inside; the control nodes are shared.
        args += gpus.bwrap_args()
    return [*args, "--", *argv]


def default_job_uids() -> range | None:
    """The default job uid range when the daemon runs as root (jobs never run as root), else
    ``None``: an unprivileged daemon cannot switch uids, its jobs run as itself."""
    return range(JOB_UID_FIRST, JOB_UID_FIRST + JOB_UIDS_COUNT) if os.geteuid() == 0 else None


def default_sandbox_uid() -> int | None:
    """The uid the bwrap probe runs as: the first job uid when root, else ``None``."""
    uids = default_job_uids()
    return uids[0] if uids else None


class UidPool:
    """Hands each running job its own uid (its gid is the same number) from a range.

    A uid whose job left a process behind is never handed out again in this run.
    """

    def __init__(self, uids: range) -> None:
        if not uids or uids[0] <= 0 or uids[-1] >= 2**32 - 1 or uids.step != 1:
            raise SandboxError(f"[compute] job uid range {uids} must be non-empty, 1..2**32-2")
        self.uids = uids
        # First in, first out: a uid comes back only after every other one was used, so what
        # a job left where any uid may write (the process sandbox's host dirs) outlives it long.
        self._free = collections.deque(uids)
        self._in_use: set[int] = set()
        self._quarantined: set[int] = set()

    def acquire(self) -> int:
        if not self._free:
            raise SandboxError(f"all {len(self.uids)} job uids are in use")
        uid = self._free.popleft()
        self._in_use.add(uid)
        return uid

    def release(self, uid: int) -> None:
        self._in_use.remove(uid)
        self._free.append(uid)

    def quarantine(self, uid: int) -> None:
        self._in_use.remove(uid)
        self._quarantined.add(uid)

    def to_json(self) -> dict[str, object]:
        return {
            "first": self.uids[0],
            "count": len(self.uids),
            "in_use": len(self._in_use),
            "quarantined": sorted(self._quarantined),
        }


def disk_usage(path: Path, entries_max: int) -> tuple[int, int]:
    """``(bytes allocated, entries)`` under ``path`` (not following links); stops counting
    past ``entries_max`` entries (the caller fails the job then)."""
    total = 0
    entries = 0
    stack = [path]
    while stack and entries <= entries_max:
        try:
            scan = os.scandir(stack.pop())
        except (FileNotFoundError, NotADirectoryError):
            continue
        with scan:
            for entry in scan:
                entries += 1
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                total += info.st_blocks * 512
                if stat.S_ISDIR(info.st_mode):
                    stack.append(Path(entry.path))
    return total, entries


class _Run:
    """Mutable state of one running job; the first limit that trips names the outcome."""

    def __init__(self, pgid: int, cgroup: JobCgroup) -> None:
        self.pgid = pgid
        self.cgroup = cgroup
        self.failure: tuple[JobOutcome, str] | None = None
        self.stdout = bytearray()
        self.stderr = bytearray()

    def fail(self, outcome: JobOutcome, reason: str) -> None:
        if self.failure is None:
            self.failure = (outcome, reason)
        self.kill()

    def kill(self) -> None:
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # every member of the group is already gone
        self.cgroup.kill()  # and everything that left the group (setsid, double fork)


def drop_scratch(work: Path) -> int:
    """Delete what an ended job left in its directory beside ``out/``: its copies of the
    inputs and its scratch files; how many entries went. Only ``out/`` is ever read after the
    run, and the node keeps its own copy of every input, so on a provider a 1 GiB input is
    1 GiB less disk while the outputs are sealed and fetched. A job can make its scratch hard
    to delete (a mode-0 directory under an unprivileged daemon): that stays, with a warning,
    until the job's directory goes."""
    removed = 0
    try:
        entries = list(os.scandir(work))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name == "out":
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
        except OSError as exc:
            log.warning("could not delete the ended job's scratch %s: %s", entry.path, exc)
    return removed


class Executor:
    """Runs jobs in the sandbox under ``work_root/<job_id>/``; cancellable at any await."""

    def __init__(
        self,
        work_root: Path,
        *,
        sandbox: SandboxKind | None = None,
        job_uids: range | bool | None = True,
        sandbox_uid: bool | None = True,
        cgroups: Cgroups | None = None,
        memory_poll_ms: int = memory_poll_ms,
        disk_poll_ms: int = disk_poll_ms,
        images: ImageStore | None = None,
        gpu_host: GpuHost | None = None,
    ) -> None:
        """``sandbox=None`` means ``bwrap``, probed: ``SandboxError`` if it does not work here
        (there is no silent fallback; ``process`` must be asked for by name).
        ``job_uids=True`` means ``default_job_uids()``; ``None`` runs jobs as this process's
        uid (``sandbox_uid=None`` is the older spelling of that). ``cgroups=None`` probes them
        (``SandboxError`` if neither v2 nor v1 is usable). ``images``: the store a job's
        ``JobSpec.image`` names (bwrap only; without it the node runs no images)."""
        self.images = images
        self._gpu_host = gpu_host or GpuHost()
        if sandbox_uid is None:
            job_uids = None
        uids = default_job_uids() if job_uids is True else (job_uids or None)
        if uids is not None and os.geteuid() != 0:
            raise SandboxError("[compute] job uids need the daemon to run as root")
        self._uids = UidPool(uids) if uids is not None else None
        self._work_root = Path(work_root).absolute()
        self._memory_poll_s = memory_poll_ms / 1000
        self._disk_poll_s = disk_poll_ms / 1000
        self._prepare_work_root()
        self.bwrap_error: str | None = None
        if sandbox is None:
            self.bwrap_error = probe_bwrap(sandbox_uid=uids[0] if uids else None)
            if self.bwrap_error:
                raise SandboxError(
                    f"the bwrap sandbox does not work here ({self.bwrap_error}); install "
                    'bubblewrap, or set [compute] sandbox = "process" to run jobs without it'
                )
            sandbox = "bwrap"
        if sandbox not in SANDBOX_KINDS:
            raise SandboxError(f"unknown sandbox kind {sandbox!r}")
        self._bwrap = bwrap_path() if sandbox == "bwrap" else None
        if sandbox == "bwrap" and self._bwrap is None:
            raise SandboxError("sandbox 'bwrap' requested but bwrap is not installed")
        self.sandbox: SandboxKind = sandbox
        # The process sandbox with job uids runs as root: it can give each job a network,
        # IPC and mount namespace of its own (no RPC port, a capped /tmp).
        self._isolate = sandbox == "process" and self._uids is not None
        if self._isolate:
            if self._work_root.is_relative_to("/tmp") or self._work_root.is_relative_to("/dev/shm"):
                raise SandboxError(
                    f"[compute] work_root {self._work_root}: under /tmp, which each job gets "
                    "a private one of; use e.g. /var/tmp/gpumesh-jobs"
                )
            problem = probe_process_isolation()
            if problem:
                raise SandboxError(problem)
        # One parent per executor: two nodes on one machine may run the same job id.
        tag = hashlib.sha256(str(self._work_root).encode()).hexdigest()[:12]
        self.cgroups = cgroups if cgroups is not None else probe_cgroups(f"gpumesh-{tag}")
        swept = self.cgroups.sweep()
        if swept:
            log.warning("killed and removed %d job cgroup(s) left by an earlier run", swept)
        self.lifeline = Lifeline(self.cgroups)
        self._jobs_run = 0
        self._leftovers = 0
        self._running: set[JobId] = set()
        self._live: dict[JobId, _Run] = {}
        """The state of every job whose process runs now: what ``log_tail`` reads."""
        self._release_when_done: set[JobId] = set()
        self._removed = 0

    def log_tail(self, job_id: JobId, stream: str, offset: int, bytes_max: int) -> LogTail:
        """At most ``bytes_max`` bytes of a running job's ``"stdout"`` or ``"stderr"`` from
        ``offset``: a copy of what the executor drained so far (never more than the job's
        limit for that stream). A job not running here gives no bytes and ``running=False``."""
        if stream not in ("stdout", "stderr"):
            raise ValueError(f"stream must be stdout or stderr, not {stream!r}")
        if offset < 0 or bytes_max < 0:
            raise ValueError("offset and bytes_max must be >= 0")
        state = self._live.get(job_id)
        if state is None:
            return LogTail(b"", offset, 0, running=False)
        buffer = state.stdout if stream == "stdout" else state.stderr
        return LogTail(bytes(buffer[offset : offset + bytes_max]), offset, len(buffer), True)

    def close(self) -> None:
        """Give back what the executor set up outside ``work_root``: its job reaper and its
        cgroup parents."""
        self.lifeline.close()
        self.cgroups.close()

    @property
    def runtimes(self) -> tuple[str, ...]:
        """How this executor can run a job (what the offer advertises)."""
        if self.sandbox != "bwrap":
            return (self.sandbox,)
        return (RUNTIME_BWRAP, RUNTIME_BWRAP_IMAGE) if self.images is not None else (RUNTIME_BWRAP,)

    @property
    def job_uids(self) -> range | None:
        return self._uids.uids if self._uids is not None else None

    @property
    def sandbox_uid(self) -> int | None:
        """The first job uid (``None``: jobs run as this process's uid)."""
        return self._uids.uids[0] if self._uids is not None else None

    @property
    def work_root(self) -> Path:
        return self._work_root

    def _prepare_work_root(self) -> None:
        self._work_root.mkdir(parents=True, exist_ok=True, mode=0o711)
        info = self._work_root.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise SandboxError(f"[compute] work_root {self._work_root} is not our own directory")
        if self._uids is None:
            os.chmod(self._work_root, 0o700)
            return
        # Traversable, not listable: a job finds its own directory only.
        os.chmod(self._work_root, 0o711)
        for parent in self._work_root.parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                raise SandboxError(
                    f"[compute] work_root {self._work_root}: {parent} is mode "
                    f"{stat.S_IMODE(mode):o}, so job uids cannot reach it; "
                    "put work_root outside it (e.g. /var/tmp/gpumesh-jobs)"
                )

    def job_dir(self, job_id: JobId) -> Path:
        return self._work_root / job_id

    def leftover_jobs(self) -> list[JobId]:
        """Job directories present under ``work_root`` (after a restart: jobs that did not
        finish under this process; the node decides whether to fail or retry them)."""
        found = [JobId(p.name) for p in self._work_root.iterdir() if _JOB_ID.match(p.name)]
        return sorted(found)[:jobs_listed_max]

    def remove_job_dir(self, job_id: JobId) -> None:
        """Delete a finished job's directory (after its outputs have been shipped)."""
        if not _JOB_ID.match(job_id):
            raise JobSpecError(f"bad job id {job_id!r}")
        if job_id in self._running:
            raise SandboxError(f"job {job_id} is still running; its directory stays")
        shutil.rmtree(self.job_dir(job_id), ignore_errors=False)
        self._removed += 1

    def release(self, job_id: JobId) -> bool:
        """The job's outputs are no longer needed (fetched and settled, or the job failed):
        delete its directory if there is one (a running job's when it ends); whether it went."""
        if job_id in self._running:
            self._release_when_done.add(job_id)
            return False
        try:
            self.remove_job_dir(job_id)
        except FileNotFoundError:
            return False
        return True

    def sweep_job_dirs(self, retention_s: float, *, now_s: float | None = None) -> int:
        """Delete the directories of jobs that ended more than ``retention_s`` ago (their
        directory's mtime is set when the job ends); how many went. Run at start and
        periodically, so a job whose outputs nobody fetched does not keep its disk."""
        now = time.time() if now_s is None else now_s
        removed = 0
        for job_id in self.leftover_jobs():
            if job_id in self._running:
                continue
            try:
                ended = self.job_dir(job_id).lstat().st_mtime
            except FileNotFoundError:
                continue
            if now - ended >= retention_s:
                self.release(job_id)
                removed += 1
        return removed

    def _setup_dir(self, job_id: JobId, spec: JobSpec, uid: int | None = None) -> Path:
        job_dir = self.job_dir(job_id)
        try:
            job_dir.mkdir(mode=0o700)
        except FileExistsError:
            raise SandboxError(f"job directory for {job_id!r} already exists") from None
        work = job_dir / "work"
        (work / "out").mkdir(parents=True, mode=0o700)
        for rel, data in spec.inputs:
            target = work / rel
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            target.write_bytes(data)
        for rel, source in spec.input_files:
            target = work / rel
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            clone_file(source, target)
            os.chmod(target, 0o600)
        if uid is not None:
            os.chown(job_dir, uid, uid)
            for root, dirs, files in os.walk(job_dir):
                for name in dirs + files:
                    os.chown(os.path.join(root, name), uid, uid, follow_symlinks=False)
        return work

    def _end_dir(self, job_id: JobId, uid: int | None) -> None:
        job_dir = self.job_dir(job_id)
        if uid is not None:
            # The uid goes back to the pool: whoever gets it next must not read these files.
            os.chown(job_dir, os.geteuid(), os.getegid(), follow_symlinks=False)
            os.chmod(job_dir, 0o700, follow_symlinks=False)
        os.utime(job_dir, follow_symlinks=False)  # when the job ended: the retention clock

    def _env(
        self,
        job_id: JobId,
        spec: JobSpec,
        work: Path,
        gpu_uuids: Sequence[str],
        image: Image | None = None,
    ) -> dict[str, str]:
        inside = Path(BWRAP_JOB_DIR) if self.sandbox == "bwrap" else work
        # An image's own variables first (its PATH included), the job's over them, ours last.
        env = dict(image.config.env) if image is not None else {}
        path = env.get("PATH", SANDBOX_PATH)
        env.update(spec.env)
        env.update(
            {
                "PATH": path,
                "HOME": str(inside),
                "TMPDIR": "/tmp" if self.sandbox == "bwrap" or self._isolate else str(inside),
                "LANG": env.get("LANG", "C.UTF-8"),
                "GPUMESH_JOB_ID": job_id,
                "GPUMESH_OUTPUT_DIR": str(inside / "out"),
                # Empty means "no GPUs" to CUDA: a job never falls back to every device.
                "CUDA_VISIBLE_DEVICES": ",".join(gpu_uuids),
                "NVIDIA_VISIBLE_DEVICES": ",".join(gpu_uuids) or "void",
                "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            }
        )
        return env

    def _argv(
        self,
        spec: JobSpec,
        work: Path,
        tmp_bytes: int,
        image: tuple[Image, Path] | None = None,
        plan: GpuMountPlan | None = None,
    ) -> list[str]:
        if self._bwrap is None:
            return list(spec.argv)
        return bwrap_argv(
            self._bwrap,
            spec.argv,
            work=work,
            tmp_bytes=tmp_bytes,
            rootfs=image[1] if image else None,
            working_dir=image[0].config.working_dir if image else "",
            gpus=plan,
        )

    @staticmethod
    def _limits_fn(
        limits: JobLimits,
        *,
        address_space: bool,
        uid: int | None,
        cgroup_procs: Sequence[bytes],
        isolate: bool = False,
    ) -> Callable[[], None]:
        cpu = limits.cpu_time_s
        as_bytes = 2 * limits.memory_bytes + address_space_slack_bytes
        fsize = min(limits.file_size_bytes, limits.disk_bytes)
        procs = limits.processes_max
        pid_flags = os.O_WRONLY | os.O_CLOEXEC

        def apply() -> None:  # runs in the child between fork and exec: no allocation-heavy work
            # First into the job's cgroup: everything from here on, and every descendant,
            # is counted and capped there and cannot leave it.
            me = str(os.getpid()).encode()
            for path in cgroup_procs:
                fd = os.open(path, pid_flags)
                try:
                    os.write(fd, me)
                finally:
                    os.close(fd)
            if isolate_fn is not None:
                isolate_fn()
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if address_space:
                resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))
            if uid is not None:
                # The uid is this job's alone, so the per-uid process cap is per job too.
                resource.setrlimit(resource.RLIMIT_NPROC, (procs, procs))
            drop()
            # No PR_SET_PDEATHSIG: it fires when the forking *thread* ends, and trio forks in
            # a worker thread that exits after 10 s idle. The job reaper (``Lifeline``) kills
            # the job's whole cgroup when the daemon dies.

        drop = _drop_privileges_fn(uid)
        isolate_fn = _isolate_fn(limits.tmp_bytes) if isolate else None
        return apply

    async def run(
        self, job_id: JobId, spec: JobSpec, allocation: Allocation | None = None
    ) -> JobResult:
        """Run ``spec`` to completion (or a limit) and return what happened.

        Cancelling the caller kills the job's whole cgroup before this returns.
        """
        if not _JOB_ID.match(job_id):
            raise JobSpecError(f"job id {job_id!r} must match {_JOB_ID.pattern}")
        spec.validate()
        if job_id in self._running:
            raise SandboxError(f"job {job_id} is already running")
        if not spec.image:
            return await self._run_prepared(job_id, spec, allocation, None)
        if self._bwrap is None or self.images is None:
            raise JobSpecError(
                f"this node runs no container images (runtimes: {', '.join(self.runtimes)})"
            )
        image, rootfs = self.images.acquire(spec.image)  # pinned: not removed while it runs
        try:
            argv = image.config.argv(spec.argv)
            if not argv:
                raise JobSpecError(
                    f"image {image.ref} has no entrypoint or cmd and no command given"
                )
            spec = dataclasses.replace(spec, argv=argv)
            spec.validate()
            return await self._run_prepared(job_id, spec, allocation, (image, rootfs))
        finally:
            self.images.release(image)

    async def _run_prepared(
        self,
        job_id: JobId,
        spec: JobSpec,
        allocation: Allocation | None,
        image: tuple[Image, Path] | None,
    ) -> JobResult:
        plan: GpuMountPlan | None = None
        minors = allocation.gpu_minors if allocation else ()
        if self._bwrap is not None and any(m >= 0 for m in minors):
            # Before anything is set up: a node without the driver refuses the job cleanly.
            plan = await trio.to_thread.run_sync(
                lambda: gpu_mount_plan(
                    self._gpu_host,
                    minors=minors,
                    uuids=allocation.gpu_uuids if allocation else (),
                    image=image is not None,
                )
            )
        uid = self._uids.acquire() if self._uids is not None else None
        try:
            # The directory first: it refuses a job id that is already here (maybe running).
            work = await trio.to_thread.run_sync(self._setup_dir, job_id, spec, uid)
            cgroup = self.cgroups.create(
                job_id,
                memory_bytes=spec.limits.memory_bytes,
                processes_max=spec.limits.processes_max,
            )
            self.lifeline.hold(job_id)  # before its first process: a daemon's death kills it
        except (SandboxError, OSError):
            if uid is not None and self._uids is not None:
                self._uids.release(uid)
            raise
        self._running.add(job_id)
        try:
            return await self._run_in(job_id, spec, allocation, uid, cgroup, work, image, plan)
        finally:
            self._running.discard(job_id)
            # Only an empty cgroup proves every process of the job is gone.
            clean = cgroup.is_empty()
            if clean:
                cgroup.remove()
                self.lifeline.release(job_id)
            else:
                self._leftovers += 1
                log.error("job %s: processes left in %s; uid %s retired", job_id, cgroup.dirs, uid)
            if uid is not None and self._uids is not None:
                (self._uids.release if clean else self._uids.quarantine)(uid)
            if job_id in self._release_when_done:
                self._release_when_done.discard(job_id)
                self.release(job_id)

    async def _run_in(
        self,
        job_id: JobId,
        spec: JobSpec,
        allocation: Allocation | None,
        uid: int | None,
        cgroup: JobCgroup,
        work: Path,
        image: tuple[Image, Path] | None = None,
        plan: GpuMountPlan | None = None,
    ) -> JobResult:
        limits = spec.limits
        gpu_uuids: tuple[str, ...] = allocation.gpu_uuids if allocation else ()
        slots = allocation.slot_count if allocation else 1
        env = self._env(job_id, spec, work, gpu_uuids, image[0] if image else None)
        if plan is not None:
            plan.apply_env(env)
        preexec = self._limits_fn(
            limits,
            # CUDA reserves huge virtual ranges, so RLIMIT_AS would break every GPU job.
            address_space=not gpu_uuids,
            uid=uid,
            cgroup_procs=cgroup.procs_files,
            isolate=self._isolate,
        )
        started = time.monotonic()
        try:
            proc = await trio.lowlevel.open_process(
                self._argv(spec, work, limits.tmp_bytes, image, plan),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=str(work),
                env=env,
                start_new_session=True,
                preexec_fn=preexec,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise SandboxError(f"cannot start job {job_id}: {exc}") from exc
        state = _Run(proc.pid, cgroup)
        left = 0
        self._live[job_id] = state
        try:
            await self._supervise(proc, state, limits, self.job_dir(job_id))
        finally:
            del self._live[job_id]
            # Also on cancellation: SIGKILL is synchronous, reaping is shielded and bounded.
            state.kill()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(kill_wait_s):
                    await proc.wait()
                    while not cgroup.is_empty():  # the job ends when its last process does
                        cgroup.kill()
                        await trio.sleep(empty_poll_s)
                left = len(cgroup.pids())
                for stream in (proc.stdout, proc.stderr):
                    if stream is not None:
                        await stream.aclose()
                await trio.to_thread.run_sync(self._end_dir, job_id, uid)
        wall_ms = int((time.monotonic() - started) * 1000)
        self._jobs_run += 1
        disk, entries = await trio.to_thread.run_sync(
            disk_usage, self.job_dir(job_id), job_dir_entries_max
        )
        self._check_after(state, limits, disk, entries)
        outcome, reason, code, sig = self._classify(proc.returncode, state)
        out_dir = work / "out"
        files: tuple[OutputFile, ...] = ()
        try:
            files, skipped = await trio.to_thread.run_sync(
                lambda: collect_outputs(
                    out_dir, files_max=limits.output_files_max, bytes_max=limits.output_bytes_max
                )
            )
            if skipped:
                log.info("job %s: skipped %d non-regular output entries", job_id, skipped)
        except _OutputLimitError as exc:
            if outcome is JobOutcome.SUCCEEDED or outcome is JobOutcome.EXIT_NONZERO:
                outcome, reason = JobOutcome.OUTPUT_LIMIT, f"outputs rejected: {exc}"
            files = ()
        except FileNotFoundError:
            files = ()  # the job removed its own output directory: it produced nothing
        if outcome is not JobOutcome.SUCCEEDED and outcome is not JobOutcome.EXIT_NONZERO:
            files = ()  # a job stopped at a limit delivers nothing
        await trio.to_thread.run_sync(drop_scratch, work)
        cpu_ns = cgroup.cpu_usage_ns()
        return JobResult(
            job_id=job_id,
            outcome=outcome,
            reason=reason,
            exit_code=code,
            signal=sig,
            stdout=bytes(state.stdout),
            stderr=bytes(state.stderr),
            outputs=files,
            outputs_digest=outputs_digest(files),
            output_dir=out_dir,
            wall_ms=wall_ms,
            usage_gpu_ms=wall_ms * slots,
            gpu_uuids=gpu_uuids,
            sandbox=self.sandbox,
            memory_peak_bytes=cgroup.memory_peak_bytes(),
            cpu_ms=(cpu_ns or 0) // 1_000_000,
            disk_bytes=disk,
            uid=uid,
            processes_left=left,
        )

    async def _supervise(
        self, proc: trio.Process, state: _Run, limits: JobLimits, job_dir: Path
    ) -> None:
        async with trio.open_nursery() as nursery:
            drained = [trio.Event(), trio.Event()]
            nursery.start_soon(
                self._drain, proc.stdout, state.stdout, limits.stdout_bytes_max, state, drained[0]
            )
            nursery.start_soon(
                self._drain, proc.stderr, state.stderr, limits.stderr_bytes_max, state, drained[1]
            )
            nursery.start_soon(self._watch_cgroup, state, limits)
            nursery.start_soon(self._watch_disk, state, limits, job_dir)
            with trio.move_on_after(limits.wall_time_ms / 1000):
                await proc.wait()
            if proc.returncode is None:
                state.fail(
                    JobOutcome.TIMED_OUT, f"wall time exceeded {limits.wall_time_ms} ms; killed"
                )
            # The leader is gone; whatever it left behind in the cgroup goes too.
            state.kill()
            with trio.move_on_after(drain_grace_s):
                for event in drained:
                    await event.wait()
            nursery.cancel_scope.cancel()

    @staticmethod
    async def _drain(
        stream: trio.abc.ReceiveStream | None,
        buffer: bytearray,
        cap: int,
        state: _Run,
        done: trio.Event,
    ) -> None:
        assert stream is not None, "job pipes are always opened"
        try:
            while chunk := await stream.receive_some(read_chunk_bytes):
                room = cap - len(buffer)
                buffer += chunk[:room]
                if len(chunk) > room:
                    state.fail(JobOutcome.STDOUT_LIMIT, f"wrote more than {cap} bytes to a pipe")
                    return
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return
        finally:
            done.set()

    async def _watch_cgroup(self, state: _Run, limits: JobLimits) -> None:
        while True:
            if self._check_cgroup(state, limits):
                return
            await trio.sleep(self._memory_poll_s)

    @staticmethod
    def _check_cgroup(state: _Run, limits: JobLimits) -> bool:
        """Fail the job if its tree went over the memory or CPU-time cap; True if it did."""
        kills = state.cgroup.oom_kills()
        if kills:
            state.fail(
                JobOutcome.MEMORY_LIMIT,
                f"memory of the job's processes reached the cap of {limits.memory_bytes} "
                f"bytes; the kernel killed {kills} of them",
            )
            return True
        cpu_ns = state.cgroup.cpu_usage_ns()
        if cpu_ns is not None and cpu_ns > limits.cpu_time_s * 1_000_000_000:
            state.fail(
                JobOutcome.CPU_TIME_LIMIT,
                f"CPU time of the job's processes {cpu_ns // 1_000_000} ms exceeded the cap "
                f"of {limits.cpu_time_s} s",
            )
            return True
        return False

    async def _watch_disk(self, state: _Run, limits: JobLimits, job_dir: Path) -> None:
        while True:
            await trio.sleep(self._disk_poll_s)
            used, entries = await trio.to_thread.run_sync(disk_usage, job_dir, job_dir_entries_max)
            if self._check_disk(state, limits, used, entries):
                return

    @staticmethod
    def _check_disk(state: _Run, limits: JobLimits, used: int, entries: int) -> bool:
        if entries > job_dir_entries_max:
            state.fail(
                JobOutcome.DISK_LIMIT, f"more than {job_dir_entries_max} files in the job directory"
            )
            return True
        if used > limits.disk_bytes:
            state.fail(
                JobOutcome.DISK_LIMIT,
                f"the job directory holds {used} bytes, over the cap of {limits.disk_bytes}",
            )
            return True
        return False

    def _check_after(self, state: _Run, limits: JobLimits, disk: int, entries: int) -> None:
        # A job can go over a cap and exit between two polls: look once more at the end.
        if state.failure is None:
            self._check_cgroup(state, limits)
        if state.failure is None:
            self._check_disk(state, limits, disk, entries)

    def _classify(
        self, returncode: int | None, state: _Run
    ) -> tuple[JobOutcome, str, int | None, int | None]:
        code: int | None = None
        sig: int | None = None
        if returncode is not None and returncode < 0:
            sig = -returncode
        elif returncode is not None and self.sandbox == "bwrap" and 128 < returncode <= 128 + 64:
            sig = returncode - 128  # bwrap reports a signalled child as 128 + signal
        elif returncode is not None and returncode - 128 in (signal.SIGXCPU, signal.SIGXFSZ):
            # A shell reports a child killed by a limit signal as 128 + signal; a job that
            # exits 152 or 153 on purpose is misread as hitting a limit, which is the safe side.
            sig = returncode - 128
        else:
            code = returncode
        if state.failure is not None:
            outcome, reason = state.failure
            return outcome, reason, code, sig
        if sig == signal.SIGXCPU:
            return JobOutcome.CPU_TIME_LIMIT, "CPU time limit exceeded (SIGXCPU)", code, sig
        if sig == signal.SIGXFSZ:
            return JobOutcome.FILE_SIZE_LIMIT, "file size limit exceeded (SIGXFSZ)", code, sig
        if sig is not None:
            return JobOutcome.KILLED_BY_SIGNAL, f"killed by {signal.Signals(sig).name}", code, sig
        if code == 0:
            return JobOutcome.SUCCEEDED, "exited 0", code, sig
        refused = state.cgroup.processes_refused()
        if refused:
            return (
                JobOutcome.PROCESS_LIMIT,
                f"exited {code} after {refused} fork(s) were refused at the process cap",
                code,
                sig,
            )
        tail = bytes(state.stderr[-4096:])
        if b"MemoryError" in tail or b"Cannot allocate memory" in tail or b"bad_alloc" in tail:
            return (
                JobOutcome.MEMORY_LIMIT,
                f"allocation failed at the address-space cap (exit {code})",
                code,
                sig,
            )
        return JobOutcome.EXIT_NONZERO, f"exited {code}", code, sig

    def to_json(self) -> dict[str, object]:
        return {
            "sandbox": self.sandbox,
            "runtimes": list(self.runtimes),
            "bwrap_error": self.bwrap_error,
            "process_isolation": self._isolate,
            "job_uids": self._uids.to_json() if self._uids is not None else None,
            "cgroups": self.cgroups.to_json(),
            "work_root": str(self._work_root),
            "jobs_run": self._jobs_run,
            "jobs_with_leftover_processes": self._leftovers,
            "jobs_running": len(self._running),
            "job_dirs_removed": self._removed,
        }
