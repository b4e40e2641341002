"""Container images: a content-addressed store of OCI images and their unpacked root filesystems.

``ImageStore.import_archive(path)`` takes an OCI image layout archive (``oci-layout`` +
``index.json`` + ``blobs/sha256/*``) or a ``docker save`` archive (``manifest.json``), reads it
member by member with bounded sizes, checks the sha256 of every blob it uses (manifest, config,
layers) and the config's ``diff_ids`` against the uncompressed layers, and refuses any layer
entry that is absolute, has a ``..`` component, is a device node, or hard-links outside the
image. The verified blobs become an OCI layout of their own, which ``umoci`` (Debian's OCI
image tool: whiteouts ``.wh.<name>`` and ``.wh..wh..opq``, symlinks resolved inside the root)
unpacks into ``roots/<hex>/rootfs``. A ``docker save`` archive is converted to an OCI manifest
first (layers are uncompressed tars; the manifest is written with sorted keys, no spaces).

Reference = ``sha256:<hex of the manifest bytes>``; ``image ls`` and ``rm`` also take a unique
hex prefix of at least ``ref_prefix_chars_min`` characters.

Layout (``directory`` is ``data/images`` of the node; ``roots`` may live elsewhere because job
uids must be able to traverse it while the node's data directory stays 0700)::

    directory/oci-layout, index.json     an OCI layout over every stored image (tag = hex)
    directory/blobs/sha256/<hex>         manifests, configs, layers; shared between images
    directory/images/<hex>.json          our record: config, layers, sizes, import time
    directory/tmp/                       imports in progress (removed at start)
    roots/<hex>/rootfs/                  the unpacked root filesystem (read-only to jobs)
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import tarfile
import threading
import time
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, NewType

from compute.exceptions import ImageBusy, ImageNotFound, ImageRejected, ImageToolError

if TYPE_CHECKING:
    from collections.abc import Iterator

log = logging.getLogger("gpumesh.compute.images")

MIB = 1024 * 1024
GIB = 1024 * MIB

ImageRef = NewType("ImageRef", str)
"""``sha256:<64 hex>``: the sha256 of the image's manifest bytes."""

