"""GPUs inside the sandbox: which device nodes, driver libraries and tools a GPU job gets.

What the NVIDIA Container Toolkit (libnvidia-container) does for a container, as a bubblewrap
mount plan: bind ``/dev/nvidia<minor>`` of each allocated GPU only, the control nodes
``/dev/nvidiactl`` (required), ``/dev/nvidia-uvm``, ``/dev/nvidia-uvm-tools`` and
``/dev/nvidia-modeset`` (where present); the host driver's user-space libraries (the
``compute`` and ``utility`` sets: ``libcuda``, ``libnvidia-ml``, ``libnvidia-ptxjitcompiler``
...) found through ``ldconfig -p`` plus configured directories; the tools (``nvidia-smi``...).
A job on the host's ``/usr`` already sees libraries and tools there, so only files outside the
trees the sandbox mounts are bound (at their own path). An image job sees nothing of the host:
the files are bound under ``/usr/local/nvidia/{lib64,bin}`` (a tmpfs, read-only once filled,
on a mount point every image root gets) with the soname links the toolkit would make, and
``LD_LIBRARY_PATH``/``PATH`` point there (the directories CUDA base images already list).
``/proc/driver/nvidia/gpus`` is masked by a tmpfs holding the allocated GPUs' entries only.

The host is behind ``GpuHost`` (the ``/dev`` directory, the library list, the tool
directories) so tests use a fake tree in a temporary directory. ``GpuDriverError`` when GPUs
were allocated but the device nodes or ``libcuda`` are not there.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from compute.exceptions import GpuDriverError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

DRIVER_LIBRARIES = (
    # utility
    "libnvidia-ml.so",
    "libnvidia-cfg.so",
    # compute
    "libcuda.so",
    "libcudadebugger.so",
    "libnvidia-opencl.so",
    "libnvidia-gpucomp.so",
    "libnvidia-ptxjitcompiler.so",
    "libnvidia-fatbinaryloader.so",
    "libnvidia-allocator.so",
    "libnvidia-compiler.so",
    "libnvidia-nvvm.so",
)
"""Library name prefixes (libnvidia-container's compute + utility sets)."""
DRIVER_TOOLS = (
    "nvidia-smi",
    "nvidia-debugdump",
    "nvidia-cuda-mps-control",
    "nvidia-cuda-mps-server",
)
CONTROL_DEVICES = ("nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")
"""Bound where present; ``nvidiactl`` is required."""
HOST_VISIBLE_TREES = ("/usr", "/etc", "/opt", "/bin", "/sbin", "/lib", "/lib32", "/lib64")
"""What a host-runtime job already sees read-only (``_sandbox._bwrap_base_args``)."""
IMAGE_NVIDIA_DIR = "/usr/local/nvidia"
IMAGE_LIB_DIR = IMAGE_NVIDIA_DIR + "/lib64"
IMAGE_BIN_DIR = IMAGE_NVIDIA_DIR + "/bin"
PROC_GPUS_DIR = "/proc/driver/nvidia/gpus"
"""One directory per GPU (its PCI bus id); masked to the allocated ones, as the toolkit does."""
proc_information_bytes_max = 64 * 1024
TOOL_DIRS = ("/usr/bin", "/usr/local/bin", "/usr/local/nvidia/bin", "/opt/nvidia/bin")
libraries_max = 256
ldconfig_timeout_s = 10.0
ldconfig_output_bytes_max = 4 * 1024 * 1024
_LDCONFIG_ARCH = {"x86_64": "x86-64", "aarch64": "AArch64", "ppc64le": "64bit"}

MountKind = Literal["dev-bind", "ro-bind", "symlink", "tmpfs", "remount-ro"]


@dataclasses.dataclass(frozen=True)
class Mount:
    """One bubblewrap operation (``source`` is a symlink's target for ``symlink``)."""

    kind: MountKind
    dest: str
    source: str = ""

    def bwrap_args(self) -> list[str]:
        if self.kind in ("tmpfs", "remount-ro"):
            return [f"--{self.kind}", self.dest]
        return [f"--{self.kind}", self.source, self.dest]


@dataclasses.dataclass(frozen=True)
class GpuMountPlan:
    mounts: tuple[Mount, ...]
    env: tuple[tuple[str, str], ...]
    """Set over the job's environment (``LD_LIBRARY_PATH``/``PATH`` are prefixed, not replaced)."""

    def bwrap_args(self) -> list[str]:
        return [arg for mount in self.mounts for arg in mount.bwrap_args()]

    def apply_env(self, env: dict[str, str]) -> None:
        for name, value in self.env:
            if name in ("LD_LIBRARY_PATH", "PATH") and env.get(name):
                parts = env[name].split(":")
                env[name] = ":".join([value, *(p for p in parts if p != value)])
            else:
                env[name] = value


def _ldconfig_listing() -> str:
    try:
        done = subprocess.run(
            ["ldconfig", "-p"],
            capture_output=True,
            timeout=ldconfig_timeout_s,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout[:ldconfig_output_bytes_max].decode(errors="replace")


@dataclasses.dataclass(frozen=True)
class GpuHost:
    """Where the driver's pieces are on this machine (the seam tests replace)."""

    dev_dir: Path = Path("/dev")
    library_dirs: tuple[Path, ...] = ()
    """Searched besides ``ldconfig -p`` (e.g. ``/usr/lib64/nvidia`` where ld.so.conf lacks it)."""
    tool_dirs: tuple[Path, ...] = tuple(Path(d) for d in TOOL_DIRS)
    ldconfig: Callable[[], str] | None = _ldconfig_listing
    """Returns ``ldconfig -p`` output; ``None``: use ``library_dirs`` only."""
    char_devices_only: bool = True
    """Device entries must be character devices (fake trees in tests hold plain files)."""
    proc_gpus_dir: Path = Path(PROC_GPUS_DIR)
    """The host's per-GPU driver directories (``<bus id>/information`` names the minor)."""

    def proc_gpus(self) -> dict[int, Path] | None:
        """Minor number -> that GPU's driver directory; ``None`` if there is no such tree."""
        try:
            entries = sorted(os.listdir(self.proc_gpus_dir))
        except OSError:
            return None
        found: dict[int, Path] = {}
        for entry in entries[:libraries_max]:
            try:
                with open(self.proc_gpus_dir / entry / "information", "rb") as handle:
                    text = handle.read(proc_information_bytes_max).decode(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "Device Minor" and value.strip().isdigit():
                    found[int(value.strip())] = self.proc_gpus_dir / entry
        return found

    def device(self, name: str) -> Path | None:
        path = self.dev_dir / name
        try:
            info = path.stat()
        except OSError:
            return None
        if self.char_devices_only and not stat.S_ISCHR(info.st_mode):
            return None
        return path

    def libraries(self) -> list[Path]:
        """Every path (links included) of a driver library: ldconfig's 64-bit entries, then
        the configured directories; at most ``libraries_max``."""
        found: dict[str, None] = {}
        arch = _LDCONFIG_ARCH.get(os.uname().machine, "")
        listing = self.ldconfig() if self.ldconfig is not None else ""
        for line in listing.splitlines():
            name, sep, path = line.strip().partition(" => ")
            if not sep or (arch and arch not in name):
                continue
            if name.split(" ", 1)[0].startswith(DRIVER_LIBRARIES):
                found[path.strip()] = None
        for directory in self.library_dirs:
            try:
                names = sorted(os.listdir(directory))
            except OSError:
                continue
            for entry in names:
                if entry.startswith(DRIVER_LIBRARIES):
                    found[str(directory / entry)] = None
        return [Path(p) for p in list(found)[:libraries_max]]

    def tools(self) -> list[Path]:
        found: dict[str, Path] = {}
        for directory in self.tool_dirs:
            for tool in DRIVER_TOOLS:
                path = directory / tool
                if tool not in found and path.is_file() and os.access(path, os.X_OK):
                    found[tool] = path
        return list(found.values())


def _under(path: str, trees: Sequence[str]) -> bool:
    return any(path == t or path.startswith(t + "/") for t in trees)


def gpu_mount_plan(
    host: GpuHost,
    *,
    minors: Sequence[int],
    uuids: Sequence[str],
    image: bool,
) -> GpuMountPlan:
    """The mounts and environment for a job given GPUs ``minors`` (their ``uuids`` go into
    ``CUDA_VISIBLE_DEVICES``); ``image``: the job's root is an image (nothing of the host's).

    Raises ``GpuDriverError`` if a GPU's device node, ``nvidiactl`` or ``libcuda`` is absent.
    """
    assert minors, "only jobs with GPUs get a plan"
    mounts: list[Mount] = []
    missing = [f"nvidia{m}" for m in minors if m < 0 or host.device(f"nvidia{m}") is None]
    if host.device("nvidiactl") is None:
        missing.append("nvidiactl")
    if missing:
        raise GpuDriverError(
            f"GPUs {', '.join(map(str, minors))} were allocated but "
            f"{', '.join(str(host.dev_dir / n) for n in missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing: is the NVIDIA driver loaded "
            "(nvidia-smi works on the host)?"
        )
    for name in [f"nvidia{m}" for m in minors] + ["nvidiactl", *CONTROL_DEVICES]:
        path = host.device(name)
        if path is not None:
            # Inside, always at /dev/<name>, wherever the host's tree is.
            mounts.append(Mount("dev-bind", f"/dev/{name}", str(path)))
    gpus = host.proc_gpus()
    if gpus is not None:
        # The other GPUs' driver entries (PCI ids, serials) are not the job's business.
        mounts.append(Mount("tmpfs", PROC_GPUS_DIR))
        for minor in minors:
            if minor in gpus:
                source = gpus[minor]
                mounts.append(Mount("ro-bind", f"{PROC_GPUS_DIR}/{source.name}", str(source)))
    libraries = host.libraries()
    if not any(p.name.startswith("libcuda.so") for p in libraries):
        raise GpuDriverError(
            "GPUs were allocated but no libcuda.so was found (ldconfig -p, "
            f"{', '.join(map(str, host.library_dirs)) or 'no library_dirs'}): install the "
            "NVIDIA driver's user-space libraries"
        )
    tools = host.tools()
    env: list[tuple[str, str]] = [
        ("CUDA_VISIBLE_DEVICES", ",".join(uuids)),
        ("NVIDIA_VISIBLE_DEVICES", ",".join(uuids)),
    ]
    if not image:
        # The host's /usr etc. are visible already; bind only what lives elsewhere.
        for path in [*libraries, *tools]:
            real = os.path.realpath(path)
            if not _under(str(path), HOST_VISIBLE_TREES) or not _under(real, HOST_VISIBLE_TREES):
                mounts.append(Mount("ro-bind", real, real))
                if str(path) != real:
                    mounts.append(Mount("symlink", str(path), real))
        return GpuMountPlan(_dedupe(mounts), tuple(env))
    mounts.append(Mount("tmpfs", IMAGE_NVIDIA_DIR))
    by_real: dict[str, list[str]] = {}
    for path in libraries:
        by_real.setdefault(os.path.realpath(path), []).append(path.name)
    for real, names in by_real.items():
        base = os.path.basename(real)
        mounts.append(Mount("ro-bind", f"{IMAGE_LIB_DIR}/{base}", real))
        for alias in sorted(set(names) - {base}):
            # The soname links (libcuda.so.1 -> libcuda.so.550.54.15) the toolkit creates.
            mounts.append(Mount("symlink", f"{IMAGE_LIB_DIR}/{alias}", base))
    for tool in tools:
        mounts.append(Mount("ro-bind", f"{IMAGE_BIN_DIR}/{tool.name}", os.path.realpath(tool)))
    mounts.append(Mount("remount-ro", IMAGE_NVIDIA_DIR))
    env += [("LD_LIBRARY_PATH", IMAGE_LIB_DIR), ("PATH", IMAGE_BIN_DIR)]
    return GpuMountPlan(_dedupe(mounts), tuple(env))


def _dedupe(mounts: list[Mount]) -> tuple[Mount, ...]:
    seen: set[str] = set()
    kept = []
    for mount in mounts:
        if mount.kind != "remount-ro" and mount.dest in seen:
            continue
        seen.add(mount.dest)
        kept.append(mount)
    return tuple(kept)
