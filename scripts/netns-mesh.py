#!/usr/bin/env python3
"""Create K network namespaces on a bridge, run a command in each, tear everything down.

    scripts/netns-mesh.py --count 3 -- .venv/bin/python -m p2p._benchnode \
        --index {i} --seed-hex {seed} --host {ip} --mdns --autostart 30 --print-recv

In the command, ``{i}`` is the node index, ``{ip}`` its address, ``{ns}`` its namespace and
``{seed}`` a deterministic 32-byte seed (hex). Output lines are prefixed with the index.
The namespaces and the bridge (in its own hub namespace) are removed on exit, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from p2p.testing import netns_available, netns_bridge


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--count", type=int, default=2)
    parser.add_argument("--prefix", default=None, help="namespace name prefix")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a command after --")
    # A plain `kill` must still tear the namespaces down: turn SIGTERM into an exception.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    if not netns_available():
        print("needs root and iproute2 (`ip netns`)", file=sys.stderr)
        return 2
    with netns_bridge(args.count, args.prefix) as spaces:
        procs = []
        for index, (namespace, address) in enumerate(spaces):
            seed = hashlib.sha256(f"netns-mesh/{index}".encode()).hexdigest()
            argv = [part.format(i=index, ip=address, ns=namespace, seed=seed) for part in command]
            procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", namespace, *argv],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )

        def relay(index: int, proc: subprocess.Popen[bytes]) -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(f"[{index}] {line.decode(errors='replace')}")
                sys.stdout.flush()

        threads = [
            threading.Thread(target=relay, args=(i, p), daemon=True) for i, p in enumerate(procs)
        ]
        for thread in threads:
            thread.start()
        try:
            codes = [proc.wait() for proc in procs]
        except (KeyboardInterrupt, SystemExit):
            for proc in procs:
                proc.terminate()
            codes = [proc.wait(timeout=10) for proc in procs]
        for thread in threads:
            thread.join(timeout=5)
    return max((abs(c) for c in codes), default=0)


if __name__ == "__main__":
    sys.exit(main())
