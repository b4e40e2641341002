"""`gpumesh chain ...` (read the ledger) and `gpumesh send` (a transfer from this node)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from node._home import Home
from node._tables import render_pairs
from node.commands._common import add_command, call, emit, open_subscription
from node.exceptions import NodeError

if TYPE_CHECKING:
    import argparse
    from pathlib import Path

    from node.commands._common import Subparsers

send_wait_max_s = 120.0
"""How long `send --wait` follows new blocks for its transfer before giving up."""
_STATUS_KEYS = ("height", "round", "step", "last_committed_height", "is_validator", "catching_up")


def register(sub: Subparsers) -> None:
    p = sub.add_parser("chain", help="read the ledger: head, block, tx, account")
    csub = p.add_subparsers(dest="chain_command", required=True, metavar="WHAT")
    add_command(csub, "head", cmd_head, help="the last committed block")
    c = add_command(csub, "block", cmd_block, help="a block by height or hash")
    c.add_argument("id", help="height or block hash")
    c = add_command(csub, "tx", cmd_tx, help="a transaction by hash")
    c.add_argument("hash")
    c = add_command(csub, "account", cmd_account, help="an account (default: this node's)")
    c.add_argument("address", nargs="?", default=None)
    add_command(csub, "status", cmd_status, help="consensus status")

    p = add_command(sub, "send", cmd_send, help="transfer AMOUNT from this node's account to TO")
    p.add_argument("to", help="recipient address (hex)")
    p.add_argument("amount", type=int)
    p.add_argument(
        "--fee",
        type=int,
        default=None,
        help="fee paid to the block's proposer (default: the chain's minimum, fee_min)",
    )
    p.add_argument("--wait", action="store_true", help="wait until the transfer is committed")


def cmd_head(args: argparse.Namespace) -> int:
    head = call(args.home, "chain_head")
    return emit(args, head, render_pairs(list(head.items())))


def cmd_status(args: argparse.Namespace) -> int:
    status = call(args.home, "consensus_status")
    pairs: list[tuple[str, Any]] = [(k, status[k]) for k in _STATUS_KEYS]
    pairs.append(("validators", len(status["validators"])))
    return emit(args, status, render_pairs(pairs))


def cmd_block(args: argparse.Namespace) -> int:
    params = {"height": int(args.id)} if args.id.isdigit() else {"hash": args.id}
    block = call(args.home, "chain_block", params)
    pairs = [(k, v) for k, v in block.items() if k not in ("tx_hashes", "commit")]
    pairs += [("tx", h) for h in block["tx_hashes"]]
    return emit(args, block, render_pairs(pairs))


def cmd_tx(args: argparse.Namespace) -> int:
    tx = call(args.home, "chain_tx", {"hash": args.hash})
    return emit(args, tx, json.dumps(tx, indent=2))


def cmd_account(args: argparse.Namespace) -> int:
    address = args.address or call(args.home, "node_info")["address"]
    account = call(args.home, "chain_account", {"address": address})
    return emit(args, account, render_pairs(list(account.items())))


def cmd_send(args: argparse.Namespace) -> int:
    import ledger
    from node._json import hex_bytes

    try:
        recipient = ledger.Address(hex_bytes(args.to, "TO", 32))
    except ValueError as exc:
        raise NodeError(str(exc)) from None
    key = Home(args.home).load_key()
    info = call(args.home, "node_info")
    account = call(args.home, "chain_account", {"address": key.address.hex()})
    fee = args.fee if args.fee is not None else int(call(args.home, "chain_params")["fee_min"])
    tx = ledger.sign_object(
        ledger.Transfer(
            nonce=account["next_nonce"], fee=fee, recipient=recipient, amount=args.amount
        ),
        key,
        info["chain_id"],
    )
    raw = ledger.encode(tx).hex()
    if not args.wait:
        sent = call(args.home, "chain_sendTx", {"tx": raw})
        return emit(args, sent, json.dumps(sent, indent=2))
    import trio

    committed = trio.run(send_and_wait, args.home, raw)
    return emit(args, committed, json.dumps(committed, indent=2))


async def send_and_wait(home: Path, raw_tx: str) -> dict[str, Any]:
    """Send a transaction and follow ``newHeads`` until a block carries it (or it is evicted).

    Subscribed before sending, so the block that commits it cannot go by unseen.
    """
    import trio

    with trio.move_on_after(send_wait_max_s):
        async with open_subscription(home, "newHeads") as heads:
            sent = await trio.to_thread.run_sync(call, home, "chain_sendTx", {"tx": raw_tx})
            tx_hash = sent["tx_hash"]
            while True:
                head = await heads.next()
                if tx_hash in head.get("tx_hashes", ()):
                    done: dict[str, Any] = await trio.to_thread.run_sync(
                        call, home, "chain_tx", {"hash": tx_hash}
                    )
                    return done
    raise NodeError(f"the transfer was not committed within {send_wait_max_s:.0f} s")
