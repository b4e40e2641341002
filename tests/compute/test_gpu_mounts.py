"""The GPU mount plan against a fake /dev tree and fake driver libraries, and its bwrap argv."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import compute
from compute import testing
from compute._gpu_mounts import GpuHost, Mount, gpu_mount_plan
from compute._sandbox import bwrap_argv

VERSION = "550.54.15"
UUIDS = ("GPU-aaaa", "GPU-bbbb")
CI = os.environ.get("CI") == "true"


@pytest.fixture
def fake() -> Iterator[Path]:
    # Under /var/tmp and world-traversable: the executor test binds these files for a job uid.
    root = Path(tempfile.mkdtemp(prefix="gpumesh-gpu-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    for sub in ("dev", "lib", "bin", "lib32"):
        (root / sub).mkdir(mode=0o755)
    for name in ("nvidia0", "nvidia1", "nvidia2", "nvidiactl", "nvidia-uvm"):
        (root / "dev" / name).write_text(f"device {name}\n")
    for lib in ("libcuda.so", "libnvidia-ml.so", "libnvidia-ptxjitcompiler.so"):
        real = root / "lib" / f"{lib}.{VERSION}"
        real.write_text(f"fake {lib}\n")
        os.chmod(real, 0o644)
        (root / "lib" / f"{lib}.1").symlink_to(real.name)
    (root / "lib" / "libcuda.so").symlink_to("libcuda.so.1")
    (root / "lib" / "libfoo.so.1").write_text("not the driver\n")
    (root / "lib32" / f"libcuda.so.{VERSION}").write_text("32-bit\n")
    for minor, bus in enumerate(("0000:01:00.0", "0000:41:00.0", "0000:81:00.0")):
        (root / "proc" / bus).mkdir(parents=True)
        (root / "proc" / bus / "information").write_text(f"Model: H200\nDevice Minor:\t {minor}\n")
    smi = root / "bin" / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho fake nvidia-smi\n")
    os.chmod(smi, 0o755)
    yield root
    shutil.rmtree(root)


def host_of(root: Path, **changes: object) -> GpuHost:
    lib = root / "lib"
    listing = "\n".join(
        [
            "6 libs found in cache `/etc/ld.so.cache'",
            f"\tlibcuda.so.1 (libc6,x86-64) => {lib}/libcuda.so.1",
            f"\tlibcuda.so (libc6,x86-64) => {lib}/libcuda.so",
            f"\tlibnvidia-ml.so.1 (libc6,x86-64) => {lib}/libnvidia-ml.so.1",
            f"\tlibfoo.so.1 (libc6,x86-64) => {lib}/libfoo.so.1",
            f"\tlibcuda.so.1 (libc6) => {root}/lib32/libcuda.so.{VERSION}",
        ]
    )
    fields: dict[str, object] = {
        "dev_dir": root / "dev",
        "library_dirs": (lib,),
        "tool_dirs": (root / "bin",),
        "ldconfig": lambda: listing,
        "char_devices_only": False,
        "proc_gpus_dir": root / "proc",
    }
    fields.update(changes)
    return GpuHost(**fields)  # type: ignore[arg-type]


def test_image_plan_binds_only_the_allocated_gpus_and_the_driver_files(fake: Path) -> None:
    plan = gpu_mount_plan(host_of(fake), minors=(1, 2), uuids=UUIDS, image=True)
    devices = [m.dest for m in plan.mounts if m.kind == "dev-bind"]
    assert devices == ["/dev/nvidia1", "/dev/nvidia2", "/dev/nvidiactl", "/dev/nvidia-uvm"]
    assert all(m.source.startswith(str(fake / "dev")) for m in plan.mounts if m.kind == "dev-bind")
    lib = "/usr/local/nvidia/lib64"
    binds = {
        m.dest: m.source for m in plan.mounts if m.kind == "ro-bind" and "/proc/" not in m.dest
    }
    assert binds == {
        f"{lib}/libcuda.so.{VERSION}": str(fake / "lib" / f"libcuda.so.{VERSION}"),
        f"{lib}/libnvidia-ml.so.{VERSION}": str(fake / "lib" / f"libnvidia-ml.so.{VERSION}"),
        f"{lib}/libnvidia-ptxjitcompiler.so.{VERSION}": str(
            fake / "lib" / f"libnvidia-ptxjitcompiler.so.{VERSION}"
        ),
        "/usr/local/nvidia/bin/nvidia-smi": str(fake / "bin" / "nvidia-smi"),
    }, "each real driver file once, no libfoo, no 32-bit copy"
    procs = [m for m in plan.mounts if m.dest.startswith("/proc/")]
    assert procs == [
        Mount("tmpfs", "/proc/driver/nvidia/gpus"),
        Mount("ro-bind", "/proc/driver/nvidia/gpus/0000:41:00.0", str(fake / "proc/0000:41:00.0")),
        Mount("ro-bind", "/proc/driver/nvidia/gpus/0000:81:00.0", str(fake / "proc/0000:81:00.0")),
    ], "only the allocated GPUs' driver entries are visible"
    links = {m.dest: m.source for m in plan.mounts if m.kind == "symlink"}
    assert links[f"{lib}/libcuda.so.1"] == f"libcuda.so.{VERSION}"
    assert links[f"{lib}/libcuda.so"] == f"libcuda.so.{VERSION}"
    assert links[f"{lib}/libnvidia-ml.so.1"] == f"libnvidia-ml.so.{VERSION}"
    assert plan.mounts[0].kind == "dev-bind" and plan.mounts[-1] == Mount(
        "remount-ro", "/usr/local/nvidia"
    ), "the library tmpfs is read-only once filled"
    env = {"PATH": "/bin:/usr/bin", "CUDA_VISIBLE_DEVICES": "x"}
    plan.apply_env(env)
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa,GPU-bbbb"
    assert env["LD_LIBRARY_PATH"] == lib
    assert env["PATH"] == "/usr/local/nvidia/bin:/bin:/usr/bin"


def test_host_plan_binds_files_outside_the_visible_trees_at_their_own_path(fake: Path) -> None:
    plan = gpu_mount_plan(host_of(fake), minors=(0,), uuids=UUIDS[:1], image=False)
    binds = {m.dest: m.source for m in plan.mounts if m.kind == "ro-bind"}
    real = str(fake / "lib" / f"libcuda.so.{VERSION}")
    assert binds[real] == real, "a library outside /usr is bound where it is"
    assert not any(m.dest.startswith("/usr/local/nvidia") for m in plan.mounts), (
        "no image library directory for a job on the host's /usr"
    )
    inside = GpuHost(
        dev_dir=fake / "dev",
        library_dirs=(),
        ldconfig=lambda: "\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1",
        tool_dirs=(),
        char_devices_only=False,
        proc_gpus_dir=fake / "none",
    )
    plain = gpu_mount_plan(inside, minors=(0,), uuids=UUIDS[:1], image=False)
    assert [m.kind for m in plain.mounts] == ["dev-bind"] * 3, "/usr is visible: devices only"


def test_a_missing_driver_is_a_clear_error(fake: Path) -> None:
    (fake / "dev" / "nvidiactl").unlink()
    with pytest.raises(compute.GpuDriverError, match="nvidiactl is missing"):
        gpu_mount_plan(host_of(fake), minors=(0,), uuids=UUIDS[:1], image=True)
    (fake / "dev" / "nvidiactl").write_text("back\n")
    with pytest.raises(compute.GpuDriverError, match="nvidia7 is missing"):
        gpu_mount_plan(host_of(fake), minors=(7,), uuids=UUIDS[:1], image=True)
    no_libs = host_of(fake, library_dirs=(), ldconfig=lambda: "")
    with pytest.raises(compute.GpuDriverError, match="no libcuda"):
        gpu_mount_plan(no_libs, minors=(0,), uuids=UUIDS[:1], image=True)
    real = GpuHost(dev_dir=fake / "dev")  # plain files are not character devices
    with pytest.raises(compute.GpuDriverError, match="NVIDIA driver"):
        gpu_mount_plan(real, minors=(0,), uuids=UUIDS[:1], image=False)


def test_bwrap_argv_places_the_gpu_mounts_after_the_root_and_dev(fake: Path) -> None:
    plan = gpu_mount_plan(host_of(fake), minors=(1,), uuids=UUIDS[:1], image=True)
    argv = bwrap_argv(
        "/usr/bin/bwrap",
        ("python", "train.py"),
        work=Path("/var/tmp/jobs/j1/work"),
        tmp_bytes=1024,
        rootfs=Path("/var/tmp/roots/abc/rootfs"),
        working_dir="/app",
        gpus=plan,
    )
    assert argv[argv.index("--ro-bind") + 1 : argv.index("--ro-bind") + 3] == [
        "/var/tmp/roots/abc/rootfs",
        "/",
    ], "the image root is mounted first, as /"
    assert "/usr" not in argv[: argv.index("--dev")], "nothing of the host's /usr in an image job"
    dev = argv.index("--dev")
    gpu = argv.index("--dev-bind")
    assert dev < gpu, "device nodes go onto the fresh /dev"
    assert argv[gpu : gpu + 3] == ["--dev-bind", str(fake / "dev" / "nvidia1"), "/dev/nvidia1"]
    assert str(fake / "dev" / "nvidia0") not in argv, "another job's GPU is not bound"
    assert argv[argv.index("--chdir") + 1] == "/app"
    assert argv[-3:] == ["--", "python", "train.py"]
    tmpfs = [argv[i + 1] for i in range(gpu, len(argv)) if argv[i] == "--tmpfs"]
    assert tmpfs == ["/proc/driver/nvidia/gpus", "/usr/local/nvidia"]


async def test_an_image_job_with_gpus_sees_its_devices_and_driver_files(fake: Path) -> None:
    problems = [t for t in ("umoci", testing.BUSYBOX) if shutil.which(t) is None]
    bwrap_error = compute.probe_bwrap(sandbox_uid=compute.default_sandbox_uid())
    if bwrap_error:
        problems.append(bwrap_error)
    if problems:
        if CI:
            pytest.fail(f"CI=true and image jobs cannot run here: {problems}")
        pytest.skip(f"{problems}")
    store = compute.ImageStore(fake / "store", roots_dir=fake / "roots")
    image = store.import_archive(
        testing.write_docker_archive(fake / "busybox.tar", testing.busybox_layers())
    )
    # No /proc/driver/nvidia in this sandbox's /proc to mask: the fake tree is for the plan test.
    gpu_host = host_of(fake, proc_gpus_dir=fake / "none")
    executor = compute.Executor(fake / "jobs", images=store, gpu_host=gpu_host)
    try:
        allocation = compute.Allocation(
            compute.JobId("g1"), (1,), (compute.GpuUuid(UUIDS[1]),), "RTX4090", gpu_minors=(1,)
        )
        script = (
            "ls /dev | grep nvidia; cat /usr/local/nvidia/lib64/libcuda.so.1; nvidia-smi; "
            'echo "cvd=$CUDA_VISIBLE_DEVICES ld=$LD_LIBRARY_PATH"'
        )
        result = await executor.run(
            compute.JobId("g1"), compute.JobSpec((script,), image=image.ref), allocation
        )
        out = result.stdout.decode()
        assert result.outcome is compute.JobOutcome.SUCCEEDED, (result.reason, result.stderr)
        devices = [line for line in out.splitlines() if line.startswith("nvidia")]
        assert devices == ["nvidia-uvm", "nvidia1", "nvidiactl"], f"devices inside: {devices}"
        assert "fake libcuda.so" in out and "fake nvidia-smi" in out
        assert f"cvd={UUIDS[1]} ld=/usr/local/nvidia/lib64" in out
        bare = compute.Executor(fake / "jobs2", images=store, gpu_host=GpuHost(dev_dir=fake / "x"))
        try:
            with pytest.raises(compute.GpuDriverError):
                await bare.run(compute.JobId("g2"), compute.JobSpec(("true",)), allocation)
            assert not (fake / "jobs2" / "g2").exists(), "a refused GPU job leaves no directory"
        finally:
            bare.close()
    finally:
        executor.close()
