"""Test helpers for compute and for packages that wire it: fake NVML devices, offer factories.

``FakeNvml`` stands in for the NVML driver library (there is no GPU on CI machines); it is the
seam the brief asks for, not a replacement for anything else.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

from compute._allocator import SlotAllocator
from compute._inventory import read_inventory
from compute._offers import OfferConfig, build_offer
from compute.exceptions import NvmlUnavailableError

if TYPE_CHECKING:
    import ledger
    from compute.types import Offer, SandboxKind


@dataclasses.dataclass
class FakeGpu:
    name: str = "NVIDIA GeForce RTX 4090"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    total_bytes: int = 24 * 1024**3
    free_bytes: int = 20 * 1024**3
    utilization_pct: int = 7
    compute_capability: tuple[int, int] = (8, 9)
    minor_number: int = 0
    broken: bool = False


class FakeNvml:
    """An ``NvmlAPI`` over a list of ``FakeGpu``; ``init_error`` simulates a missing driver."""

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        driver: str = "550.54.15",
        cuda: int = 12040,
        init_error: str | None = None,
    ) -> None:
        self.gpus = gpus
        self.driver = driver
        self.cuda = cuda
        self.init_error = init_error
        self.initialised = False

    def _gpu(self, index: int) -> FakeGpu:
        if not self.initialised:
            raise NvmlUnavailableError("not initialised")
        gpu = self.gpus[index]
        if gpu.broken:
            raise NvmlUnavailableError(f"GPU {index} is lost")
        return gpu

    def init(self) -> None:
        if self.init_error is not None:
            raise NvmlUnavailableError(self.init_error)
        self.initialised = True

    def shutdown(self) -> None:
        self.initialised = False

    def driver_version(self) -> str:
        return self.driver

    def cuda_driver_version(self) -> int:
        return self.cuda

    def device_count(self) -> int:
        return len(self.gpus)

    def device_name(self, index: int) -> str:
        return self._gpu(index).name

    def device_uuid(self, index: int) -> str:
        return self._gpu(index).uuid

    def device_memory(self, index: int) -> tuple[int, int]:
        gpu = self._gpu(index)
        return gpu.total_bytes, gpu.free_bytes

    def device_utilization_pct(self, index: int) -> int:
        return self._gpu(index).utilization_pct

    def device_compute_capability(self, index: int) -> tuple[int, int]:
        return self._gpu(index).compute_capability

    def device_minor_number(self, index: int) -> int:
        return self._gpu(index).minor_number


def make_offer(
    key: ledger.SigningKey,
    *,
    chain_id: str,
    now_ms: int,
    simulate_gpus: str = "RTX4090:2",
    sequence: int = 1,
    config: OfferConfig | None = None,
    sandbox: SandboxKind = "process",
    busy_gpus: int = 0,
) -> Offer:
    """A signed offer from a simulated provider (``busy_gpus`` of its GPUs allocated)."""
    import ledger as _ledger
    from compute.types import JobId

    inventory = read_inventory(simulate_gpus=simulate_gpus, simulate_seed=key.address.hex())
    allocator = SlotAllocator(inventory.gpus)
    for i in range(busy_gpus):
        allocator.allocate(JobId(f"busy-{i}"), 1)
    offer = build_offer(
        chain_id=chain_id,
        sequence=sequence,
        now_ms=now_ms,
        inventory=inventory,
        allocator=allocator,
        config=config or OfferConfig(),
        sandbox=sandbox,
    )
    return _ledger.sign_object(offer, key, chain_id)


BUSYBOX = "/bin/busybox"
"""Debian's ``busybox-static`` (``scripts/setup.sh`` installs it): one static binary, so an
image built from it runs with nothing of the host's root."""
IMAGE_MARKER = "etc/gpumesh-image-marker"
BUSYBOX_APPLETS = ("sh", "ls", "cat", "echo", "env", "pwd", "test", "id", "touch", "mkdir")


