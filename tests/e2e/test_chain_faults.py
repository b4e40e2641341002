"""Acknowledged means committed: 4 validators in their own network namespaces, transfers flowing
from every node, while one node at a time is killed -9 (and restarted), SIGSTOPped (and
continued) or cut off from the bridge (and reconnected).

Afterwards: every block hash agrees at every height on every node (no fork), every transfer a
node acknowledged is committed, the supply is what genesis minted, and every node caught up
within ``caught_up_within_s`` of the end of the last fault.

CI runs ``GPUMESH_CHAIN_FAULT_S`` = 45 s of faults (about 80 s in all); the note's run:
``GPUMESH_CHAIN_FAULT_S=600 .venv/bin/pytest tests/e2e/test_chain_faults.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import ledger
from node import _testnet
from node._home import Home
from node.testing import free_port_block, wait_until
from p2p.testing import netns_available, netns_bridge
from rpc import RpcCallError, RpcClient, RpcError

pytestmark = [pytest.mark.slow, pytest.mark.netns]

nodes_count = 4
fault_seconds = float(os.environ.get("GPUMESH_CHAIN_FAULT_S", "45"))
fault_interval_s = 8.0
fault_length_s = 3.0
partition_length_s = 5.0
rate_per_node_per_s = 4.0
"""16 transfers/s in all: twice the load of the run issue 11 measured."""
caught_up_within_s = 30.0
rpc_timeout_s = 5.0
seed = int(os.environ.get("GPUMESH_CHAIN_FAULT_SEED", str(random.randrange(1 << 30))))
_CLONE_NEWNET = 0x40000000


def enter_netns(namespace: str) -> None:
    """Move the calling thread (only it) into ``namespace``: its sockets reach that node's
    loopback RPC."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns {namespace}: {os.strerror(errno)}")
    finally:
        os.close(fd)


