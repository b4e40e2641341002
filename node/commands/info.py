"""`gpumesh status`, `peers`, `gpus`, `offers` and `rpc`: what the node knows, read over RPC."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from node._tables import duration, render_pairs, render_table, short
from node.commands._common import add_command, call, emit, parse_size
from node.exceptions import NodeError

if TYPE_CHECKING:
    import argparse

    from node.commands._common import Subparsers


def register(sub: Subparsers) -> None:
    add_command(sub, "status", cmd_status, help="this node's identity and state")
    add_command(sub, "peers", cmd_peers, help="connected peers")
    p = add_command(sub, "rpc", cmd_rpc, help="call any JSON-RPC method and print the result")
    p.add_argument("method")
    p.add_argument("params", nargs="?", default=None, help="JSON array or object")
    add_command(sub, "gpus", cmd_gpus, help="this node's GPUs, slots and sandbox")
    p = add_command(
        sub, "offers", cmd_offers, help="live offers from every provider (the market directory)"
    )
    p.add_argument("--gpus", type=int, dest="gpu_count", default=None, help="min GPU count")
    p.add_argument("--min-vram", default=None, help="per-GPU VRAM, e.g. 24GB")
    p.add_argument("--model", default=None)
    p.add_argument("--max-price", type=int, default=None, help="max price per GPU-second")
    p.add_argument("--tag", action="append", dest="tags", default=None)


def cmd_rpc(args: argparse.Namespace) -> int:
    params = None
    if args.params is not None:
        try:
            params = json.loads(args.params)
        except json.JSONDecodeError as exc:
            raise NodeError(f"params are not valid JSON: {exc}") from None
    # Always JSON: this is the raw call.
    print(json.dumps(call(args.home, args.method, params), indent=2))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    info = call(args.home, "node_info")
    info["peer_count"] = call(args.home, "net_peerCount")
    text = render_pairs(
        [
            ("peer id", info["peer_id"]),
            ("address", info["address"]),
            ("chain", info["chain_id"]),
            ("version", info["version"]),
            ("uptime", duration(info["uptime_s"])),
            ("peers", info["peer_count"]),
            ("listening", ", ".join(info["listen_addrs"])),
            ("compute", provider_text(info.get("compute") or {})),
        ]
    )
    return emit(args, info, text)


def provider_text(provider: dict[str, Any]) -> str:
    """Whether the node runs other people's jobs, in which sandbox, or why not."""
    if provider.get("providing"):
        sandbox = provider.get("sandbox")
        weak = " (weaker: no filesystem isolation)" if sandbox == "process" else ""
        return f"providing, sandbox {sandbox}{weak}"
    if provider.get("refused"):
        return f"not providing: {provider['refused']}"
    return "not providing"


def cmd_peers(args: argparse.Namespace) -> int:
    peers = call(args.home, "net_peers")
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
    text = render_table(["PEER", "FOUND BY", "CONNECTED", "ADDRESSES"], rows)
    return emit(args, peers, f"{text}\n{len(peers)} peers")


def _gib(n: int) -> str:
    return f"{n / 2**30:.0f} GB"


def cmd_gpus(args: argparse.Namespace) -> int:
    res = call(args.home, "compute_resources")
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
    text += f"\nsource: {inv['source']}, {inv['cpu_cores']} CPU cores; "
    text += provider_text(res.get("provider") or {})
    if not inv["gpus"]:
        text = f"no GPUs (a CPU-only node): {inv.get('nvml_error') or inv['source']}\n" + text
    return emit(args, res, text)


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
    offers = call(args.home, "market_offers", query)
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
    return emit(args, offers, text + f"\n{len(offers)} offers")
