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

    p = sub.add_parser("dev", help="a one-node development chain (creates its home if missing)")
    p.add_argument("--home", type=Path, default=Path("~/.gpumesh-dev"))
    p.add_argument("--simulate-gpus", default="A100-80GB:1", help="simulated GPUs of this node")
    p.add_argument("--rpc-port", type=int, default=7800)
    p.add_argument("--log-format", choices=["plain", "json"], default=None)
    p.add_argument("--log-level", default=None)

    p = sub.add_parser("rpc", help="call any JSON-RPC method and print the result")
    _home_arg(p)
    p.add_argument("method")
    p.add_argument("params", nargs="?", default=None, help="JSON array or object")

    p = sub.add_parser("gpus", help="this node's GPUs, slots and sandbox")
    _home_arg(p)
    _json_arg(p)

    p = sub.add_parser("offers", help="live offers from every provider (the market directory)")
    _home_arg(p)
    _json_arg(p)
    p.add_argument("--gpus", type=int, dest="gpu_count", default=None, help="min GPU count")
    p.add_argument("--min-vram", default=None, help="per-GPU VRAM, e.g. 24GB")
    p.add_argument("--model", default=None)
    p.add_argument("--max-price", type=int, default=None, help="max price per GPU-second")
    p.add_argument("--tag", action="append", dest="tags", default=None)

    p = sub.add_parser("chain", help="read the ledger: head, block, tx, account")
    csub = p.add_subparsers(dest="chain_command", required=True, metavar="WHAT")
    c = csub.add_parser("head", help="the last committed block")
    _home_arg(c)
    _json_arg(c)
    c = csub.add_parser("block", help="a block by height or hash")
    _home_arg(c)
    _json_arg(c)
    c.add_argument("id", help="height or block hash")
    c = csub.add_parser("tx", help="a transaction by hash")
    _home_arg(c)
    _json_arg(c)
    c.add_argument("hash")
    c = csub.add_parser("account", help="an account (default: this node's)")
    _home_arg(c)
    _json_arg(c)
    c.add_argument("address", nargs="?", default=None)
    c = csub.add_parser("status", help="consensus status")
    _home_arg(c)
    _json_arg(c)

    p = sub.add_parser("send", help="transfer AMOUNT from this node's account to TO")
    _home_arg(p)
    _json_arg(p)
    p.add_argument("to", help="recipient address (hex)")
    p.add_argument("amount", type=int)
    p.add_argument("--fee", type=int, default=0)
    p.add_argument("--wait", action="store_true", help="wait until the transfer is committed")

    p = sub.add_parser("job", help="submit and follow compute jobs")
    jsub = p.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    j = jsub.add_parser("submit", help="submit a job: gpumesh job submit [options] -- CMD ...")
    _home_arg(j)
    _json_arg(j)
    j.add_argument("--gpus", type=int, default=0, help="GPUs needed (0: a CPU-only job)")
    j.add_argument("--min-vram", default=None, help="per-GPU VRAM, e.g. 24GB")
    j.add_argument("--model", default="", help="GPU model, e.g. A100-80GB")
    j.add_argument("--cuda", default="", help="minimum CUDA version, e.g. 12.1")
    j.add_argument(
        "--max-price", type=int, default=1000, help="max price per GPU-second (default 1000)"
    )
    j.add_argument("--max-time", default="60s", help="wall-time limit, e.g. 90s, 10m")
    j.add_argument("--deadline", default=None, help="settle within, e.g. 10m (default 1h)")
    j.add_argument("--bid-window", default=None, help="how long to collect bids, e.g. 500ms")
    j.add_argument(
        "--strategy",
        default="cheapest",
        choices=["cheapest", "soonest", "least-loaded", "reputation"],
    )
    j.add_argument("--input", action="append", default=[], metavar="FILE", help="input file")
    j.add_argument("--output-dir", type=Path, default=None, help="write outputs here")
    j.add_argument("--wait", action="store_true", help="follow the job until it ends")
    j.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the command")
    for name, text in (
        ("status", "a job's state, provider, price, cost and receipt"),
        ("result", "a finished job's outputs, stdout, stderr and receipt"),
        ("logs", "a job's stdout and stderr so far"),
        ("cancel", "cancel a job (refunds the escrow, kills the job)"),
    ):
        j = jsub.add_parser(name, help=text)
        _home_arg(j)
        _json_arg(j)
        j.add_argument("job_id")
        if name == "result":
            j.add_argument("--output-dir", type=Path, default=None)
    j = jsub.add_parser("list", help="jobs on this node")
    _home_arg(j)
    _json_arg(j)
    j.add_argument("--role", choices=["requester", "provider", "all"], default="all")

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
    except BrokenPipeError:  # `gpumesh ... | head` closed the pipe: not an error
        sys.stderr.close()
        return 0


def _dispatch(args: argparse.Namespace) -> int | None:
    command: str = args.command
    if command == "init":
        return cmd_init(args)
    if command == "run":
        return cmd_run(args)
    if command == "testnet":
        return cmd_testnet(args)
    if command == "dev":
        return cmd_dev(args)
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
    if command == "gpus":
        return cmd_gpus(args)
    if command == "offers":
        return cmd_offers(args)
    if command == "chain":
        return cmd_chain(args)
    if command == "send":
        return cmd_send(args)
    if command == "job":
        from node._jobs_cli import cmd_job

        return cmd_job(args, _call, _emit)
    raise AssertionError(f"unhandled command {command}")


