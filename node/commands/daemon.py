"""`gpumesh init`, `run` and `dev`: create a home and run the daemon in the foreground."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from node._config import NodeConfig, NodeSection
from node._home import Home
from node.commands._common import add_command
from node.exceptions import NodeError

if TYPE_CHECKING:
    import argparse

    from node.commands._common import Subparsers


def register(sub: Subparsers) -> None:
    p = add_command(sub, "init", cmd_init, help="create a node home: key, config.toml, genesis")
    p.add_argument("--chain-id", default="gpumesh-dev")
    p.add_argument("--listen-port", type=int, default=7700)
    p.add_argument("--rpc-port", type=int, default=7800)
    p.add_argument("--bootstrap", action="append", default=[], help="multiaddr with /p2p/<id>")
    p.add_argument("--no-mdns", action="store_true")
    p.add_argument("--simulate-gpus", default="", help='e.g. "A100-80GB:2,RTX4090:1"')

    p = add_command(sub, "run", cmd_run, help="run the node daemon in the foreground", json=False)
    p.add_argument("--log-format", choices=["plain", "json"], default=None)
    p.add_argument("--log-level", default=None, help='e.g. "info,p2p=debug"')

    p = add_command(
        sub,
        "dev",
        cmd_dev,
        help="a one-node development chain (creates its home if missing)",
        home=False,
        json=False,
    )
    p.add_argument("--home", type=Path, default=Path("~/.gpumesh-dev"))
    p.add_argument("--simulate-gpus", default="A100-80GB:1", help="simulated GPUs of this node")
    p.add_argument("--rpc-port", type=int, default=7800)
    p.add_argument("--log-format", choices=["plain", "json"], default=None)
    p.add_argument("--log-level", default=None)


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
    if args.json:
        print(json.dumps({"home": str(home.root), "address": key.address.hex()}, indent=2))
        return 0
    print(f"initialised {home.root}")
    print(f"address  {key.address.hex()}")
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from node._config import ComputeSection, P2PSection, RpcSection
    from node._testnet import genesis_document

    home = Home(args.home)
    if not home.key_path.exists():
        config = NodeConfig(
            node=NodeSection(chain_id="gpumesh-dev"),
            p2p=P2PSection(listen_port=0, mdns=False, dht=False),
            rpc=RpcSection(port=args.rpc_port),
            compute=ComputeSection(simulate_gpus=args.simulate_gpus),
        )
        key = home.init(config)
        home.genesis_path.write_text(json.dumps(genesis_document("gpumesh-dev", [key], 1)))
        print(f"created a one-validator dev chain in {home.root}", file=sys.stderr)
    args.home = home.root
    return cmd_run(args)


def cmd_run(args: argparse.Namespace) -> int:
    import trio

    from node._daemon import serve
    from node._logging import setup_logging

    home = Home(args.home)
    config = home.load_config()
    key = home.load_key()
    levels = args.log_level or config.node.log_levels
    try:
        setup_logging(args.log_format or config.node.log_format, levels)
    except ValueError as exc:
        where = "--log-level" if args.log_level else f"[node] log_levels in {home.config_path}"
        raise NodeError(f"{where}: {exc}") from None
    with home.lock():
        trio.run(serve, home, config, key)
    return 0
