"""The image store: docker-save and OCI archives in, verified blobs, unpacked roots, refusals."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from compute import ImageBusy, ImageLimits, ImageNotFound, ImageRejected, ImageStore, testing

CI = os.environ.get("CI") == "true"


def need_tools() -> None:
    missing = [t for t in ("umoci", testing.BUSYBOX) if shutil.which(t) is None]
    if missing:
        if CI:
            pytest.fail(f"CI=true and {missing} missing (scripts/setup.sh installs them)")
        pytest.skip(f"{missing} not installed")


@pytest.fixture
def base() -> Iterator[Path]:
    need_tools()
    root = Path(tempfile.mkdtemp(prefix="gpumesh-images-", dir="/var/tmp"))
    yield root
    shutil.rmtree(root)


def store_at(base: Path, **limits: int) -> ImageStore:
    return ImageStore(base / "store", roots_dir=base / "roots", limits=ImageLimits(**limits))


def test_docker_and_oci_archives_unpack_with_whiteouts_and_config(base: Path) -> None:
    store = store_at(base)
    layers = testing.busybox_layers()
    docker = store.import_archive(testing.write_docker_archive(base / "d.tar", layers))
    oci_path, oci_ref = testing.write_oci_archive(base / "o.tar", layers)
    oci = store.import_archive(oci_path)
    assert oci.ref == oci_ref, "an OCI image's reference is its manifest digest"
    assert docker.ref != oci.ref and docker.source == "docker" and oci.source == "oci"
    plain = tuple(f"sha256:{hashlib.sha256(layer).hexdigest()}" for layer in layers)
    assert docker.layers == plain, "docker layers are stored as they came"
    for image in (docker, oci):
        root = store.rootfs(image.ref)
        assert (root / testing.IMAGE_MARKER).read_text() == "inside the image\n"
        assert not (root / "etc/removed").exists(), ".wh.removed must delete the lower file"
        assert sorted(os.listdir(root / "opaque")) == ["new"], ".wh..wh..opq hides lower files"
        for mount_point in ("proc", "dev", "tmp", "job", "app"):
            assert (root / mount_point).is_dir(), f"mount point /{mount_point} missing"
        assert image.config.env == (("PATH", "/bin"), ("GREETING", "hello from the image"))
        assert image.config.working_dir == "/app"
        assert image.config.argv(()) == ("/bin/sh", "-c", "echo default command")
        assert image.config.argv(("echo x",)) == ("/bin/sh", "-c", "echo x")
    again = store.import_archive(base / "d.tar")
    assert again == docker, "importing the same archive twice keeps one image"
    assert [i.ref for i in store.images()] == [docker.ref, oci.ref]
    assert store.get(docker.hex[:12]) == docker, "a 12-character prefix names an image"
    index = json.loads((base / "store/index.json").read_text())
    assert {m["digest"] for m in index["manifests"]} == {docker.ref, oci.ref}


def test_remove_deletes_root_and_unshared_blobs_and_refuses_a_busy_image(base: Path) -> None:
    store = store_at(base)
    layers = testing.busybox_layers()
    docker = store.import_archive(testing.write_docker_archive(base / "d.tar", layers))
    oci = store.import_archive(testing.write_oci_archive(base / "o.tar", layers)[0])
    image, root = store.acquire(oci.ref)
    with pytest.raises(ImageBusy):
        store.remove(oci.ref)
    store.release(image)
    store.remove(oci.ref)
    assert not root.exists(), "the unpacked root goes with the image"
    blobs = set(os.listdir(base / "store/blobs/sha256"))
    assert docker.config_digest.removeprefix("sha256:") in blobs, "a shared blob stays"
    assert oci.hex not in blobs, "the removed image's manifest goes"
    store.remove(docker.ref)
    assert os.listdir(base / "store/blobs/sha256") == [], "no blob outlives every image"
    with pytest.raises(ImageNotFound):
        store.get(docker.ref)
    with pytest.raises(ImageNotFound):
        store.get("abc")


def _tampered(base: Path, layers: list[bytes], name: str, *, config: bytes | None = None) -> Path:
    return testing.write_docker_archive(base / name, layers, config)


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        (tarfile.TarInfo("/etc/absolute"), "absolute"),
        (tarfile.TarInfo("bin/../../escape"), "escapes"),
        ("device", "device node"),
        ("hardlink", "escapes"),
    ],
)
def test_unsafe_layer_entries_are_refused(base: Path, entry: object, why: str) -> None:
    store = store_at(base)
    if entry == "device":
        info = tarfile.TarInfo("dev/sda")
        info.type, info.devmajor, info.devminor = tarfile.BLKTYPE, 8, 0
    elif entry == "hardlink":
        info = tarfile.TarInfo("etc/shadow-copy")
        info.type, info.linkname = tarfile.LNKTYPE, "../../etc/shadow"
    else:
        assert isinstance(entry, tarfile.TarInfo)
        info = entry
    layers = testing.busybox_layers(extra=[(info, b"" if info.isfile() else None)])
    with pytest.raises(ImageRejected, match=why):
        store.import_archive(_tampered(base, layers, "bad.tar"))
    assert store.images() == [] and os.listdir(base / "store/tmp") == [], "nothing half-kept"


def test_a_symlink_cannot_carry_writes_out_of_the_root(base: Path) -> None:
    store = store_at(base)
    outside = base / "outside"
    outside.mkdir()
    link = tarfile.TarInfo("evil")
    link.type, link.linkname = tarfile.SYMTYPE, str(outside)
    through = tarfile.TarInfo("evil/pwned")
    layers = testing.busybox_layers(extra=[(link, None)])
    top = testing.tar_layer([(through, b"")])
    image = store.import_archive(_tampered(base, [*layers, top], "sym.tar"))
    assert os.listdir(outside) == [], "a layer wrote through a symlink onto the host"
    assert (store.rootfs(image.ref) / "evil").is_symlink(), "the link itself is kept"


def test_digests_and_limits_are_checked(base: Path) -> None:
    store = store_at(base)
    layers = testing.busybox_layers()
    wrong_config = testing.image_config([layers[0], layers[0]])
    with pytest.raises(ImageRejected, match="config"):
        store.import_archive(_tampered(base, layers, "diff.tar", config=wrong_config))
    path, _ = testing.write_oci_archive(base / "o.tar", layers)
    # Flip one byte inside a layer blob of the archive: its sha256 no longer matches its name.
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    biggest = max(range(len(members)), key=lambda i: len(members[i][1]))
    data = bytearray(members[biggest][1])
    data[len(data) // 2] ^= 0xFF
    members[biggest] = (members[biggest][0], bytes(data))
    (base / "t.tar").write_bytes(testing.tar_layer(members))
    with pytest.raises(ImageRejected, match="sha256"):
        store.import_archive(base / "t.tar")
    small = store_at(base, unpacked_bytes_max=1024 * 1024)
    with pytest.raises(ImageRejected, match="more than"):
        small.import_archive(testing.write_docker_archive(base / "d.tar", layers))
    tiny = store_at(base, archive_bytes_max=1000)
    with pytest.raises(ImageRejected, match="over 1000"):
        tiny.import_archive(base / "d.tar")
    (base / "x.tar").write_bytes(testing.tar_layer([(tarfile.TarInfo("hello.txt"), b"")]))
    with pytest.raises(ImageRejected, match="not an image archive"):
        store.import_archive(base / "x.tar")


def test_a_restart_removes_what_an_interrupted_import_left(base: Path) -> None:
    store = store_at(base)
    kept = store.import_archive(
        testing.write_docker_archive(base / "d.tar", testing.busybox_layers())
    )
    (base / "store/tmp/import-crashed/blobs").mkdir(parents=True)
    (base / "roots" / ("f" * 64) / "rootfs").mkdir(parents=True)
    again = store_at(base)
    assert os.listdir(base / "store/tmp") == [], "a half-done import's staging is removed"
    assert os.listdir(base / "roots") == [kept.hex], "a root without a record is removed"
    assert again.get(kept.ref) == kept
