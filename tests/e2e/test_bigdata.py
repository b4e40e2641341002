"""A gigabyte in and a gigabyte out over real node processes, with the provider killed (kill -9)
while the requester fetches the sealed outputs, and restarted: the fetch resumes from the
ranges already on the requester's disk instead of starting over, and the output the user gets
with `gpumesh job result ID --out DIR` (the job copies its input) is byte-identical to the
input.

``GPUMESH_BIGDATA_MIB`` shrinks the data for a quick run (default 1024: 1 GiB each way)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

import ledger
from compute.market._bundle import SealedMeta
from node import _testnet
from node._home import Home
from node.testing import wait_until
from rpc import RpcClient
from tests.e2e import _nodes
from tests.e2e._nodes import FINAL, cli, start_pair

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
SIZE_MIB = int(os.environ.get("GPUMESH_BIGDATA_MIB", "1024"))
RANGE_BYTES = MIB
"""The requester fetches sealed outputs in ranges of 1 MiB of plaintext (``_bundle``)."""
SLACK_RANGES = 64 + 4
"""Ranges a cut may cost twice: those written since the last sync, and those in flight."""
DISK_BYTES_PER_BYTE = 6.25
"""The free disk the test needs, per byte of data. Measured (free space sampled every 0.5 s,
1 GiB each way): 4.4 GB are in use when the requester starts fetching the sealed outputs
(its input blob; the provider's input blob, the job's output and the sealed outputs), and
it then checks for room for the sealed and the opened outputs (2.2 GB, plus its 64 MiB
margin) before it fetches: 6.7 GB in all. The peak of what is actually written is 5.5 GB."""
DISK_SLACK_BYTES = 256 * MIB
"""And the nodes' logs, chains and the disk they keep free."""


def client(home: Home) -> RpcClient:
    return _nodes.client(home, 60.0)


def market_events(home: Home) -> dict[str, int]:
    """The requester's market counters, from its Prometheus metrics."""
    text: str = client(home).call("admin_metrics")
    found = re.findall(
        r'^gpumesh_market_events_total\{event="([a-z_]+)"\} ([0-9.e+]+)$', text, re.M
    )
    return {name: int(float(value)) for name, value in found}


