"""Local testnets: N node homes in one directory, started as background processes.

``DIR/testnet.json`` records the layout (nodes, ports, chain id); each ``DIR/nodeI`` is an
ordinary node home, so every node is the same daemon an operator would run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ledger import ChainParams, SigningKey
from node._config import ComputeSection, NodeConfig, NodeSection, P2PSection, RpcSection
from node._home import Home, write_atomic
from node.exceptions import TestnetError

nodes_max = 128
bootstrap_peers_per_node = 3
genesis_balance = 10**12
genesis_bond = 10 * ChainParams.default().provider_bond_min
"""Every genesis account's bond (beside its balance): any node may provide from the start."""
start_timeout_s = 30.0
stop_timeout_s = 10.0


def peer_id_of(key: SigningKey) -> str:
    """The libp2p peer id of a node key (identity multihash of the protobuf public key)."""
    from p2p import peer_id_of

    return peer_id_of(key.address)


@dataclasses.dataclass(frozen=True)
class TestnetNode:
    index: int
    home: str
    address: str
    peer_id: str
    p2p_port: int
    rpc_port: int
    validator: bool
    provider_gpus: str


@dataclasses.dataclass(frozen=True)
class TestnetLayout:
    chain_id: str
    nodes: tuple[TestnetNode, ...]

    @classmethod
    def load(cls, directory: Path) -> TestnetLayout:
        path = directory / "testnet.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise TestnetError(f"no testnet at {directory} (run `gpumesh testnet init`)") from None
        return cls(data["chain_id"], tuple(TestnetNode(**n) for n in data["nodes"]))

    def write(self, directory: Path) -> None:
        data = {"chain_id": self.chain_id, "nodes": [dataclasses.asdict(n) for n in self.nodes]}
        write_atomic(directory / "testnet.json", json.dumps(data, indent=2) + "\n")


