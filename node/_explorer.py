"""The explorer: indexes committed blocks by account, and answers paged queries over them.

The ledger store keys blocks by height and transactions by hash; an explorer also needs "every
transaction of this account", "every settled trade of this provider" and running totals of
what an account earned and spent. ``ExplorerIndex`` keeps those in its own LevelDB under
``data/explorer`` (so it can be deleted and rebuilt at will), fed by
``ChainService.subscribe_commits()``; at start it catches up from the blocks in the store.
Every query is paged: at most ``page_items_max`` items, newest first, with an opaque cursor.

Keys (all integers big-endian):
- ``h``                                   -> the last indexed height (8 bytes)
- ``t`` address(32) height(8) index(4)    -> tx hash: transactions touching the account
- ``p`` provider(32) height(8) index(4)   -> job id: trades closed (settled, cancelled,
  refunded) with this provider; ``q`` requester(32) ... the same by requester
- ``s`` address(32)                       -> JSON totals (earned, spent, fees, counts)
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import plyvel
import trio
import trio.lowlevel

from ledger import tx_hash
from node._json import hex_bytes, to_json
from rpc import INVALID_PARAMS, Param, Result, RpcError

if TYPE_CHECKING:
    from pathlib import Path

    from trio_typing import TaskStatus

    from ledger import Block, Transaction, TxResult
    from node._chain import ChainService
    from rpc import MethodRegistry

log = logging.getLogger("node.explorer")

page_items_max: Final = 100
"""The most items one explorer query returns."""
page_items_default: Final = 25
catch_up_blocks_per_batch: Final = 256
"""Blocks indexed per LevelDB batch (and between checkpoints) while catching up."""
_HEIGHT_KEY: Final = b"h"
_TOTALS: Final = ("earned", "spent", "fees", "transactions", "jobs_provided", "jobs_requested")
_CLOSING_KINDS: Final = frozenset({"receipt", "cancel", "refund"})


_Bump = Callable[[bytes, str, int], None]
"""Adds to one of an account's running totals."""


def _pos(height: int, index: int) -> bytes:
    return struct.pack(">QI", height, index)


