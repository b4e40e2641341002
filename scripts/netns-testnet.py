#!/usr/bin/env python3
"""A gpumesh testnet across network namespaces: one node per namespace, veth to a bridge.

Nothing is configured to connect the nodes (no bootstrap peers): they find each other by mDNS
on the bridge and the Kademlia DHT, as machines on a LAN would. Prints each node's peers,
runs for --seconds (or until Ctrl-C) and removes every namespace on exit. Needs root.

    sudo .venv/bin/python scripts/netns-testnet.py --nodes 4 --seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from node import _testnet
from p2p.testing import netns_available, netns_bridge

status_timeout_s = 20.0


def node_status(namespace: str, home: str) -> dict[str, object] | None:
    out = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            namespace,
            sys.executable,
            "-m",
            "node",
            "status",
            "--home",
            home,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=status_timeout_s,
    )
    return json.loads(out.stdout) if out.returncode == 0 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0, help="0: run until Ctrl-C")
    parser.add_argument("--wait-s", type=float, default=30, help="time allowed to mesh")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    if not netns_available():
        print("needs root and iproute2 (`ip netns`)", file=sys.stderr)
        return 2
    directory = args.dir or Path(tempfile.mkdtemp(prefix="gpumesh-netns-"))
    with netns_bridge(args.nodes) as spaces:
        layout = _testnet.init_testnet(
            directory / "net",
            args.nodes,
            chain_id="gpumesh-netns",
            hosts=[ip for _, ip in spaces],
            bootstrap=False,
            mdns=True,
            base_port=26600,
        )
        procs = []
        for node, (namespace, _) in zip(layout.nodes, spaces, strict=True):
            log = open(Path(node.home) / "node.log", "ab")
            procs.append(
                (
                    log,
                    subprocess.Popen(
                        [
                            "ip",
                            "netns",
                            "exec",
                            namespace,
                            sys.executable,
                            "-m",
                            "node",
                            "run",
                            "--home",
                            node.home,
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    ),
                )
            )
        try:
            started = time.monotonic()
            want = args.nodes - 1
            counts: list[int | None] = []
            while time.monotonic() - started < args.wait_s:
                counts = []
                for node, (namespace, _) in zip(layout.nodes, spaces, strict=True):
                    info = node_status(namespace, node.home)
                    counts.append(None if info is None else int(str(info["peer_count"])))
                if all(c == want for c in counts):
                    break
                time.sleep(0.5)
            meshed = all(c == want for c in counts)
            print(
                json.dumps(
                    {
                        "nodes": args.nodes,
                        "peer_counts": counts,
                        "meshed": meshed,
                        "seconds_to_mesh": round(time.monotonic() - started, 2) if meshed else None,
                        "dir": str(directory),
                    }
                ),
                flush=True,
            )
            if args.seconds:
                time.sleep(args.seconds)
            elif meshed and sys.stdin.isatty():
                print("running; Ctrl-C stops every node and removes the namespaces")
                while True:
                    time.sleep(3600)
            return 0 if meshed else 1
        finally:
            for _, proc in procs:
                proc.send_signal(signal.SIGTERM)
            for log, proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                log.close()


if __name__ == "__main__":
    raise SystemExit(main())