def bootstrap_indices(i: int) -> list[int]:
    """Who node ``i`` dials first: a few earlier nodes, so no single node is the hub and
    losing any one of them still leaves a path; the DHT finds everyone else."""
    if i == 0:
        return []
    picks = [0, i - 1, i // 2, (i * 7 + 3) % i]
    out: list[int] = []
    for p in picks:
        if p not in out:
            out.append(p)
    return out[:bootstrap_peers_per_node]


def init_testnet(
    directory: Path,
    nodes: int,
    *,
    chain_id: str = "gpumesh-testnet",
    validators: int | None = None,
    providers: int = 0,
    simulate_gpus: str = "",
    base_port: int = 26600,
    mdns: bool = False,
    host: str = "127.0.0.1",
    hosts: list[str] | None = None,
    bootstrap: bool = True,
) -> TestnetLayout:
    """Write ``nodes`` homes. ``hosts`` gives each node its own IP (one host per network
    namespace); ``bootstrap=False`` leaves discovery to mDNS and the DHT alone."""
    if not 1 <= nodes <= nodes_max:
        raise TestnetError(f"--nodes must be 1-{nodes_max}")
    validators = min(nodes, 4) if validators is None else validators
    if not 1 <= validators <= nodes:
        raise TestnetError("--validators must be between 1 and --nodes")
    if not 0 <= providers <= nodes:
        raise TestnetError("--providers must be between 0 and --nodes")
    if providers and not simulate_gpus:
        raise TestnetError("--providers needs --simulate-gpus (e.g. 'A100-80GB:2,RTX4090:1')")
    if (directory / "testnet.json").exists():
        raise TestnetError(f"{directory} already holds a testnet; pick another --dir")
    directory.mkdir(parents=True, exist_ok=True)
    keys = [SigningKey.generate() for _ in range(nodes)]
    peer_ids = [peer_id_of(k) for k in keys]
    entries: list[TestnetNode] = []
    if hosts is not None and len(hosts) != nodes:
        raise TestnetError("give one host address per node")
    ips = hosts or [host] * nodes
    for i, key in enumerate(keys):
        p2p_port, rpc_port = base_port + 2 * i, base_port + 2 * i + 1
        peers = bootstrap_indices(i) if bootstrap else []
        bootstrap_addrs = tuple(
            f"/ip4/{ips[j]}/tcp/{base_port + 2 * j}/p2p/{peer_ids[j]}" for j in peers
        )
        gpus = simulate_gpus if i < providers else ""
        config = NodeConfig(
            node=NodeSection(chain_id=chain_id),
            p2p=P2PSection(
                listen_host=ips[i], listen_port=p2p_port, bootstrap=bootstrap_addrs, mdns=mdns
            ),
            rpc=RpcSection(port=rpc_port),
            # With --providers K only the first K nodes sell compute; without it every node
            # offers what it has (its CPU on a machine with no GPU).
            compute=ComputeSection(simulate_gpus=gpus, provider=providers == 0 or i < providers),
        )
        home = Home(directory / f"node{i}")
        home.init(config, key)
        entries.append(
            TestnetNode(
                index=i,
                home=str(home.root),
                address=key.address.hex(),
                peer_id=peer_ids[i],
                p2p_port=p2p_port,
                rpc_port=rpc_port,
                validator=i < validators,
                provider_gpus=gpus,
            )
        )
    genesis = genesis_document(chain_id, keys, validators)
    for entry in entries:
        write_atomic(Home(entry.home).genesis_path, json.dumps(genesis, indent=2) + "\n")
    layout = TestnetLayout(chain_id, tuple(entries))
    layout.write(directory)
    return layout


def genesis_document(chain_id: str, keys: list[SigningKey], validators: int) -> dict[str, Any]:
    return {
        "chain_id": chain_id,
        "genesis_time_ms": int(time.time() * 1000),
        "accounts": [
            {"address": k.address.hex(), "balance": genesis_balance, "bonded": genesis_bond}
            for k in keys
        ],
        "validators": [{"address": k.address.hex(), "power": 10} for k in keys[:validators]],
        # The network's rules: a minimum fee, a provider bond, slashing (ledger.ChainParams).
        "params": dataclasses.asdict(ChainParams.default()),
    }


# -- processes --------------------------------------------------------------------------------


def read_pid(home: Home) -> int | None:
    """The pid of this home's daemon, if one is alive (and really is ours: pids get reused)."""
    try:
        pid = int(home.pid_path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    if str(home.root).encode() not in cmdline:
        return None
    return pid


_spawned: dict[int, subprocess.Popen[bytes]] = {}
"""Nodes this process started: kept so they are reaped, not garbage-collected while running."""


def start_node(home: Home, extra_args: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    if read_pid(home) is not None:
        raise TestnetError(f"a node is already running on {home.root}")
    log = home.log_path.open("ab")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "node", "run", "--home", str(home.root), *extra_args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the shell must not kill the testnet
        )
    finally:
        log.close()
    home.pid_path.write_text(f"{proc.pid}\n")
    _spawned[proc.pid] = proc
    return proc


def up(directory: Path, *, wait: bool = True) -> TestnetLayout:
    layout = TestnetLayout.load(directory)
    procs = [
        (Home(n.home), start_node(Home(n.home)))
        for n in layout.nodes
        if read_pid(Home(n.home)) is None
    ]
    if wait:
        try:
            wait_ready([h for h, _ in procs], [p for _, p in procs])
        except TestnetError:
            # A testnet that does not come up is taken down whole: no node is left running.
            down(directory)
            raise
    return layout


def wait_ready(homes: list[Home], procs: list[subprocess.Popen[bytes]]) -> None:
    from rpc import RpcCallError, RpcClient

    deadline = time.monotonic() + start_timeout_s
    pending = dict(zip([h.root for h in homes], zip(homes, procs, strict=True), strict=True))
    while pending and time.monotonic() < deadline:
        for root, (home, proc) in list(pending.items()):
            if proc.poll() is not None:
                tail = home.log_path.read_text(errors="replace")[-2000:]
                raise TestnetError(f"node at {root} exited with {proc.returncode}:\n{tail}")
            try:
                RpcClient.from_home(home.root, timeout_s=1.0).call("node_info")
            except (OSError, RpcCallError):
                continue
            del pending[root]
        if pending:
            time.sleep(0.1)
    if pending:
        raise TestnetError(
            f"nodes not ready after {start_timeout_s:.0f} s: {sorted(map(str, pending))}"
        )


def down(directory: Path) -> list[int]:
    """SIGTERM every node, wait for a clean exit, SIGKILL what is left; returns pids stopped."""
    layout = TestnetLayout.load(directory)
    pids = [pid for n in layout.nodes if (pid := read_pid(Home(n.home))) is not None]
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + stop_timeout_s
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if _alive(p)}
        if alive:
            time.sleep(0.05)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    for n in layout.nodes:
        Home(n.home).pid_path.unlink(missing_ok=True)
    return pids


def _alive(pid: int) -> bool:
    child = _spawned.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _spawned[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # Our children become zombies until reaped; a zombie has exited.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    if state == "Z":
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return True


def status(directory: Path) -> list[dict[str, Any]]:
    from rpc import RpcCallError, RpcClient

    layout = TestnetLayout.load(directory)
    rows: list[dict[str, Any]] = []
    for n in layout.nodes:
        home = Home(n.home)
        pid = read_pid(home)
        row: dict[str, Any] = {"node": f"node{n.index}", "pid": pid, "peer_id": n.peer_id}
        row["peers"] = None
        row["state"] = "stopped" if pid is None else "running"
        if pid is not None:
            try:
                row["peers"] = RpcClient.from_home(home.root, timeout_s=2.0).call("net_peerCount")
            except (OSError, RpcCallError) as exc:
                row["state"] = f"unreachable ({exc})"
        rows.append(row)
    return rows