class ExplorerIndex:
    """Account, provider and requester indexes over the committed chain."""

    def __init__(self, chain: ChainService, path: Path) -> None:
        self.chain = chain
        self.path = path
        self._db: plyvel.DB | None = None
        self.indexed_height = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._db = plyvel.DB(str(self.path), create_if_missing=True)
        try:
            raw = self._db.get(_HEIGHT_KEY)
            self.indexed_height = struct.unpack(">Q", raw)[0] if raw else 0
            commits = self.chain.subscribe_commits()
            async with commits:
                await self._catch_up()
                task_status.started()
                async for event in commits:
                    if event.height <= self.indexed_height:
                        continue
                    if event.height > self.indexed_height + 1:
                        # We fell behind the channel (it drops): read the gap from the store.
                        await self._catch_up()
                        continue
                    self._index_blocks([(event.block, event.tx_results)])
        finally:
            self._db.close()
            self._db = None

    async def _catch_up(self) -> None:
        while True:
            head, _ = self.chain.head()
            if self.indexed_height >= head:
                return
            stop = min(head, self.indexed_height + catch_up_blocks_per_batch)
            blocks: list[tuple[Block, tuple[TxResult, ...] | None]] = []
            for height in range(self.indexed_height + 1, stop + 1):
                block = self.chain.block(height)
                if block is None:
                    return
                blocks.append((block, None))
            self._index_blocks(blocks)
            await trio.lowlevel.checkpoint()

    # -- indexing --------------------------------------------------------------------------

    def _index_blocks(self, blocks: list[tuple[Block, tuple[TxResult, ...] | None]]) -> None:
        db = self._db
        assert db is not None, "the explorer index is not running"
        totals: dict[bytes, dict[str, int]] = {}

        def bump(address: bytes, key: str, amount: int) -> None:
            if address not in totals:
                raw = db.get(b"s" + address)
                totals[address] = {**dict.fromkeys(_TOTALS, 0), **(json.loads(raw) if raw else {})}
            totals[address][key] += amount

        with db.write_batch(transaction=True) as batch:
            for block, results in blocks:
                ok_by_hash = {r.tx_hash: r.ok for r in results} if results is not None else {}
                for index, tx in enumerate(block.transactions):
                    digest = tx_hash(tx)
                    ok = ok_by_hash.get(digest)
                    if ok is None:
                        status = self.chain.tx_status(digest)
                        ok = bool(status.ok)
                    where = _pos(block.height, index)
                    for address in self._accounts_of(tx, ok, bump):
                        batch.put(b"t" + address + where, digest)
                        bump(address, "transactions", 1)
                    if ok and str(to_json(tx.kind)) in _CLOSING_KINDS:
                        job_id = getattr(tx, "job_id", b"")
                        trade = self.chain.trade(job_id) if job_id else None
                        if trade is not None:
                            batch.put(b"p" + trade.terms.provider + where, job_id)
                            batch.put(b"q" + trade.terms.requester + where, job_id)
                            bump(trade.terms.provider, "jobs_provided", 1)
                            bump(trade.terms.requester, "jobs_requested", 1)
                            if trade.paid:
                                bump(trade.terms.provider, "earned", trade.paid)
                                bump(trade.terms.requester, "spent", trade.paid)
                self.indexed_height = block.height
            for address, values in totals.items():
                batch.put(b"s" + address, json.dumps(values).encode())
            batch.put(_HEIGHT_KEY, struct.pack(">Q", self.indexed_height))

    def _accounts_of(self, tx: Transaction, ok: bool, bump: _Bump) -> set[bytes]:
        """The accounts a transaction touches; books its transfer and fee."""
        signer: bytes = tx.signer
        accounts = {signer}
        fee = int(getattr(tx, "fee", 0))
        if fee:
            bump(signer, "fees", fee)
        recipient = getattr(tx, "recipient", None)
        if isinstance(recipient, bytes):
            accounts.add(recipient)
            amount = int(getattr(tx, "amount", 0))
            if ok and amount:
                bump(signer, "spent", amount)
                bump(recipient, "earned", amount)
        terms = getattr(tx, "terms", None)
        if terms is not None:
            accounts.update((terms.requester, terms.provider))
        job_id = getattr(tx, "job_id", None)
        if isinstance(job_id, bytes):
            trade = self.chain.trade(job_id)
            if trade is not None:
                accounts.update((trade.terms.requester, trade.terms.provider))
        return accounts

    # -- queries ---------------------------------------------------------------------------

    def _page(
        self, prefix: bytes, cursor: str | None, limit: int
    ) -> tuple[list[tuple[bytes, bytes]], str | None]:
        db = self._db
        if db is None:
            raise RpcError(-32011, "the explorer index is starting")
        try:
            stop = prefix + hex_bytes(cursor, "cursor", 12) if cursor else None
        except ValueError as exc:
            raise RpcError(INVALID_PARAMS, str(exc)) from None
        items: list[tuple[bytes, bytes]] = []
        iterator = (
            db.iterator(prefix=prefix, reverse=True)
            if stop is None
            else db.iterator(start=prefix, stop=stop, reverse=True)
        )
        with iterator as it:
            for key, value in it:
                items.append((key[len(prefix) :], value))
                if len(items) > limit:
                    break
        more = len(items) > limit
        items = items[:limit]
        return items, (items[-1][0].hex() if more and items else None)

    def account_transactions(
        self, address: bytes, cursor: str | None, limit: int
    ) -> dict[str, Any]:
        rows, next_cursor = self._page(b"t" + address, cursor, limit)
        items = []
        for where, digest in rows:
            height, index = struct.unpack(">QI", where)
            status = self.chain.tx_status(digest)
            tx = to_json(status.tx) if status.tx is not None else {}
            items.append(
                {
                    "hash": digest.hex(),
                    "height": height,
                    "index": index,
                    "ok": status.ok,
                    "error": status.error,
                    "kind": tx.get("kind"),
                    "signer": tx.get("signer"),
                    "tx": tx,
                }
            )
        return {"items": items, "next_cursor": next_cursor}

    def trades(self, prefix: bytes, cursor: str | None, limit: int) -> dict[str, Any]:
        rows, next_cursor = self._page(prefix, cursor, limit)
        items = []
        for where, job_id in rows:
            height, _ = struct.unpack(">QI", where)
            trade = self.chain.trade(job_id)
            receipt = self.chain.receipt(job_id)
            items.append(
                {
                    "job_id": job_id.hex(),
                    "closed_height": height,
                    "trade": to_json(trade) if trade is not None else None,
                    "receipt": to_json(receipt) if receipt is not None else None,
                }
            )
        return {"items": items, "next_cursor": next_cursor}

    def totals(self, address: bytes) -> dict[str, int]:
        db = self._db
        if db is None:
            raise RpcError(-32011, "the explorer index is starting")
        raw = db.get(b"s" + address)
        return {**dict.fromkeys(_TOTALS, 0), **(json.loads(raw) if raw else {})}


