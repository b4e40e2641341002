"""`gpumesh testnet ...`: write, start, stop and inspect local multi-node testnets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from node._tables import render_table, short
from node.commands._common import add_command

if TYPE_CHECKING:
    import argparse

    from node.commands._common import Subparsers


def register(sub: Subparsers) -> None:
    p = sub.add_parser("testnet", help="local multi-node testnets")
    tsub = p.add_subparsers(dest="testnet_command", required=True, metavar="ACTION")
    t = add_command(
        tsub, "init", cmd_init, help="write N node homes into DIR", home=False, json=False
    )
    t.add_argument("--nodes", type=int, default=4)
    t.add_argument("--chain-id", default="gpumesh-testnet")
    t.add_argument("--validators", type=int, default=None, help="default: min(nodes, 4)")
    t.add_argument("--providers", type=int, default=0, help="first K nodes get simulated GPUs")
    t.add_argument("--simulate-gpus", default="", help='e.g. "A100-80GB:2,RTX4090:1"')
    t.add_argument("--base-port", type=int, default=26600)
    t.add_argument("--mdns", action="store_true", help="also discover by mDNS")
    add_command(
        tsub, "up", cmd_up, help="start every node in the background", home=False, json=False
    )
    add_command(tsub, "down", cmd_down, help="stop every node", home=False, json=False)
    add_command(tsub, "status", cmd_status, help="each node's peer count and state", home=False)
    for action in tsub.choices.values():
        action.add_argument("--dir", type=Path, required=True)


def cmd_init(args: argparse.Namespace) -> int:
    from node import _testnet

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


def cmd_up(args: argparse.Namespace) -> int:
    from node import _testnet

    layout = _testnet.up(args.dir)
    print(f"started {len(layout.nodes)} nodes; logs in {args.dir}/node*/node.log")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from node import _testnet

    pids = _testnet.down(args.dir)
    print(f"stopped {len(pids)} nodes")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from node import _testnet

    rows = _testnet.status(args.dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        render_table(
            ["NODE", "PID", "PEER ID", "PEERS", "STATE"],
            [(r["node"], r["pid"], short(r["peer_id"], 8), r["peers"], r["state"]) for r in rows],
        )
    )
    return 0
