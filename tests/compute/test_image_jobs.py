"""Jobs in a container image: the image's root read-only as /, its env, workdir, entrypoint."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import compute
import ledger
from compute import testing

CI = os.environ.get("CI") == "true"
BWRAP_ERROR = compute.probe_bwrap(sandbox_uid=compute.default_sandbox_uid())


@pytest.fixture
def base() -> Iterator[Path]:
    problems = [t for t in ("umoci", testing.BUSYBOX) if shutil.which(t) is None]
    if BWRAP_ERROR is not None:
        problems.append(BWRAP_ERROR)
    if problems:
        if CI:
            pytest.fail(f"CI=true and image jobs cannot run here: {problems}")
        pytest.skip(f"{problems}")
    # Not tmp_path: job uids must traverse it, and /tmp is private to each job.
    root = Path(tempfile.mkdtemp(prefix="gpumesh-imagejobs-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    yield root
    shutil.rmtree(root)


@pytest.fixture
def store(base: Path) -> compute.ImageStore:
    return compute.ImageStore(base / "store", roots_dir=base / "roots")


@pytest.fixture
def executor(base: Path, store: compute.ImageStore) -> Iterator[compute.Executor]:
    ex = compute.Executor(base / "jobs", images=store, memory_poll_ms=50)
    yield ex
    ex.close()


PROBE = (
    "cat /etc/gpumesh-image-marker; "
    "for p in /etc/os-release /usr/bin/python3 /usr/lib /var/tmp /work; do "
    "test -e $p && echo HOST-VISIBLE $p; done; "
    'echo "greeting=$GREETING"; echo "cwd=$(pwd)"; echo "home=$HOME"; '
    "cat /job/input.txt; echo made > /job/out/result.txt; "
    "touch /bin/x 2>/dev/null || echo ROOT-READ-ONLY; id -u"
)


async def test_image_job_sees_the_image_root_not_the_hosts(
    base: Path, store: compute.ImageStore, executor: compute.Executor
) -> None:
    image = store.import_archive(
        testing.write_docker_archive(base / "busybox.tar", testing.busybox_layers())
    )
    assert executor.runtimes == ("bwrap", "bwrap-image")
    spec = compute.JobSpec(
        (PROBE,), inputs=(("input.txt", b"from the requester\n"),), image=image.ref
    )
    result = await executor.run(compute.JobId("img-1"), spec)
    out = result.stdout.decode()
    assert result.outcome is compute.JobOutcome.SUCCEEDED, (result.reason, result.stderr)
    assert "inside the image" in out, "the image's marker file is missing: not the image's root"
    assert "HOST-VISIBLE" not in out, f"host paths are visible in an image job: {out}"
    assert "greeting=hello from the image" in out, "the image's Env is not honoured"
    assert "cwd=/app" in out, "the image's WorkingDir is not the start directory"
    assert "home=/job" in out and "from the requester" in out, "the job directory is at /job"
    assert "ROOT-READ-ONLY" in out, "the image root must be read-only"
    assert [o.path for o in result.outputs] == ["result.txt"], "outputs come from /job/out"
    if executor.job_uids is not None:
        assert out.split()[-1] == str(result.uid), "an image job runs under its job uid"
        assert result.uid != 0

    default = await executor.run(compute.JobId("img-2"), compute.JobSpec((), image=image.hex[:16]))
    assert default.stdout == b"default command\n", "no command: the image's Cmd runs"


async def test_image_jobs_keep_the_limits_and_refuse_what_cannot_run(
    base: Path, store: compute.ImageStore, executor: compute.Executor
) -> None:
    image = store.import_archive(
        testing.write_docker_archive(base / "busybox.tar", testing.busybox_layers())
    )
    limits = compute.JobLimits(wall_time_ms=300)
    slow = await executor.run(
        compute.JobId("img-3"), compute.JobSpec(("sleep 30",), limits=limits, image=image.ref)
    )
    assert slow.outcome is compute.JobOutcome.TIMED_OUT, slow.reason
    with pytest.raises(compute.ImageNotFound):
        await executor.run(compute.JobId("img-4"), compute.JobSpec((), image="sha256:" + "0" * 64))
    plain = compute.Executor(base / "jobs2", memory_poll_ms=50)
    try:
        assert plain.runtimes == ("bwrap",)
        with pytest.raises(compute.JobSpecError, match="no container images"):
            await plain.run(compute.JobId("img-5"), compute.JobSpec((), image=image.ref))
    finally:
        plain.close()
    assert store.statistics()["pinned"] == 0, "a finished job unpins its image"
    store.remove(image.ref)


def test_offers_carry_the_runtimes_and_refuse_unknown_ones() -> None:
    key = ledger.SigningKey(b"\x07" * 32)
    config = compute.OfferConfig(runtimes=("bwrap", "bwrap-image"))
    offer = testing.make_offer(key, chain_id="c", now_ms=1_000_000, config=config)
    decoded = compute.decode_offer(ledger.encode(offer))
    compute.validate_offer(decoded, chain_id="c", now_ms=1_000_000)
    assert decoded.runtimes == ("bwrap", "bwrap-image")
    assert offer.to_json()["runtimes"] == ["bwrap", "bwrap-image"]
    with pytest.raises(ValueError, match="runtimes"):
        compute.OfferConfig(runtimes=("docker",))
    forged = ledger.sign_object(
        dataclasses.replace(offer, runtimes=("podman-root",), signature=b""), key, "c"
    )
    with pytest.raises(compute.OfferInvalidError, match="runtimes"):
        compute.validate_offer(forged, chain_id="c", now_ms=1_000_000)