def tar_layer(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _entry(
    name: str, data: bytes | None = None, *, kind: bytes = tarfile.REGTYPE, mode: int = 0o644,
    link: str = "",
) -> tuple[tarfile.TarInfo, bytes | None]:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = link
    info.mtime = 1_700_000_000
    if data is not None:
        info.size = len(data)
    return info, data


def busybox_layers(
    extra: list[tuple[tarfile.TarInfo, bytes | None]] | None = None,
) -> list[bytes]:
    """Two layers: busybox with its applets and an image-only marker (plus ``extra``), then a
    layer that whites out ``etc/removed`` and makes ``opaque/`` opaque (hiding ``opaque/old``)."""
    busybox = Path(BUSYBOX).read_bytes()
    base: list[tuple[tarfile.TarInfo, bytes | None]] = [
        _entry("bin", kind=tarfile.DIRTYPE, mode=0o755),
        _entry("bin/busybox", busybox, mode=0o755),
        *(_entry(f"bin/{a}", kind=tarfile.SYMTYPE, link="busybox") for a in BUSYBOX_APPLETS),
        _entry("etc", kind=tarfile.DIRTYPE, mode=0o755),
        _entry(IMAGE_MARKER, b"inside the image\n"),
        _entry("etc/removed", b"whited out by layer 2\n"),
        _entry("opaque", kind=tarfile.DIRTYPE, mode=0o755),
        _entry("opaque/old", b"hidden by layer 2's opaque marker\n"),
        *(extra or []),
    ]
    top: list[tuple[tarfile.TarInfo, bytes | None]] = [
        _entry("etc", kind=tarfile.DIRTYPE, mode=0o755),
        _entry("etc/.wh.removed", b""),
        _entry("opaque", kind=tarfile.DIRTYPE, mode=0o755),
        _entry("opaque/.wh..wh..opq", b""),
        _entry("opaque/new", b"layer 2\n"),
        _entry("app", kind=tarfile.DIRTYPE, mode=0o755),
    ]
    return [tar_layer(base), tar_layer(top)]


def image_config(
    layers: list[bytes],
    *,
    env: tuple[str, ...] = ("PATH=/bin", "GREETING=hello from the image"),
    working_dir: str = "/app",
    entrypoint: tuple[str, ...] = ("/bin/sh", "-c"),
    cmd: tuple[str, ...] = ("echo default command",),
) -> bytes:
    diff_ids = [f"sha256:{hashlib.sha256(layer).hexdigest()}" for layer in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": list(env),
            "WorkingDir": working_dir,
            "Entrypoint": list(entrypoint),
            "Cmd": list(cmd),
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    return json.dumps(config).encode()


def write_docker_archive(path: Path, layers: list[bytes], config: bytes | None = None) -> Path:
    """A ``docker save`` archive: ``manifest.json``, ``<sha>.json`` config, ``<n>/layer.tar``."""
    config = config if config is not None else image_config(layers)
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    names = [f"layer{i}/layer.tar" for i in range(len(layers))]
    manifest = [{"Config": config_name, "RepoTags": ["busybox:test"], "Layers": names}]
    files = [("manifest.json", json.dumps(manifest).encode()), (config_name, config)]
    files += list(zip(names, layers, strict=True))
    path.write_bytes(tar_layer([_entry(n, d) for n, d in files]))
    return path


def write_oci_archive(
    path: Path, layers: list[bytes], config: bytes | None = None, *, gzip_layers: bool = True
) -> tuple[Path, str]:
    """An OCI image layout archive (gzip layers by default); (path, manifest digest)."""
    config = config if config is not None else image_config(layers)
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": f"sha256:{digest}", "size": len(data)}

    media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gzip_layers else "")
    layer_descs = [
        {"mediaType": media, **blob(gzip.compress(layer, mtime=0) if gzip_layers else layer)}
        for layer in layers
    ]
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(config)},
        "layers": layer_descs,
    }
    manifest_bytes = json.dumps(manifest).encode()
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **blob(manifest_bytes)}
    index = {"schemaVersion": 2, "manifests": [desc]}
    files = [
        ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
        ("index.json", json.dumps(index).encode()),
        *((f"blobs/sha256/{d}", b) for d, b in blobs.items()),
    ]
    path.write_bytes(tar_layer([_entry(n, d) for n, d in files]))
    return path, f"sha256:{hashlib.sha256(manifest_bytes).hexdigest()}"