def _emit(args: argparse.Namespace, document: Any, text: str) -> int:
    print(json.dumps(document, indent=2) if args.json else text)
    return 0


def parse_size(text: str) -> int:
    """``24GB`` / ``24G`` / ``512MiB`` / plain bytes -> bytes (GB taken as GiB, as GPUs are)."""
    units = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    number = t.rstrip("KMGT")
    unit = t[len(number) :]
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise NodeError(f"cannot read size {text!r} (try 24GB)") from None


def _gib(n: int) -> str:
    return f"{n / 2**30:.0f} GB"


def cmd_gpus(args: argparse.Namespace) -> int:
    res = _call(args.home, "compute_resources")
    inv = res["inventory"]
    rows = [
        (
            g["index"],
            g["model"],
            _gib(g["vram_total_bytes"]),
            g["compute_capability"],
            g["cuda_version"],
            g["uuid"],
        )
        for g in inv["gpus"]
    ]
    text = render_table(["#", "MODEL", "VRAM", "CC", "CUDA", "UUID"], rows)
    text += f"\nsource: {inv['source']}, {inv['cpu_cores']} CPU cores, sandbox: "
    text += f"{res['sandbox'].get('sandbox', '?')}"
    if not inv["gpus"]:
        text = f"no GPUs (a CPU-only node): {inv.get('nvml_error') or inv['source']}\n" + text
    return _emit(args, res, text)


def cmd_offers(args: argparse.Namespace) -> int:
    query: dict[str, Any] = {}
    if args.gpu_count is not None:
        query["gpu_count"] = args.gpu_count
    if args.min_vram is not None:
        query["min_vram_bytes"] = parse_size(args.min_vram)
    if args.model is not None:
        query["model"] = args.model
    if args.max_price is not None:
        query["max_price"] = args.max_price
    if args.tags:
        query["tags"] = args.tags
    offers = _call(args.home, "market_offers", query)
    rows = []
    for o in offers:
        models: dict[str, int] = {}
        for g in o["gpus"]:
            models[g["model"]] = models.get(g["model"], 0) + 1
        gpus = ", ".join(f"{m} x{n}" for m, n in models.items()) or "CPU only"
        prices = ", ".join(f"{m}={p}" for m, p in o["prices"].items())
        free = f"{o['free_gpus']} GPU" if o["gpus"] else f"{o['free_cpu_slots']} CPU"
        rows.append((short(o["provider"], 8), gpus, free, prices, o["sandbox"]))
    text = render_table(["PROVIDER", "GPUS", "FREE", "PRICE/s", "SANDBOX"], rows)
    return _emit(args, offers, text + f"\n{len(offers)} offers")


def cmd_chain(args: argparse.Namespace) -> int:
    what: str = args.chain_command
    if what == "head":
        head = _call(args.home, "chain_head")
        return _emit(args, head, render_pairs(list(head.items())))
    if what == "status":
        status = _call(args.home, "consensus_status")
        pairs = [
            (k, status[k])
            for k in (
                "height",
                "round",
                "step",
                "last_committed_height",
                "is_validator",
                "catching_up",
            )
        ]
        pairs.append(("validators", len(status["validators"])))
        return _emit(args, status, render_pairs(pairs))
    if what == "block":
        params = {"height": int(args.id)} if args.id.isdigit() else {"hash": args.id}
        block = _call(args.home, "chain_block", params)
        pairs = [(k, v) for k, v in block.items() if k not in ("tx_hashes", "commit")]
        pairs += [("tx", h) for h in block["tx_hashes"]]
        return _emit(args, block, render_pairs(pairs))
    if what == "tx":
        tx = _call(args.home, "chain_tx", {"hash": args.hash})
        return _emit(args, tx, json.dumps(tx, indent=2))
    if what == "account":
        address = args.address or _call(args.home, "node_info")["address"]
        account = _call(args.home, "chain_account", {"address": address})
        return _emit(args, account, render_pairs(list(account.items())))
    raise AssertionError(f"unhandled chain command {what}")


def cmd_send(args: argparse.Namespace) -> int:
    import ledger
    from node._json import hex_bytes

    try:
        recipient = ledger.Address(hex_bytes(args.to, "TO", 32))
    except ValueError as exc:
        raise NodeError(str(exc)) from None
    home = Home(args.home)
    key = home.load_key()
    info = _call(args.home, "node_info")
    account = _call(args.home, "chain_account", {"address": key.address.hex()})
    tx = ledger.sign_object(
        ledger.Transfer(
            nonce=account["next_nonce"], fee=args.fee, recipient=recipient, amount=args.amount
        ),
        key,
        info["chain_id"],
    )
    sent = _call(args.home, "chain_sendTx", {"tx": ledger.encode(tx).hex()})
    if args.wait:
        deadline = time.monotonic() + 60
        while True:
            try:
                sent = _call(args.home, "chain_tx", {"hash": sent["tx_hash"]})
                break
            except NodeError as exc:
                if "pending" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    return _emit(args, sent, json.dumps(sent, indent=2))


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
