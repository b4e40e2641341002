"""What the end-to-end tests share to drive real node processes: the job states that end a
job, an RPC client for a node's home and the ``gpumesh`` CLI run as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from rpc import RpcClient

if TYPE_CHECKING:
    from node._home import Home

FINAL = frozenset({"done", "failed", "cancelled", "refunded", "output_mismatch"})
"""Job states a job does not leave."""


def client(home: Home, timeout_s: float = 30.0) -> RpcClient:
    return RpcClient.from_home(home.root, timeout_s=timeout_s)


def cli(home: Home, *argv: str, timeout_s: float = 300.0) -> Any:
    """``gpumesh GROUP ACTION --home H --json REST...`` (the options go before the command's
    own argv, which follows ``--``); its JSON output, or None when it printed nothing."""
    out = subprocess.run(
        [sys.executable, "-m", "node", *argv[:2], "--home", str(home.root), "--json", *argv[2:]],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert out.returncode == 0, f"gpumesh {' '.join(argv)} failed: {out.stderr}{out.stdout}"
    return json.loads(out.stdout) if out.stdout.strip() else None
