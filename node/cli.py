"""The `gpumesh` command line: set up, run and talk to a node, and run local testnets."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from node._config import NodeConfig, NodeSection
from node._home import DEFAULT_HOME, Home
from node._tables import duration, render_pairs, render_table, short
from node.exceptions import NodeError


def _home_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--home",
        type=Path,
        default=Path(os.environ.get("GPUMESH_HOME", str(DEFAULT_HOME))),
        help="node home directory (default: $GPUMESH_HOME or ~/.gpumesh)",
    )


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as one JSON document")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpumesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create a node home: key, config.toml, genesis")
    _home_arg(p)
    p.add_argument("--chain-id", default="gpumesh-dev")
    p.add_argument("--listen-port", type=int, default=7700)
    p.add_argument("--rpc-port", type=int, default=7800)
    p.add_argument("--bootstrap", action="append", default=[], help="multiaddr with /p2p/<id>")
    p.add_argument("--no-mdns", action="store_true")
    p.add_argument("--simulate-gpus", default="", help='e.g. "A100-80GB:2,RTX4090:1"')

    p = sub.add_parser("run", help="run the node daemon in the foreground")
    _home_arg(p)
    p.add_argument("--log-format", choices=["plain", "json"], default=None)
    p.add_argument("--log-level", default=None, help='e.g. "info,p2p=debug"')

    for name, text in (("status", "this node's identity and state"), ("peers", "connected peers")):
        p = sub.add_parser(name, help=text)
        _home_arg(p)
        _json_arg(p)

    p = sub.add_parser("rpc", help="call any JSON-RPC method and print the result")
    _home_arg(p)
    p.add_argument("method")
    p.add_argument("params", nargs="?", default=None, help="JSON array or object")

    p = sub.add_parser("testnet", help="local multi-node testnets")
    tsub = p.add_subparsers(dest="testnet_command", required=True, metavar="ACTION")
    t = tsub.add_parser("init", help="write N node homes into DIR")
    t.add_argument("--nodes", type=int, default=4)
    t.add_argument("--dir", type=Path, required=True)
    t.add_argument("--chain-id", default="gpumesh-testnet")
    t.add_argument("--validators", type=int, default=None, help="default: min(nodes, 4)")
    t.add_argument("--providers", type=int, default=0, help="first K nodes get simulated GPUs")
    t.add_argument("--simulate-gpus", default="", help='e.g. "A100-80GB:2,RTX4090:1"')
    t.add_argument("--base-port", type=int, default=26600)
    t.add_argument("--mdns", action="store_true", help="also discover by mDNS")
    for name, text in (
        ("up", "start every node in the background"),
        ("down", "stop every node"),
        ("status", "each node's peer count and state"),
    ):
        t = tsub.add_parser(name, help=text)
        t.add_argument("--dir", type=Path, required=True)
        if name == "status":
            _json_arg(t)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(_dispatch(args) or 0)
    except NodeError as exc:
        print(f"gpumesh: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int | None:
    command: str = args.command
    if command == "init":
        return cmd_init(args)
    if command == "run":
        return cmd_run(args)
    if command == "testnet":
        return cmd_testnet(args)
    return cmd_client(args)


def cmd_init(args: argparse.Namespace) -> int:
    from node._config import ComputeSection, P2PSection, RpcSection
    from node._testnet import genesis_document

    config = NodeConfig(
        node=NodeSection(chain_id=args.chain_id),
        p2p=P2PSection(
            listen_port=args.listen_port, bootstrap=tuple(args.bootstrap), mdns=not args.no_mdns
        ),
        rpc=RpcSection(port=args.rpc_port),
        compute=ComputeSection(simulate_gpus=args.simulate_gpus),
    )
    home = Home(args.home)
    key = home.init(config)
    if not home.genesis_path.exists():
        # A one-node chain of its own; replace genesis.json to join an existing network.
        home.genesis_path.write_text(
            json.dumps(genesis_document(args.chain_id, [key], 1), indent=2)
        )
    print(f"initialised {home.root}")
    print(f"address  {key.address.hex()}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import trio

    from node._daemon import serve
    from node._logging import setup_logging

    home = Home(args.home)
    config = home.load_config()
    key = home.load_key()
    setup_logging(
        args.log_format or config.node.log_format,
        args.log_level or config.node.log_levels,
    )
    with home.lock():
        trio.run(serve, home, config, key)
    return 0


def _client(home: Path) -> Any:
    from rpc import RpcClient

    try:
        return RpcClient.from_home(Home(home).root)
    except FileNotFoundError:
        raise NodeError(f"no running node at {home} (start it with `gpumesh run`)") from None


def _call(home: Path, method: str, params: Any = None) -> Any:
    from rpc import RpcCallError

    client = _client(home)
    try:
        return client.call(method, params)
    except RpcCallError as exc:
        raise NodeError(f"{method}: {exc}") from None
    except OSError as exc:
        raise NodeError(f"cannot reach the node at {home}: {exc}") from None


def cmd_client(args: argparse.Namespace) -> int:
    command: str = args.command
    if command == "rpc":
        params = None
        if args.params is not None:
            try:
                params = json.loads(args.params)
            except json.JSONDecodeError as exc:
                raise NodeError(f"params are not valid JSON: {exc}") from None
        print(json.dumps(_call(args.home, args.method, params), indent=2))
        return 0
    if command == "status":
        info = _call(args.home, "node_info")
        info["peer_count"] = _call(args.home, "net_peerCount")
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        print(
            render_pairs(
                [
                    ("peer id", info["peer_id"]),
                    ("address", info["address"]),
                    ("chain", info["chain_id"]),
                    ("version", info["version"]),
                    ("uptime", duration(info["uptime_s"])),
                    ("peers", info["peer_count"]),
                    ("listening", ", ".join(info["listen_addrs"])),
                ]
            )
        )
        return 0
    if command == "peers":
        peers = _call(args.home, "net_peers")
        if args.json:
            print(json.dumps(peers, indent=2))
            return 0
        now_ms = time.time() * 1000
        rows = [
            (
                short(p["peer_id"]),
                p["source"],
                duration((now_ms - p["connected_since_ms"]) / 1000),
                ", ".join(p["addrs"][:2]),
            )
            for p in peers
        ]
        print(render_table(["PEER", "FOUND BY", "CONNECTED", "ADDRESSES"], rows))
        print(f"{len(peers)} peers")
        return 0
    raise AssertionError(f"unhandled command {command}")


def cmd_testnet(args: argparse.Namespace) -> int:
    from node import _testnet

    action: str = args.testnet_command
    if action == "init":
        layout = _testnet.init_testnet(
            args.dir,
            args.nodes,
            chain_id=args.chain_id,
            validators=args.validators,
            providers=args.providers,
            simulate_gpus=args.simulate_gpus,
            base_port=args.base_port,
            mdns=args.mdns,
        )
        print(f"wrote {len(layout.nodes)} node homes to {args.dir} (chain {layout.chain_id})")
        return 0
    if action == "up":
        layout = _testnet.up(args.dir)
        print(f"started {len(layout.nodes)} nodes; logs in {args.dir}/node*/node.log")
        return 0
    if action == "down":
        pids = _testnet.down(args.dir)
        print(f"stopped {len(pids)} nodes")
        return 0
    if action == "status":
        rows = _testnet.status(args.dir)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(
            render_table(
                ["NODE", "PID", "PEER ID", "PEERS", "STATE"],
                [
                    (r["node"], r["pid"], short(r["peer_id"], 8), r["peers"], r["state"])
                    for r in rows
                ],
            )
        )
        return 0
    raise AssertionError(f"unhandled testnet action {action}")