@dataclasses.dataclass
class Node:
    index: int
    home: Home
    namespace: str
    address: bytes
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.home.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [*self.exec_prefix(), "-m", "node", "run", "--home", str(self.home.root)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self.home.pid_path.write_text(f"{self.proc.pid}\n")

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, sys.executable]

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.home.pid_path.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class NodeCaller:
    """A thread inside one node's namespace that makes RPC calls for the test's threads."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._lock = threading.Lock()
        self._requests: list[tuple[str, Any, threading.Event, list[Any]]] = []
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        enter_netns(self.node.namespace)
        while True:
            self._wake.wait()
            with self._lock:
                self._wake.clear()
                requests, self._requests = self._requests, []
                closed = self._closed
            for method, params, done, out in requests:
                try:
                    client = RpcClient.from_home(self.node.home.root, timeout_s=rpc_timeout_s)
                    out.append(("ok", client.call(method, params)))
                except (OSError, RpcError, RpcCallError, ValueError) as exc:
                    out.append(("error", exc))
                done.set()
            if closed:
                return

    def call(self, method: str, params: Any = None) -> Any:
        done, out = threading.Event(), []
        with self._lock:
            self._requests.append((method, params, done, out))
            self._wake.set()
        if not done.wait(rpc_timeout_s * 3):
            raise TimeoutError(f"node{self.node.index} {method}: no answer")
        kind, value = out[0]
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.set()
        self._thread.join(timeout=30)


@dataclasses.dataclass
class Ledger:
    acked: dict[str, int] = dataclasses.field(default_factory=dict)
    """tx hash -> the node that acknowledged it."""
    refused: dict[str, int] = dataclasses.field(default_factory=dict)
    unanswered: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def send_loop(
    caller: NodeCaller,
    key: ledger.SigningKey,
    to: bytes,
    chain_id: str,
    fee: int,
    book: Ledger,
    stop: threading.Event,
) -> None:
    """What ``gpumesh send`` does, at ``rate_per_node_per_s``: next_nonce, sign, chain_sendTx."""
    interval = 1 / rate_per_node_per_s
    due = time.monotonic()
    while not stop.is_set():
        due += interval
        stop.wait(max(0.0, due - time.monotonic()))
        try:
            account = caller.call("chain_account", {"address": key.address.hex()})
            tx = ledger.sign_object(
                ledger.Transfer(
                    nonce=account["next_nonce"], fee=fee, recipient=ledger.Address(to), amount=1
                ),
                key,
                chain_id,
            )
            result = caller.call("chain_sendTx", {"tx": ledger.encode(tx).hex()})
        except RpcCallError as exc:
            with book.lock:
                reason = str(exc)[:60]
                book.refused[reason] = book.refused.get(reason, 0) + 1
            continue
        except (OSError, RpcError, TimeoutError):
            with book.lock:
                book.unanswered += 1
            continue
        with book.lock:
            book.acked[str(result["tx_hash"])] = caller.node.index


def heads(callers: list[NodeCaller]) -> list[int | None]:
    out: list[int | None] = []
    for caller in callers:
        try:
            out.append(int(caller.call("chain_head")["height"]))
        except (OSError, RpcError, RpcCallError, TimeoutError):
            out.append(None)
    return out


@pytest.mark.skipif(
    not netns_available() and os.environ.get("CI") != "true",
    reason="needs root and iproute2 (ip netns); under CI=true this fails instead",
)
def test_no_acknowledged_transfer_is_lost_under_faults(tmp_path: Path) -> None:
    assert netns_available(), "this test needs root and iproute2 (ip netns)"
    print(f"fault schedule seed {seed} (GPUMESH_CHAIN_FAULT_SEED={seed} replays it)")
    rng = random.Random(seed)
    tag = f"gc{os.getpid() % 10000}"
    with netns_bridge(nodes_count, prefix=tag) as spaces:
        layout = _testnet.init_testnet(
            tmp_path / "net",
            nodes_count,
            chain_id="e2e-faults",
            hosts=[ip for _, ip in spaces],
            base_port=free_port_block(2 * nodes_count),
        )
        genesis = ledger.Genesis.load(Home(layout.nodes[0].home).genesis_path)
        fee = genesis.params.fee_min
        nodes = [
            Node(i, Home(n.home), spaces[i][0], bytes.fromhex(n.address))
            for i, n in enumerate(layout.nodes)
        ]
        keys = [n.home.load_key() for n in nodes]
        callers: list[NodeCaller] = []
        stop = threading.Event()
        book = Ledger()
        senders: list[threading.Thread] = []
        try:
            for node in nodes:
                node.start()
            callers = [NodeCaller(n) for n in nodes]
            wait_until(
                lambda: all(_peer_count(c) == nodes_count - 1 for c in callers),
                timeout_s=60,
                what="a full mesh of 4",
            )
            for i, caller in enumerate(callers):
                to = nodes[(i + 1) % nodes_count].address
                thread = threading.Thread(
                    target=send_loop,
                    args=(caller, keys[i], to, layout.chain_id, fee, book, stop),
                    daemon=True,
                )
                thread.start()
                senders.append(thread)
            faults = run_faults(nodes, tag, rng)
            last_fault_end = time.monotonic()
            target = max(h for h in heads(callers) if h is not None)
            caught_up = wait_until(
                lambda: (
                    all(h is not None and h >= target for h in heads(callers)) and time.monotonic()
                ),
                timeout_s=caught_up_within_s,
                what=f"every node at height {target} within {caught_up_within_s:.0f} s",
            )
            catch_up_s = caught_up - last_fault_end
            stop.set()
            for thread in senders:
                thread.join(timeout=3 * rpc_timeout_s)
            with book.lock:
                acked = dict(book.acked)
            seen = Seen()
            with contextlib.suppress(AssertionError):  # check_chain names what is missing
                wait_until(
                    lambda: seen.scan(callers[0]) >= acked.keys(),
                    timeout_s=60,
                    what="every acknowledged transfer to commit",
                )
            # check_chain reads heights up to the lowest head: every node must first hold
            # the blocks node 0 found the transfers in (a node restarted late in the
            # schedule can trail by a few blocks; counting only to its head reported
            # transfers in the blocks above as lost).
            wait_until(
                lambda: all(h is not None and h >= seen.height for h in heads(callers)),
                timeout_s=caught_up_within_s,
                what=f"every node at height {seen.height}, where node 0 saw the transfers",
            )
            report = check_chain(callers, nodes, keys, genesis, acked)
            report.update(
                {
                    "seed": seed,
                    "fault_s": fault_seconds,
                    "faults": faults,
                    "acked": len(acked),
                    "refused": book.refused,
                    "unanswered": book.unanswered,
                    "catch_up_s": round(catch_up_s, 2),
                }
            )
            print(json.dumps(report))
            internal = {r: n for r, n in book.refused.items() if "internal error" in r}
            assert not internal, f"nodes answered with internal errors: {internal}"
        finally:
            stop.set()
            for caller in callers:
                caller.close()
            for node in nodes:
                node.stop()


def _peer_count(caller: NodeCaller) -> int:
    try:
        return int(caller.call("net_peerCount"))
    except (OSError, RpcError, RpcCallError, TimeoutError):
        return -1


class Seen:
    """The transaction hashes of one node's blocks, read incrementally."""

    def __init__(self) -> None:
        self.height = 0
        self.hashes: set[str] = set()

    def scan(self, caller: NodeCaller) -> set[str]:
        try:
            top = int(caller.call("chain_head")["height"])
            while self.height < top:
                block = caller.call("chain_block", {"height": self.height + 1})
                self.hashes.update(block["tx_hashes"])
                self.height += 1
        except (OSError, RpcError, RpcCallError, TimeoutError):
            pass  # polled again
        return self.hashes


