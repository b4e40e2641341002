"""Job inputs over real node processes: `gpumesh job submit --input FILE --input DIR` hands the
daemon paths (no bytes through JSON-RPC), the provider fetches the blobs chunk by chunk, and
the job sees them byte-identical in its directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from node import _testnet
from node.testing import wait_until
from tests.e2e._nodes import FINAL, cli, client, start_pair

pytestmark = pytest.mark.slow


def test_a_2mb_file_and_a_directory_go_in_byte_identical(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(hashlib.sha256(b"seed").digest() * (2 * 1024 * 1024 // 32 + 77))
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_bytes(b"alpha\n")
    (data / "sub" / "b.bin").write_bytes(bytes(range(256)) * 5000)
    (data / "empty").write_bytes(b"")
    files = {
        "big.bin": big,
        "data/a.txt": data / "a.txt",
        "data/sub/b.bin": data / "sub" / "b.bin",
        "data/empty": data / "empty",
    }
    directory, (provider, requester), _ = start_pair(tmp_path, "inputs")
    try:
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
            "--input",
            str(big),
            "--input",
            str(data),
            "--",
            "sh",
            "-c",
            "sha256sum big.bin data/a.txt data/sub/b.bin data/empty > out/sums.txt",
        )
        final = wait_until(
            lambda: (
                s
                if (s := client(requester).call("job_status", {"job_id": job["id"]}))["state"]
                in FINAL
                else None
            ),
            timeout_s=180,
            what="the job to finish",
        )
        assert final["state"] == "done", f"the job ended {final['state']}: {final.get('error')}"
        outputs = tmp_path / "outputs"
        cli(requester, "job", "result", job["id"], "--output-dir", str(outputs))
        lines = (outputs / "sums.txt").read_text().splitlines()
        seen = {name: digest for digest, name in (line.split() for line in lines)}
        want = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in files.items()}
        assert seen == want, "the job saw inputs that differ from the files submitted"
        # Both sides let the inputs go once the job is over (nothing half-fetched either).
        for home in (provider, requester):
            blobs = home.data_dir / "blobs" / "inputs"
            wait_until(
                lambda blobs=blobs: (
                    not any((blobs / "data").iterdir()) and not any((blobs / "partial").iterdir())
                ),
                timeout_s=30,
                what=f"the input blobs of {home.root.name} to be swept",
            )
    finally:
        _testnet.down(directory)
