"""What the end-to-end tests share to drive real node processes: the job states that end a
job, an RPC client for a node's home and the ``gpumesh`` CLI run as a subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from node import _testnet
from node._home import Home
from node.testing import free_port_block, wait_until
from rpc import RpcClient

if TYPE_CHECKING:
    from pathlib import Path

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


def start_pair(
    tmp_path: Path, name: str, *, offer_wait_s: float = 30.0
) -> tuple[Path, list[Home], _testnet.TestnetLayout]:
    """A two-node testnet in ``tmp_path / name``: node 0 provides one simulated GPU, node 1
    only requests, both validate; returned once both list the provider's offer. A testnet
    that does not get there is taken down before the error goes on (no daemon left behind)."""
    directory = tmp_path / name
    layout = _testnet.init_testnet(
        directory,
        2,
        chain_id=f"e2e-{name}",
        validators=2,
        providers=1,
        simulate_gpus="RTX4090:1",
        base_port=free_port_block(4),
    )
    homes = [Home(n.home) for n in layout.nodes]
    _testnet.up(directory)
    try:
        wait_until(
            lambda: all(
                sum(1 for o in client(h).call("market_offers") if o["gpus"]) == 1 for h in homes
            ),
            timeout_s=offer_wait_s,
            what="both nodes to list the provider's offer",
        )
    except BaseException:
        _testnet.down(directory)
        raise
    return directory, homes, layout


def log_warnings(home: Home, lines_max: int = 30) -> str:
    """The last ``lines_max`` warning and error lines of a node's log, to print when a test
    fails: CI shows a failed test's output, and a node's own reason is in its log."""
    try:
        text = home.log_path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {home.log_path})"
    found = [line for line in text.splitlines() if re.search(r"(?i)warn|error|exception", line)]
    return "\n".join(found[-lines_max:]) or "(no warnings)"