ref_prefix_chars_min = 12
image_env_items_max = 256
image_env_value_chars_max = 32 * 1024
copy_chunk_bytes = MIB
umoci_timeout_s = 600.0
MOUNT_POINTS = ("proc", "dev", "tmp", "job", "usr/local/nvidia")
"""Directories every unpacked root gets (the sandbox mounts onto them; the root is read-only,
so bubblewrap could not create them at run time). A non-directory there is replaced."""

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_LAYER_TYPES = {
    MEDIA_OCI_LAYER: "tar",
    MEDIA_OCI_LAYER + "+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
}
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """Bounds on what an import may read, write and keep."""

    archive_bytes_max: int = 16 * GIB
    unpacked_bytes_max: int = 32 * GIB
    """Sum of the layers' file sizes (what the root filesystem takes, before whiteouts)."""
    layers_max: int = 128
    layer_entries_max: int = 1_000_000
    """Entries over all layers of one image."""
    archive_entries_max: int = 10_000
    json_bytes_max: int = 4 * MIB
    """Largest index, manifest or config document."""
    entry_name_chars_max: int = 4096
    images_max: int = 256
    store_bytes_max: int = 256 * GIB
    """Blobs plus unpacked roots of every stored image."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"image limit {field.name} must be a positive integer")


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """What the runtime honours from the image's config (``User`` is not: jobs get our uid)."""

    env: tuple[tuple[str, str], ...] = ()
    working_dir: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    user: str = ""
    architecture: str = ""
    os: str = ""

    def argv(self, command: tuple[str, ...]) -> tuple[str, ...]:
        """Docker's rule: ``Entrypoint + command``, or ``Entrypoint + Cmd`` if none given."""
        return self.entrypoint + (command or self.cmd)

    def to_json(self) -> dict[str, object]:
        return {
            "env": [f"{k}={v}" for k, v in self.env],
            "working_dir": self.working_dir,
            "entrypoint": list(self.entrypoint),
            "cmd": list(self.cmd),
            "user": self.user,
            "architecture": self.architecture,
            "os": self.os,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ImageConfig:
        return cls(
            env=tuple((e.partition("=")[0], e.partition("=")[2]) for e in doc["env"]),
            working_dir=doc["working_dir"],
            entrypoint=tuple(doc["entrypoint"]),
            cmd=tuple(doc["cmd"]),
            user=doc["user"],
            architecture=doc["architecture"],
            os=doc["os"],
        )


@dataclasses.dataclass(frozen=True)
class Image:
    """One stored image."""

    ref: ImageRef
    config: ImageConfig
    config_digest: str
    layers: tuple[str, ...]
    """Layer blob digests, bottom first."""
    blob_bytes: int
    unpacked_bytes: int
    source: str
    """``oci`` or ``docker``: the archive format it came from."""
    imported_at_ms: int
    origin: str = "import"
    """``import`` (a user imported it) or ``mesh`` (fetched for a job: a cache entry that
    ``evict`` may remove once unused)."""

    @property
    def hex(self) -> str:
        return self.ref.removeprefix("sha256:")

    def to_json(self) -> dict[str, object]:
        return {
            "ref": self.ref,
            "config": self.config.to_json(),
            "config_digest": self.config_digest,
            "layers": list(self.layers),
            "blob_bytes": self.blob_bytes,
            "unpacked_bytes": self.unpacked_bytes,
            "source": self.source,
            "imported_at_ms": self.imported_at_ms,
            "origin": self.origin,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Image:
        return cls(
            ref=ImageRef(doc["ref"]),
            config=ImageConfig.from_json(doc["config"]),
            config_digest=doc["config_digest"],
            layers=tuple(doc["layers"]),
            blob_bytes=doc["blob_bytes"],
            unpacked_bytes=doc["unpacked_bytes"],
            source=doc["source"],
            imported_at_ms=doc["imported_at_ms"],
            origin=str(doc.get("origin", "import")),
        )


def umoci_path() -> str | None:
    return shutil.which("umoci")


def _canonical_json(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _normal_name(name: str, limits: ImageLimits) -> str:
    """A tar member name as a relative path inside the root; ``ImageRejected`` if it is not."""
    if len(name) > limits.entry_name_chars_max or "\0" in name:
        raise ImageRejected(f"entry name {name[:64]!r} is too long or has NUL")
    if name.startswith("/"):
        raise ImageRejected(f"entry {name[:128]!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageRejected(f"entry {name[:128]!r} escapes the root ('..')")
    return "/".join(parts)


class _HashingReader(io.RawIOBase):
    """Reads through ``inner``, hashing and counting; refuses past ``bytes_max``."""

    def __init__(self, inner: IO[bytes], bytes_max: int) -> None:
        self._inner = inner
        self._max = bytes_max
        self.hasher = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        self.count += len(data)
        if self.count > self._max:
            raise ImageRejected(f"a layer decompresses to more than {self._max} bytes")
        self.hasher.update(data)
        buffer[: len(data)] = data
        return len(data)


def _parse_config(data: bytes) -> tuple[ImageConfig, tuple[str, ...]]:
    try:
        doc = json.loads(data)
        inner = doc.get("config") or {}
        env: list[tuple[str, str]] = []
        if len(inner.get("Env") or ()) > image_env_items_max:
            raise ImageRejected(f"image Env has over {image_env_items_max} entries")
        for item in inner.get("Env") or ():
            name, sep, value = str(item).partition("=")
            if not sep or not _ENV_NAME.match(name) or "\0" in value:
                raise ImageRejected(f"image Env entry {str(item)[:64]!r} is not NAME=value")
            if len(value) > image_env_value_chars_max:
                raise ImageRejected(f"image Env {name} is over {image_env_value_chars_max} chars")
            env.append((name, value))
        working_dir = str(inner.get("WorkingDir") or "")
        if working_dir and (
            not working_dir.startswith("/") or ".." in working_dir.split("/") or "\0" in working_dir
        ):
            raise ImageRejected(f"image WorkingDir {working_dir[:64]!r} must be absolute, no '..'")
        config = ImageConfig(
            env=tuple(env),
            working_dir=working_dir,
            entrypoint=tuple(str(a) for a in inner.get("Entrypoint") or ()),
            cmd=tuple(str(a) for a in inner.get("Cmd") or ()),
            user=str(inner.get("User") or ""),
            architecture=str(doc.get("architecture") or ""),
            os=str(doc.get("os") or ""),
        )
        diff_ids = tuple(str(d) for d in (doc.get("rootfs") or {}).get("diff_ids") or ())
    except (ValueError, AttributeError, TypeError) as exc:
        raise ImageRejected(f"image config is not valid JSON of the OCI shape: {exc}") from None
    return config, diff_ids


class _Archive:
    """The outer archive: a name -> member map of its regular files, read on demand."""

    def __init__(self, path: Path, limits: ImageLimits) -> None:
        self._limits = limits
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ImageRejected(f"cannot read {path}: {exc.strerror}") from None
        if size > limits.archive_bytes_max:
            raise ImageRejected(f"{path} is {size} bytes, over {limits.archive_bytes_max}")
        try:
            self._tar = tarfile.open(path, "r:*")
        except (tarfile.TarError, OSError) as exc:
            raise ImageRejected(f"{path} is not a tar archive: {exc}") from None
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            for count, member in enumerate(self._tar, 1):
                if count > limits.archive_entries_max:
                    raise ImageRejected(f"archive has over {limits.archive_entries_max} entries")
                if member.isfile():
                    self.members[_normal_name(member.name, limits)] = member
        except (tarfile.TarError, EOFError) as exc:
            self._tar.close()
            raise ImageRejected(f"{path} is a damaged tar archive: {exc}") from None
        except ImageRejected:
            self._tar.close()
            raise

    def close(self) -> None:
        self._tar.close()

    def has(self, name: str) -> bool:
        return name in self.members

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        member = self.members.get(name)
        if member is None:
            raise ImageRejected(f"archive has no file {name!r}")
        handle = self._tar.extractfile(member)
        assert handle is not None, "regular members always extract"
        with handle:
            yield handle

    def size(self, name: str) -> int:
        member = self.members.get(name)
        if member is None:
            raise ImageRejected(f"archive has no file {name!r}")
        return member.size

    def read_json_bytes(self, name: str) -> bytes:
        if self.size(name) > self._limits.json_bytes_max:
            raise ImageRejected(f"{name} is over {self._limits.json_bytes_max} bytes")
        with self.open(name) as handle:
            return handle.read()

    def copy_blob(self, name: str, target: Path) -> str:
        """Copy a member into ``target``; its sha256 hex."""
        hasher = hashlib.sha256()
        with self.open(name) as source, open(target, "wb") as out:
            while chunk := source.read(copy_chunk_bytes):
                hasher.update(chunk)
                out.write(chunk)
        return hasher.hexdigest()


class _LayoutDir:
    """An OCI layout on disk (``oci-layout``, ``index.json``, ``blobs/sha256/*``), read like
    ``_Archive``; blobs missing from it are looked up in ``blob_dirs`` (the store's own, so a
    layer this node already holds need not travel again). Copies are hard links where the
    file system allows (the blob is hashed again either way)."""

    def __init__(self, directory: Path, blob_dirs: tuple[Path, ...], limits: ImageLimits) -> None:
        self._limits = limits
        self._dirs = (directory / "blobs" / "sha256", *blob_dirs)
        self._root = directory

    def close(self) -> None:
        pass

    def _path(self, name: str) -> Path | None:
        if name in ("index.json", "oci-layout"):
            path = self._root / name
            return path if path.is_file() and not path.is_symlink() else None
        match = re.fullmatch(r"blobs/sha256/([0-9a-f]{64})", name)
        if match is None:
            return None
        for directory in self._dirs:
            path = directory / match.group(1)
            if path.is_file() and not path.is_symlink():
                return path
        return None

    def has(self, name: str) -> bool:
        return self._path(name) is not None

    def size(self, name: str) -> int:
        path = self._path(name)
        if path is None:
            raise ImageRejected(f"image layout has no file {name!r}")
        return path.stat().st_size

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        path = self._path(name)
        if path is None:
            raise ImageRejected(f"image layout has no file {name!r}")
        with open(path, "rb") as handle:
            yield handle

    def read_json_bytes(self, name: str) -> bytes:
        if self.size(name) > self._limits.json_bytes_max:
            raise ImageRejected(f"{name} is over {self._limits.json_bytes_max} bytes")
        with self.open(name) as handle:
            return handle.read(self._limits.json_bytes_max + 1)

    def copy_blob(self, name: str, target: Path) -> str:
        path = self._path(name)
        if path is None:
            raise ImageRejected(f"image layout has no file {name!r}")
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)
        hasher = hashlib.sha256()
        with open(target, "rb") as handle:
            while chunk := handle.read(copy_chunk_bytes):
                hasher.update(chunk)
        return hasher.hexdigest()


def _json_doc(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ImageRejected(f"{what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ImageRejected(f"{what} is not a JSON object")
    return doc


def _digest_hex(descriptor: Any, what: str) -> str:
    digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
    match = _DIGEST.match(digest) if isinstance(digest, str) else None
    if match is None:
        raise ImageRejected(f"{what} digest {str(digest)[:80]!r} is not sha256:<hex>")
    return match.group(1)


def _host_architecture() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


class ImageStore:
    """The node's images: import, list, remove, and the root a job runs in.

    Thread-safe (the node calls it from worker threads); ``acquire``/``release`` pin an image
    while a job runs in it so ``remove`` refuses (``ImageBusy``).
    """

    def __init__(
        self,
        directory: Path,
        *,
        roots_dir: Path | None = None,
        limits: ImageLimits | None = None,
        umoci: str | None = None,
    ) -> None:
        self.directory = Path(directory).absolute()
        self.roots_dir = Path(roots_dir).absolute() if roots_dir else self.directory / "roots"
        self.limits = limits or ImageLimits()
        self._umoci = umoci or umoci_path()
        self._lock = threading.Lock()
        self._pins: dict[str, int] = {}
        self._imports = 0
        for sub in ("blobs/sha256", "images", "tmp"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        # Job uids must traverse to their image's root, and read it; nothing else is there.
        self.roots_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
        os.chmod(self.roots_dir, 0o711)
        layout = self.directory / "oci-layout"
        if not layout.exists():
            layout.write_text('{"imageLayoutVersion":"1.0.0"}')
        for leftover in (self.directory / "tmp").iterdir():
            shutil.rmtree(leftover, ignore_errors=True)  # an import a crash interrupted
        known = {p.stem for p in (self.directory / "images").glob("*.json")}
        for root in self.roots_dir.iterdir():
            if root.name not in known:  # unpacked, but the crash came before its record
                shutil.rmtree(root, ignore_errors=True)
        if not (self.directory / "index.json").exists():
            self._write_index()

    # -- reading --------------------------------------------------------------------------------

    def images(self) -> list[Image]:
        with self._lock:
            return self._records()

    def _records(self) -> list[Image]:
        found = []
        for path in sorted((self.directory / "images").glob("*.json")):
            found.append(Image.from_json(json.loads(path.read_text())))
        return sorted(found, key=lambda i: (i.imported_at_ms, i.ref))

    def get(self, ref: str) -> Image:
        """The image ``ref`` names (``sha256:<hex>``, ``<hex>`` or a unique prefix)."""
        with self._lock:
            return self._resolve(ref)

    def _resolve(self, ref: str) -> Image:
        text = ref.strip().lower().removeprefix("sha256:")
        if not re.fullmatch(f"[0-9a-f]{{{ref_prefix_chars_min},64}}", text):
            raise ImageNotFound(
                f"image reference {ref[:80]!r} must be sha256:<hex> or at least "
                f"{ref_prefix_chars_min} hex characters"
            )
        if len(text) == 64:
            path = self.directory / "images" / f"{text}.json"
            if not path.exists():
                raise ImageNotFound(f"no image sha256:{text}")
            return _load(path)
        matches = [i for i in self._records() if i.hex.startswith(text)]
        if len(matches) != 1:
            raise ImageNotFound(
                f"{len(matches)} images match {ref!r}" if matches else f"no image matches {ref!r}"
            )
        return matches[0]

    def has(self, ref: str) -> bool:
        """Whether the image ``ref`` (a full ``sha256:<hex>``) is stored here."""
        text = ref.removeprefix("sha256:")
        return bool(_HEX.match(text)) and (self.directory / "images" / f"{text}.json").exists()

    def blob_path(self, hex_: str) -> Path | None:
        """The stored blob ``hex_`` (a manifest, config or layer), if this store holds it."""
        if not _HEX.match(hex_):
            return None
        path = self.directory / "blobs" / "sha256" / hex_
        return path if path.is_file() else None

    def blob_hexes(self, image: Image) -> set[str]:
        """The blobs ``image`` is made of: its manifest, its config and its layers."""
        return _blob_names(image)

    def touch(self, ref: str) -> None:
        """Mark the image used now (``evict`` removes the least recently used first)."""
        with self._lock:
            image = self._resolve(ref)
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.directory / "images" / f"{image.hex}.json")

    def held_bytes(self) -> int:
        """Blobs plus unpacked roots of every stored image."""
        with self._lock:
            return self._blob_bytes() + sum(i.unpacked_bytes for i in self._records())

    def evict(self, bytes_max: int, *, keep: frozenset[str] = frozenset()) -> list[Image]:
        """Remove ``mesh`` images (fetched for jobs), least recently used first, until the
        store holds at most ``bytes_max``; never one a job has pinned, one in ``keep`` (hex),
        or one a user imported. The removed images."""
        removed: list[Image] = []
        with self._lock:
            records = self._records()
            held = self._blob_bytes() + sum(i.unpacked_bytes for i in records)
            if held <= bytes_max:
                return removed

            def used_ns(image: Image) -> int:
                try:
                    return (self.directory / "images" / f"{image.hex}.json").stat().st_mtime_ns
                except FileNotFoundError:
                    return 0

            candidates = [
                i
                for i in records
                if i.origin == "mesh" and not self._pins.get(i.hex) and i.hex not in keep
            ]
            candidates.sort(key=lambda i: (used_ns(i), i.hex))
        for image in candidates:
            if held <= bytes_max:
                break
            try:
                self.remove(image.ref)
            except (ImageBusy, ImageNotFound):
                continue  # pinned or removed since the listing
            removed.append(image)
            held = self.held_bytes()
        if removed:
            log.info("image cache evicted %d image(s)", len(removed))
        return removed

    def rootfs(self, ref: str) -> Path:
        image = self.get(ref)
        return self.roots_dir / image.hex / "rootfs"

    def acquire(self, ref: str) -> tuple[Image, Path]:
        """Pin an image for a job; its record and root. ``release`` it when the job ends."""
        with self._lock:
            image = self._resolve(ref)
            self._pins[image.hex] = self._pins.get(image.hex, 0) + 1
            return image, self.roots_dir / image.hex / "rootfs"

    def release(self, image: Image) -> None:
        with self._lock:
            left = self._pins.get(image.hex, 0) - 1
            if left > 0:
                self._pins[image.hex] = left
            else:
                self._pins.pop(image.hex, None)

    def statistics(self) -> dict[str, object]:
        with self._lock:
            records = self._records()
            return {
                "images": len(records),
                "blob_bytes": self._blob_bytes(),
                "unpacked_bytes": sum(i.unpacked_bytes for i in records),
                "imports": self._imports,
                "pinned": sum(self._pins.values()),
            }

    def _blob_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.directory / "blobs" / "sha256").iterdir())

    # -- removing -------------------------------------------------------------------------------

    def remove(self, ref: str) -> Image:
        """Delete an image, its root, and the blobs no other image uses; the removed record."""
        with self._lock:
            image = self._resolve(ref)
            if self._pins.get(image.hex):
                raise ImageBusy(f"image {image.ref} is in use by {self._pins[image.hex]} job(s)")
            (self.directory / "images" / f"{image.hex}.json").unlink()
            shutil.rmtree(self.roots_dir / image.hex, ignore_errors=True)
            used: set[str] = set()
            for other in self._records():
                used.update(_blob_names(other))
            for name in _blob_names(image) - used:
                with contextlib.suppress(FileNotFoundError):
                    (self.directory / "blobs" / "sha256" / name).unlink()
            self._write_index()
            return image

    # -- importing ------------------------------------------------------------------------------

    def import_archive(self, path: Path) -> Image:
        """Verify and store the image in ``path``; the stored image (the same one if it was
        already here). ``ImageRejected`` for a bad archive, ``ImageToolError`` if umoci fails."""
        return self._import(lambda: _Archive(Path(path), self.limits), "import")

    def import_layout(self, directory: Path, *, origin: str = "mesh") -> Image:
        """Verify and store the image of the OCI layout ``directory`` (blobs it lacks are
        taken from this store), exactly as an archive is: every digest, diff_id and entry
        checked again, unpacked by umoci. ``origin`` ``mesh``: a cache entry ``evict`` may
        remove."""
        blobs = (self.directory / "blobs" / "sha256",)
        return self._import(lambda: _LayoutDir(Path(directory), blobs, self.limits), origin)

    def _import(self, open_source: Any, origin: str) -> Image:
        if self._umoci is None:
            raise ImageToolError("umoci is not installed (apt-get install umoci)")
        with self._lock:
            if len(self._records()) >= self.limits.images_max:
                raise ImageRejected(f"the store already holds {self.limits.images_max} images")
        staging = Path(os.path.realpath(self.directory / "tmp")) / f"import-{os.urandom(8).hex()}"
        (staging / "blobs" / "sha256").mkdir(parents=True, mode=0o700)
        try:
            archive = open_source()
            try:
                manifest_bytes, source = self._stage(archive, staging)
            finally:
                archive.close()
            return self._commit(staging, manifest_bytes, source, origin)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _stage(self, archive: _Archive | _LayoutDir, staging: Path) -> tuple[bytes, str]:
        """Copy and verify every blob the image uses into ``staging``; (manifest bytes, format)."""
        if archive.has("index.json") and archive.has("oci-layout"):
            return self._stage_oci(archive, staging), "oci"
        if archive.has("manifest.json"):
            return self._stage_docker(archive, staging), "docker"
        raise ImageRejected(
            "not an image archive: neither an OCI layout (oci-layout + index.json) nor a "
            "docker save archive (manifest.json)"
        )

    def _blob_in(self, staging: Path, hex_: str) -> Path:
        return staging / "blobs" / "sha256" / hex_

    def _copy_verified(
        self, archive: _Archive | _LayoutDir, name: str, staging: Path, hex_: str
    ) -> Path:
        target = self._blob_in(staging, hex_)
        if target.exists():
            return target
        got = archive.copy_blob(name, target)
        if got != hex_:
            raise ImageRejected(f"blob {name} has sha256 {got}, not the {hex_} it is named by")
        return target

    def _stage_oci(self, archive: _Archive | _LayoutDir, staging: Path) -> bytes:
        index = _json_doc(archive.read_json_bytes("index.json"), "index.json")
        manifest_hex = self._pick_manifest(archive, index, depth=0)
        manifest_bytes = archive.read_json_bytes(f"blobs/sha256/{manifest_hex}")
        if hashlib.sha256(manifest_bytes).hexdigest() != manifest_hex:
            raise ImageRejected(f"manifest blob {manifest_hex} fails its sha256")
        manifest = _json_doc(manifest_bytes, "manifest")
        config_hex = _digest_hex(manifest.get("config"), "config")
        config_bytes = archive.read_json_bytes(f"blobs/sha256/{config_hex}")
        if hashlib.sha256(config_bytes).hexdigest() != config_hex:
            raise ImageRejected(f"config blob {config_hex} fails its sha256")
        _, diff_ids = _parse_config(config_bytes)
        layers = manifest.get("layers")
        if not isinstance(layers, list) or len(layers) > self.limits.layers_max:
            raise ImageRejected(f"manifest layers: not a list of at most {self.limits.layers_max}")
        if len(diff_ids) != len(layers):
            raise ImageRejected(f"config: {len(diff_ids)} diff_ids for {len(layers)} layers")
        entries = [0, 0]  # entries, bytes over every layer so far
        for i, layer in enumerate(layers):
            media = str(layer.get("mediaType", "")) if isinstance(layer, dict) else ""
            kind = _LAYER_TYPES.get(media)
            if kind is None:
                raise ImageRejected(f"layer {i} has media type {media[:80]!r}, not tar or tar+gzip")
            hex_ = _digest_hex(layer, f"layer {i}")
            blob = self._copy_verified(archive, f"blobs/sha256/{hex_}", staging, hex_)
            self._scan_layer(blob, kind, diff_ids[i], entries)
        (staging / "blobs" / "sha256" / manifest_hex).write_bytes(manifest_bytes)
        (staging / "blobs" / "sha256" / config_hex).write_bytes(config_bytes)
        return manifest_bytes

    def _pick_manifest(
        self, archive: _Archive | _LayoutDir, index: dict[str, Any], depth: int
    ) -> str:
        manifests = index.get("manifests")
        if not isinstance(manifests, list) or not manifests:
            raise ImageRejected("index.json lists no manifests")
        arch = _host_architecture()
        chosen = manifests[0]
        if len(manifests) > 1:
            fits = [
                m
                for m in manifests
                if isinstance(m, dict)
                and (m.get("platform") or {}).get("architecture") == arch
                and (m.get("platform") or {}).get("os", "linux") == "linux"
            ]
            if not fits:
                raise ImageRejected(f"index.json has {len(manifests)} manifests, none linux/{arch}")
            chosen = fits[0]
        hex_ = _digest_hex(chosen, "index manifest")
        if isinstance(chosen, dict) and chosen.get("mediaType") in (
            MEDIA_OCI_INDEX,
            MEDIA_DOCKER_LIST,
        ):
            if depth >= 1:
                raise ImageRejected("image indexes nest more than one level")
            nested_bytes = archive.read_json_bytes(f"blobs/sha256/{hex_}")
            if hashlib.sha256(nested_bytes).hexdigest() != hex_:
                raise ImageRejected(f"index blob {hex_} fails its sha256")
            return self._pick_manifest(archive, _json_doc(nested_bytes, "index"), depth + 1)
        return hex_

    def _stage_docker(self, archive: _Archive | _LayoutDir, staging: Path) -> bytes:
        try:
            entries_doc = json.loads(archive.read_json_bytes("manifest.json"))
            entry = entries_doc[0]
            config_name = _normal_name(str(entry["Config"]), self.limits)
            layer_names = [_normal_name(str(n), self.limits) for n in entry["Layers"]]
        except (ValueError, LookupError, TypeError) as exc:
            raise ImageRejected(f"manifest.json is not a docker save manifest: {exc}") from None
        if len(entries_doc) != 1:
            raise ImageRejected(f"manifest.json holds {len(entries_doc)} images, not 1")
        if len(layer_names) > self.limits.layers_max:
            raise ImageRejected(f"more than {self.limits.layers_max} layers")
        config_bytes = archive.read_json_bytes(config_name)
        config_hex = hashlib.sha256(config_bytes).hexdigest()
        named = PurePosixPath(config_name).name.removesuffix(".json")
        if _HEX.match(named) and named != config_hex:
            raise ImageRejected(f"config {config_name} fails its sha256")
        _, diff_ids = _parse_config(config_bytes)
        if len(diff_ids) != len(layer_names):
            raise ImageRejected(f"config: {len(diff_ids)} diff_ids, {len(layer_names)} layers")
        descriptors = []
        entries = [0, 0]
        for i, name in enumerate(layer_names):
            tmp = staging / f"layer-{i}"
            hex_ = archive.copy_blob(name, tmp)
            # docker save layers are plain tars: the blob digest is the diff_id.
            if f"sha256:{hex_}" != diff_ids[i]:
                raise ImageRejected(f"layer {name} has sha256 {hex_}, config says {diff_ids[i]}")
            blob = self._blob_in(staging, hex_)
            if blob.exists():
                tmp.unlink()
            else:
                tmp.rename(blob)
            self._scan_layer(blob, "tar", diff_ids[i], entries)
            descriptors.append(
                {
                    "mediaType": MEDIA_OCI_LAYER,
                    "digest": f"sha256:{hex_}",
                    "size": blob.stat().st_size,
                }
            )
        (staging / "blobs" / "sha256" / config_hex).write_bytes(config_bytes)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {
                "mediaType": MEDIA_OCI_CONFIG,
                "digest": f"sha256:{config_hex}",
                "size": len(config_bytes),
            },
            "layers": descriptors,
        }
        manifest_bytes = _canonical_json(manifest)
        manifest_hex = hashlib.sha256(manifest_bytes).hexdigest()
        (staging / "blobs" / "sha256" / manifest_hex).write_bytes(manifest_bytes)
        return manifest_bytes

    def _scan_layer(self, blob: Path, kind: str, diff_id: str, totals: list[int]) -> None:
        """Refuse unsafe entries, bound the layer's size, and check its diff_id."""
        limits = self.limits
        with open(blob, "rb") as raw:
            inner: IO[bytes] = gzip.GzipFile(fileobj=raw) if kind == "gzip" else raw  # type: ignore[assignment]
            reader = _HashingReader(inner, limits.unpacked_bytes_max * 2)
            buffered = io.BufferedReader(reader, copy_chunk_bytes)
            try:
                with tarfile.open(fileobj=buffered, mode="r|") as layer:
                    for member in layer:
                        totals[0] += 1
                        if totals[0] > limits.layer_entries_max:
                            raise ImageRejected(f"over {limits.layer_entries_max} layer entries")
                        name = _normal_name(member.name, limits)
                        if member.ischr() or member.isblk():
                            raise ImageRejected(f"entry {name!r} is a device node")
                        if member.islnk():
                            target = _normal_name(member.linkname, limits)
                            if not target:
                                raise ImageRejected(f"hard link {name!r} points at the root")
                        if member.issym() and len(member.linkname) > limits.entry_name_chars_max:
                            raise ImageRejected(f"symlink {name!r} has a huge target")
                        totals[1] += member.size if member.isfile() else 0
                        if totals[1] > limits.unpacked_bytes_max:
                            raise ImageRejected(
                                f"layers unpack to more than {limits.unpacked_bytes_max} bytes"
                            )
                while buffered.read(copy_chunk_bytes):  # the tar's trailing zero blocks
                    pass
            except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as exc:
                raise ImageRejected(f"layer {blob.name[:16]}: not a tar: {exc}") from None
        got = f"sha256:{reader.hasher.hexdigest()}"
        if got != diff_id:
            raise ImageRejected(f"layer {blob.name[:16]}: tar is {got}, config: {diff_id}")

    def _commit(
        self, staging: Path, manifest_bytes: bytes, source: str, origin: str = "import"
    ) -> Image:
        manifest_hex = hashlib.sha256(manifest_bytes).hexdigest()
        manifest = _json_doc(manifest_bytes, "manifest")
        config_hex = _digest_hex(manifest["config"], "config")
        config, _ = _parse_config(self._blob_in(staging, config_hex).read_bytes())
        layers = tuple(f"sha256:{_digest_hex(layer, 'layer')}" for layer in manifest["layers"])
        with self._lock:
            existing = self.directory / "images" / f"{manifest_hex}.json"
            if existing.exists():
                return Image.from_json(json.loads(existing.read_text()))
        blob_bytes = sum(p.stat().st_size for p in (staging / "blobs" / "sha256").iterdir())
        self._check_room(staging, blob_bytes)
        # umoci reads an OCI layout: the staging directory is one, holding this image only.
        (staging / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        descriptor = {
            "mediaType": MEDIA_OCI_MANIFEST,
            "digest": f"sha256:{manifest_hex}",
            "size": len(manifest_bytes),
            "annotations": {"org.opencontainers.image.ref.name": "image"},
        }
        (staging / "index.json").write_bytes(
            _canonical_json({"schemaVersion": 2, "manifests": [descriptor]})
        )
        bundle = staging / "bundle"
        self._unpack(staging, bundle)
        rootfs = bundle / "rootfs"
        for mount_point in (*MOUNT_POINTS, config.working_dir.lstrip("/")):
            if mount_point:
                _make_dirs_inside(rootfs, mount_point)
        os.chmod(bundle, 0o711)
        os.chmod(rootfs, 0o755)
        unpacked = _tree_bytes(rootfs)
        image = Image(
            ref=ImageRef(f"sha256:{manifest_hex}"),
            config=config,
            config_digest=f"sha256:{config_hex}",
            layers=layers,
            blob_bytes=blob_bytes,
            unpacked_bytes=unpacked,
            source=source,
            imported_at_ms=int(time.time() * 1000),
            origin=origin,
        )
        with self._lock:
            if existing.exists():  # a concurrent import of the same image won
                return Image.from_json(json.loads(existing.read_text()))
            target_root = self.roots_dir / manifest_hex
            shutil.rmtree(target_root, ignore_errors=True)
            shutil.move(bundle, target_root)
            for blob in (staging / "blobs" / "sha256").iterdir():
                final = self.directory / "blobs" / "sha256" / blob.name
                if not final.exists():
                    blob.rename(final)
            tmp = existing.with_suffix(".tmp")
            tmp.write_bytes(_canonical_json(image.to_json()))
            tmp.rename(existing)
            self._write_index()
            self._imports += 1
        log.info("image imported", extra={"ref": image.ref, "layers": len(layers)})
        return image

    def _check_room(self, staging: Path, blob_bytes: int) -> None:
        with self._lock:
            held = self._blob_bytes() + sum(i.unpacked_bytes for i in self._records())
        # The unpacked size is not known before unpacking: bound it by the layers' file sizes.
        need = 2 * blob_bytes
        if held + need > self.limits.store_bytes_max:
            raise ImageRejected(
                f"the image store holds {held} bytes; this image would pass "
                f"store_bytes_max = {self.limits.store_bytes_max}"
            )
        free = shutil.disk_usage(staging).free
        if free < need:
            raise ImageRejected(f"{free} bytes free on the image store's disk, need about {need}")

    def _unpack(self, layout: Path, bundle: Path) -> None:
        assert self._umoci is not None
        argv = [self._umoci, "unpack", "--image", f"{layout}:image"]
        if os.geteuid() != 0:
            argv.append("--rootless")
        argv.append(str(bundle))
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=umoci_timeout_s,
                check=False,
                cwd=layout,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ImageToolError(f"umoci unpack failed: {exc}") from None
        if done.returncode != 0:
            raise ImageToolError(
                f"umoci unpack exited {done.returncode}: "
                f"{done.stderr[-500:].decode(errors='replace')}"
            )

    def _write_index(self) -> None:
        manifests = []
        for image in self._records():
            manifest = self.directory / "blobs" / "sha256" / image.hex
            size = manifest.stat().st_size if manifest.exists() else 0
            manifests.append(
                {
                    "mediaType": MEDIA_OCI_MANIFEST,
                    "digest": image.ref,
                    "size": size,
                    "annotations": {"org.opencontainers.image.ref.name": image.hex},
                }
            )
        tmp = self.directory / "index.json.tmp"
        tmp.write_bytes(_canonical_json({"schemaVersion": 2, "manifests": manifests}))
        tmp.rename(self.directory / "index.json")


def _load(path: Path) -> Image:
    doc: dict[str, Any] = json.loads(path.read_text())
    return Image.from_json(doc)


def _blob_names(image: Image) -> set[str]:
    names = {image.hex, image.config_digest.removeprefix("sha256:")}
    names.update(layer.removeprefix("sha256:") for layer in image.layers)
    return names


def _make_dirs_inside(root: Path, relative: str) -> None:
    """``mkdir -p root/relative`` without following any link: a link or file on the way (the
    image's own, never trusted) is replaced by a directory."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for part in (p for p in relative.split("/") if p):
            assert part != "..", "callers pass normalised paths"
            try:
                info = os.lstat(part, dir_fd=fd)
            except FileNotFoundError:
                info = None
            if info is not None and not stat.S_ISDIR(info.st_mode):
                os.unlink(part, dir_fd=fd)
                info = None
            if info is None:
                os.mkdir(part, 0o755, dir_fd=fd)
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total
