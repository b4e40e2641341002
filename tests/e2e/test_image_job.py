"""A job in a container image over real node processes: the image is built in the test from
Debian's busybox-static and imported on the requester only; `gpumesh job submit --image`
runs it on the provider, which fetched the image over the mesh (and a second job reuses it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import compute
from compute import testing
from node import _testnet
from node._home import Home
from node.testing import free_port_block, wait_until
from tests.e2e._nodes import FINAL, cli, client

pytestmark = pytest.mark.slow

CI = os.environ.get("CI") == "true"
PROBE = (
    "cat /etc/gpumesh-image-marker > /job/out/probe.txt; "
    "for p in /usr/bin /etc/os-release /lib; do test -e $p && echo HOST-VISIBLE $p; done "
    ">> /job/out/probe.txt; echo done >> /job/out/probe.txt"
)


def run_probe(requester: Home, ref: str, outputs: Path, *, try_rm: bool = False) -> str:
    # The provider's offer says its one GPU is free again a gossip hop after the last job
    # ended (the requester sees the job done first): until then a submit is refused as
    # "full right now" (-32021), as a CI run found.
    wait_until(
        lambda: any(
            "bwrap-image" in (o.get("runtimes") or ()) and o.get("free_gpus", 0) >= 1
            for o in client(requester).call("market_offers")
        ),
        timeout_s=30,
        what="the requester to see the provider's GPU free",
    )
    job = cli(
        requester,
        "job",
        "submit",
        "--gpus",
        "1",
        "--max-time",
        "30s",
        "--bid-window",
        "300ms",
        "--image",
        ref,
        "--",
        PROBE,  # the image's entrypoint is sh -c
    )
    if try_rm:  # the job is not over: its provider may still need the image from here
        out = subprocess.run(
            [sys.executable, "-m", "node", "image", "rm", "--home", str(requester.root), ref],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode != 0, "an image an unfinished job names must not be removable"
        assert "unfinished job" in out.stderr + out.stdout, out.stderr + out.stdout
    final = wait_until(
        lambda: (
            s
            if (s := client(requester).call("job_status", {"job_id": job["id"]}))["state"] in FINAL
            else None
        ),
        timeout_s=180,
        what="the image job to finish",
    )
    assert final["state"] == "done", f"the image job ended {final['state']}: {final.get('error')}"
    result = cli(requester, "job", "result", job["id"], "--output-dir", str(outputs))
    assert (outputs / "probe.txt").exists(), f"no probe.txt in the outputs: {result}"
    return (outputs / "probe.txt").read_text()


def test_an_image_job_runs_in_the_image_fetched_over_the_mesh(tmp_path: Path) -> None:
    problems = [t for t in ("umoci", testing.BUSYBOX) if shutil.which(t) is None]
    bwrap = compute.probe_bwrap(sandbox_uid=compute.default_sandbox_uid())
    if bwrap is not None:
        problems.append(bwrap)
    if problems:
        if CI:
            pytest.fail(f"CI=true and image jobs cannot run here: {problems}")
        pytest.skip(f"{problems}")
    archive = testing.write_docker_archive(tmp_path / "busybox.tar", testing.busybox_layers())
    directory = tmp_path / "images"
    layout = _testnet.init_testnet(
        directory,
        2,
        chain_id="e2e-images",
        validators=2,
        providers=1,
        simulate_gpus="RTX4090:1",
        base_port=free_port_block(4),
    )
    provider, requester = (Home(n.home) for n in layout.nodes)
    _testnet.up(directory)
    try:
        wait_until(
            lambda: any(
                "bwrap-image" in (o.get("runtimes") or ())
                for o in client(requester).call("market_offers")
            ),
            timeout_s=30,
            what="the requester to see an offer with the bwrap-image runtime",
        )
        imported = cli(requester, "image", "import", str(archive))
        ref = imported["ref"]
        assert cli(provider, "image", "ls") == [], "the provider must start without the image"

        probe = run_probe(requester, ref[:19], tmp_path / "out1")
        assert "inside the image" in probe, f"the job did not run in the image's root: {probe}"
        assert "HOST-VISIBLE" not in probe, f"the host's root shows through: {probe}"
        assert probe.endswith("done\n")
        cached = cli(provider, "image", "ls")
        assert [(i["ref"], i["origin"]) for i in cached] == [(ref, "mesh")], (
            "the provider must hold the requester's image, fetched over the mesh"
        )
        stats = client(provider).call("net_statistics")["compute"]["images"]
        assert stats["imports"] == 1

        again = run_probe(requester, ref, tmp_path / "out2", try_rm=True)
        assert again == probe
        stats = client(provider).call("net_statistics")["compute"]["images"]
        assert stats["imports"] == 1, "the second job must reuse the cached image, not refetch"
        assert cli(provider, "image", "ls") == cached
        assert cli(requester, "image", "rm", ref)["ref"] == ref, "its jobs are over: removable"
    finally:
        _testnet.down(directory)