def run_faults(nodes: list[Node], tag: str, rng: random.Random) -> list[str]:
    """One fault every ``fault_interval_s`` for ``fault_seconds``, each on a random node."""
    done: list[str] = []
    kinds = ["kill", "stop", "partition"]
    ends = time.monotonic() + fault_seconds
    step = 0
    while time.monotonic() < ends:
        started = time.monotonic()
        node = rng.choice(nodes)
        kind = kinds[step % len(kinds)] if step < len(kinds) else rng.choice(kinds)
        step += 1
        done.append(f"{kind}:{node.index}")
        if kind == "kill":
            node.kill()
            threading.Event().wait(fault_length_s)
            node.start()
        elif kind == "stop":
            node.signal(signal.SIGSTOP)
            threading.Event().wait(fault_length_s)
            node.signal(signal.SIGCONT)
        else:
            link = f"{tag}v{node.index}h"
            subprocess.run(["ip", "-n", f"{tag}-hub", "link", "set", link, "down"], check=True)
            threading.Event().wait(partition_length_s)
            subprocess.run(["ip", "-n", f"{tag}-hub", "link", "set", link, "up"], check=True)
        threading.Event().wait(max(0.0, fault_interval_s - (time.monotonic() - started)))
    return done


def check_chain(
    callers: list[NodeCaller],
    nodes: list[Node],
    keys: list[ledger.SigningKey],
    genesis: ledger.Genesis,
    acked: dict[str, int],
) -> dict[str, Any]:
    top = min(h for h in heads(callers) if h is not None)
    committed: set[str] = set()
    for height in range(1, top + 1):
        blocks = [c.call("chain_block", {"height": height}) for c in callers]
        hashes = {b["hash"] for b in blocks}
        assert len(hashes) == 1, f"fork at height {height}: {hashes}"
        committed.update(blocks[0]["tx_hashes"])
    lost = sorted(h for h in acked if h not in committed)
    assert not lost, (
        f"{len(lost)} of {len(acked)} acknowledged transfers never committed: "
        + ", ".join(f"{h[:12]} (node{acked[h]})" for h in lost[:10])
    )
    supply = 0
    for key in keys:
        account = callers[0].call("chain_account", {"address": key.address.hex()})
        supply += sum(account[f] for f in ("balance", "locked", "bonded", "unbonding"))
    minted = sum(a.balance for a in genesis.accounts) + sum(
        getattr(a, "bonded", 0) for a in genesis.accounts
    )
    assert supply == minted, f"supply {supply} != minted {minted}"
    return {"height": top, "committed_txs": len(committed), "lost": 0}
