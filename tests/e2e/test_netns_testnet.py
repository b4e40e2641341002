"""Daemons in separate network namespaces, with no bootstrap peers, find each other (mDNS)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from p2p.testing import netns_available

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.netns]


@pytest.mark.skipif(not netns_available(), reason="needs root and iproute2 (ip netns)")
def test_three_namespaced_daemons_mesh_without_bootstrap(tmp_path: Path) -> None:
    before = set(
        subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    )
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "netns-testnet.py"),
            "--nodes",
            "3",
            "--wait-s",
            "45",
            "--dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no report: {out.stdout[-2000:]} {out.stderr[-2000:]}"
    report = json.loads(lines[-1])
    assert report["meshed"], f"peer counts {report['peer_counts']} (want 2 each)"
    assert out.returncode == 0
    after = set(
        subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    )
    assert not {n for n in after - before if n.startswith("gm")}, "namespaces left behind"