def _limit(limit: int | None) -> int:
    value = page_items_default if limit is None else limit
    if not 1 <= value <= page_items_max:
        raise RpcError(INVALID_PARAMS, f"limit must be 1-{page_items_max}")
    return value


def _address(value: str, name: str = "address") -> bytes:
    try:
        return hex_bytes(value, name, 32)
    except ValueError as exc:
        raise RpcError(INVALID_PARAMS, str(exc)) from None


def register_explorer_methods(
    registry: MethodRegistry, chain: ChainService, index: ExplorerIndex
) -> None:
    from node._chain_rpc import block_json

    paging = [
        Param("cursor", "string", False, "From a previous page's next_cursor."),
        Param("limit", "integer", False, f"Items per page, 1-{page_items_max} (default 25)."),
    ]

    async def chain_blocks(before: int | None = None, limit: int | None = None) -> dict[str, Any]:
        count = _limit(limit)
        head, _ = chain.head()
        top = head if before is None else min(head, before - 1)
        blocks = []
        for height in range(top, max(0, top - count), -1):
            block = chain.block(height)
            if block is not None:
                blocks.append(block_json(block, full=False))
        lowest = top - count + 1
        return {"items": blocks, "head": head, "next_before": lowest if lowest > 1 else None}

    async def chain_accountTransactions(
        address: str, cursor: str | None = None, limit: int | None = None
    ) -> dict[str, Any]:
        return index.account_transactions(_address(address), cursor, _limit(limit))

    async def chain_receipts(
        provider: str | None = None,
        requester: str | None = None,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        if (provider is None) == (requester is None):
            raise RpcError(INVALID_PARAMS, "give exactly one of provider or requester")
        prefix = (
            b"p" + _address(provider, "provider")
            if provider is not None
            else b"q" + _address(str(requester), "requester")
        )
        return index.trades(prefix, cursor, _limit(limit))

    async def chain_accountSummary(address: str) -> dict[str, Any]:
        raw = _address(address)
        account = to_json(chain.account(raw))
        return {
            "address": address.removeprefix("0x").lower(),
            "account": account,
            "totals": index.totals(raw),
            "indexed_height": index.indexed_height,
        }

    registry.register(
        "chain_blocks",
        chain_blocks,
        description="Committed block headers, newest first: a page below `before` (default "
        "the head). Follow next_before for the next page.",
        params=[
            Param("before", "integer", False, "Only blocks below this height."),
            paging[1],
        ],
        result=Result("object", "{items: [block header], head, next_before}"),
    )
    registry.register(
        "chain_accountTransactions",
        chain_accountTransactions,
        description="Committed transactions an account sent or took part in (recipient, trade "
        "party), newest first, paged.",
        params=[Param("address", "string", True, "Account address (hex)."), *paging],
        result=Result("object", "{items: [{hash, height, index, ok, kind, tx}], next_cursor}"),
    )
    registry.register(
        "chain_receipts",
        chain_receipts,
        description="Closed trades (settled by a receipt, cancelled or refunded) of one "
        "provider or one requester, newest first, paged.",
        params=[
            Param("provider", "string", False, "Provider address (hex)."),
            Param("requester", "string", False, "Requester address (hex)."),
            *paging,
        ],
        result=Result("object", "{items: [{job_id, closed_height, trade, receipt}], next_cursor}"),
    )
    registry.register(
        "chain_accountSummary",
        chain_accountSummary,
        description="An account's state and its running totals since genesis: earned (jobs "
        "and transfers in), spent (jobs and transfers out), fees, transactions, jobs.",
        params=[Param("address", "string", True, "Account address (hex).")],
        result=Result("object", "{address, account, totals, indexed_height}"),
    )