def write_input(path: Path, size_mib: int) -> str:
    """A file of ``size_mib`` MiB that no two MiB of repeat; its sha256 (hex)."""
    digest = hashlib.sha256()
    block = bytearray(hashlib.sha256(b"bigdata").digest() * (MIB // 32))
    with path.open("wb") as handle:
        for i in range(size_mib):
            block[:8] = i.to_bytes(8, "big")
            handle.write(block)
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """The sha256 (hex) of the files' bytes one after the other."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            while chunk := handle.read(4 * MIB):
                digest.update(chunk)
    return digest.hexdigest()


def had_ranges(partial: Path) -> int:
    """Ranges the requester has synced to its partial file (its ``have`` record)."""
    try:
        return sum(1 for b in (partial / "have").read_bytes() if b == 1)
    except OSError:
        return 0


def test_a_gigabyte_in_and_out_resumes_after_the_provider_is_killed_mid_fetch(
    tmp_path: Path,
) -> None:
    need = int(DISK_BYTES_PER_BYTE * SIZE_MIB * MIB) + DISK_SLACK_BYTES
    free = shutil.disk_usage(tmp_path).free
    if free < need:
        why = (
            f"{SIZE_MIB} MiB each way needs {need / 1e9:.1f} GB free at {tmp_path}, and"
            f" {free / 1e9:.1f} GB are (GPUMESH_BIGDATA_MIB makes the data smaller)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {why}")
        pytest.skip(why)
    big = tmp_path / "in.bin"
    want = write_input(big, SIZE_MIB)
    directory, (provider, requester), _ = start_pair(tmp_path, "bigdata", offer_wait_s=60)
    try:
        job = cli(
            requester,
            "job",
            "submit",
            "--gpus",
            "1",
            "--max-time",
            "10m",
            "--max-output",
            f"{SIZE_MIB}MB",
            "--bid-window",
            "300ms",
            "--input",
            str(big),
            "--",
            "sh",
            "-c",
            "cp in.bin out/out.bin",
        )
        big.unlink()  # the requester holds its own copy now: one copy less at the peak
        ranges = SIZE_MIB + 1  # the bundle header adds a little to the last range

        def mid_fetch() -> dict[str, Any] | None:
            record: dict[str, Any] = client(requester).call("job_status", {"job_id": job["id"]})
            if record["state"] in FINAL:
                raise AssertionError(f"the job ended {record['state']} before the cut: {record}")
            aid = record.get("attempt_job_id") or ""
            partial = requester.data_dir / "blobs" / "outputs" / aid / "sealed"
            if not aid or not 0 < had_ranges(partial) < ranges // 2:
                return None
            target = ledger.decode(SealedMeta, (partial / "target").read_bytes())
            assert target.output_bytes > SIZE_MIB * MIB, (
                f"the sealed outputs are {target.output_bytes} bytes: the job did not copy "
                f"its input ({client(requester).call('job_status', {'job_id': job['id']})})"
            )
            return record

        running = wait_until(mid_fetch, timeout_s=600, what="the output fetch to be under way")
        pid = _testnet.read_pid(provider)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _testnet._alive(pid), timeout_s=10, what="the provider to die")
        proc = _testnet.start_node(provider)
        _testnet.wait_ready([provider], [proc])
        final = wait_until(
            lambda: (
                s
                if (s := client(requester).call("job_status", {"job_id": job["id"]}))["state"]
                in FINAL
                else None
            ),
            timeout_s=600,
            what="the job to finish after the provider's restart",
        )
        assert final["state"] == "done", f"the job ended {final['state']}: {final.get('error')}"
        assert final["attempt_job_id"] == running["attempt_job_id"], "the attempt was re-run"
        events = market_events(requester)
        resumed = events.get("outputs_ranges_resumed", 0)
        fetched = events.get("outputs_ranges_fetched", 0)
        assert events.get("outputs_fetches_resumed", 0) >= 1 and resumed >= 1, (
            f"the fetch did not resume from the partial file: {events}"
        )
        assert fetched <= ranges + SLACK_RANGES, (
            f"{fetched} ranges fetched for {ranges}: the fetch started over ({events})"
        )
        outputs = tmp_path / "outputs"
        result = cli(requester, "job", "result", job["id"], "--out", str(outputs))
        assert not result["outputs_inline"] and result["outputs"] == {}, "no big base64"
        assert [p.name for p in outputs.iterdir()] == ["out.bin"], list(outputs.iterdir())
        assert (outputs / "out.bin").stat().st_size == SIZE_MIB * MIB
        assert sha256_files([outputs / "out.bin"]) == want, "the output differs from the input"
        sealed = requester.data_dir / "blobs" / "outputs" / final["attempt_job_id"] / "sealed"
        assert not sealed.exists(), "the requester kept the ciphertext after opening it"
        stamps = final["timestamps"]
        print(  # the figures docs/market.md quotes (pytest -s or -rP shows them)
            f"bigdata {SIZE_MIB} MiB: locked -> running {stamps['running'] - stamps['locked']} ms"
            f" (input fetch), running -> done {stamps['done'] - stamps['running']} ms (run, seal,"
            f" fetch with a provider restart, check, ack, receipt, open); {events}"
        )
    except BaseException:
        for role, home in (("provider", provider), ("requester", requester)):
            print(f"--- the {role}'s warnings ({home.log_path}):\n{_nodes.log_warnings(home)}")
        print(f"--- disk: {shutil.disk_usage(tmp_path).free} bytes free at {tmp_path}")
        raise
    finally:
        _testnet.down(directory)
        shutil.rmtree(directory, ignore_errors=True)
        big.unlink(missing_ok=True)
        shutil.rmtree(tmp_path / "outputs", ignore_errors=True)
