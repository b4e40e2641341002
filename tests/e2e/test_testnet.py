"""Real node processes: testnet up/status/down, kill -9 and rejoin, the CLI on a live node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from node import _testnet
from node._home import Home
from node.testing import free_port_block, wait_until
from rpc import RpcCallError, RpcClient

pytestmark = pytest.mark.slow


def peer_counts(directory: Path) -> list[int | None]:
    return [row["peers"] for row in _testnet.status(directory)]


def gpumesh(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", *args], capture_output=True, text=True, timeout=timeout
    )


def test_five_node_testnet_meshes_survives_kill_and_rejoins(tmp_path: Path) -> None:
    directory = tmp_path / "net"
    base = free_port_block(10)
    layout = _testnet.init_testnet(directory, 5, chain_id="e2e-mesh", base_port=base)
    try:
        started = time.monotonic()
        _testnet.up(directory)
        wait_until(
            lambda: peer_counts(directory) == [4] * 5,
            timeout_s=15,
            what=f"every node to report 4 peers (last: {peer_counts(directory)})",
        )
        print(f"full mesh after {time.monotonic() - started:.2f} s")

        victim = Home(layout.nodes[2].home)
        pid = _testnet.read_pid(victim)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _testnet._alive(pid), timeout_s=5, what="the killed node to die")
        others = [Home(n.home) for n in layout.nodes if n.index != 2]
        wait_until(
            lambda: all(RpcClient.from_home(h.root).call("net_peerCount") == 3 for h in others),
            timeout_s=15,
            what="survivors to drop the killed peer and keep the other 3",
        )
        # Restart with the same key and port: the survivors redial it (backoff) and it rejoins.
        proc = _testnet.start_node(victim)
        _testnet.wait_ready([victim], [proc])
        wait_until(
            lambda: peer_counts(directory) == [4] * 5,
            timeout_s=20,
            what=f"the restarted node to rejoin (last: {peer_counts(directory)})",
        )
    finally:
        stopped = _testnet.down(directory)
    assert len(stopped) == 5
    for n in layout.nodes:
        assert not Home(n.home).cookie_path.exists(), "a cleanly stopped node removes its cookie"
        assert _testnet.read_pid(Home(n.home)) is None


def test_cli_init_run_status_and_second_daemon_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    base = free_port_block(2)
    out = gpumesh(
        "init",
        "--home",
        str(home),
        "--chain-id",
        "e2e-cli",
        "--listen-port",
        str(base),
        "--rpc-port",
        str(base + 1),
        "--no-mdns",
    )
    assert out.returncode == 0, out.stderr
    again = gpumesh("init", "--home", str(home))
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr

    daemon = subprocess.Popen(
        [sys.executable, "-m", "node", "run", "--home", str(home), "--log-format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: (home / "rpc.port").exists(), timeout_s=20, what="the RPC port file")
        status = gpumesh("status", "--home", str(home), "--json")
        assert status.returncode == 0, status.stderr
        info = json.loads(status.stdout)
        assert info["chain_id"] == "e2e-cli"
        assert info["peer_count"] == 0

        second = gpumesh("run", "--home", str(home), timeout=60)
        assert second.returncode == 1, "a second daemon on the same home must be refused"
        assert "another gpumesh daemon" in second.stderr

        raw = gpumesh("rpc", "--home", str(home), "net_peerCount")
        assert raw.returncode == 0 and json.loads(raw.stdout) == 0
        bad = gpumesh("rpc", "--home", str(home), "no_suchMethod")
        assert bad.returncode == 1 and "-32601" in bad.stderr, bad.stderr

        # Malformed JSON over raw HTTP gets the spec's parse error, not a traceback.
        token = (home / "rpc.cookie").read_text().strip()
        port = int((home / "rpc.port").read_text())
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/",
            data=b"{not json",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            body = json.loads(response.read())
        assert body["error"]["code"] == -32700
        with pytest.raises(RpcCallError) as excinfo:
            RpcClient.from_home(home).call("net_peerCount", {"bogus": 1})
        assert excinfo.value.code == -32602
    finally:
        daemon.send_signal(signal.SIGINT)
        output, _ = daemon.communicate(timeout=15)
    assert daemon.returncode == 0, f"daemon exited {daemon.returncode}:\n{output[-3000:]}"
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any(e["msg"] == "shutting down" for e in lines), "JSON logs must record the shutdown"
    assert not (home / "rpc.cookie").exists()


def test_a_testnet_that_does_not_come_up_leaves_no_node_running(tmp_path: Path) -> None:
    directory = tmp_path / "net"
    layout = _testnet.init_testnet(
        directory, 2, chain_id="e2e-broken", base_port=free_port_block(4)
    )
    broken = Home(layout.nodes[1].home)
    broken.config_path.write_text("this is [not toml\n")
    try:
        with pytest.raises(_testnet.TestnetError, match="exited with"):
            _testnet.up(directory)
        homes = [Home(n.home) for n in layout.nodes]
        assert [_testnet.read_pid(h) for h in homes] == [None, None], "a node was left running"
    finally:
        _testnet.down(directory)
