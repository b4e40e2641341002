"""Test drivers for the market: ``LocalChain``, a real single-sequencer chain over the real
ledger (state transition, mempool, store), implementing ``ChainAPI`` for in-process nodes.

Only consensus is replaced: one sequencer builds a block every ``block_interval_ms`` while the
mempool holds transactions, and an empty block every ``idle_block_interval_ms`` so chain time
advances (a refund is valid only once a block's time is past the trade's deadline). Blocks use
wall-clock time, so trade deadlines and block times compare like they do on a live chain.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import trio

import ledger
from compute.market.abc import ChainAPI
from compute.market.exceptions import ChainRejected

if TYPE_CHECKING:
    from collections.abc import Callable

    from trio._core._run import TaskStatus

    from ledger import Account, Receipt, Trade, Transaction

block_transactions_max = 1000
block_bytes_max = 1024 * 1024


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class LocalChain(ChainAPI):
    """One ledger shared by every in-process node of a test (each node signs its own txs)."""

    def __init__(
        self,
        genesis: ledger.Genesis,
        store: ledger.StoreAPI,
        *,
        proposer: bytes,
        block_interval_ms: int = 50,
        idle_block_interval_ms: int = 200,
    ) -> None:
        self.genesis = genesis
        self.store = store
        self.state = store.load_state(genesis)
        self.mempool = ledger.Mempool(self.state)
        self._proposer = proposer
        self._block_s = block_interval_ms / 1000
        self._idle_s = idle_block_interval_ms / 1000
        self._new_block = trio.Event()
        self._pending = trio.Event()
        self.blocks = 0

    async def submit(self, tx_builder: Callable[[int], Transaction]) -> bytes:
        # No await between choosing the nonce and adding: two submits cannot race for one.
        probe = tx_builder(0)
        sender = probe.signer
        nonce = self.state.account(sender).nonce
        pending = {tx.nonce for tx in self.mempool if tx.signer == sender}
        while nonce in pending:
            nonce += 1
        tx = tx_builder(nonce)
        try:
            txh = self.mempool.add(tx)
        except ledger.MempoolRejected as exc:
            raise ChainRejected(str(exc)) from exc
        self._pending.set()
        return txh

    def trade(self, job_id: bytes) -> Trade | None:
        return self.store.trade(job_id)

    def receipt(self, job_id: bytes) -> Receipt | None:
        record = self.store.receipt(job_id)
        return None if record is None else record.receipt

    def account(self, address: bytes) -> Account:
        return self.state.account(address)

    def head(self) -> tuple[int, int]:
        return self.state.height, self.state.time_ms

    def params(self) -> ledger.ChainParams:
        return self.state.params

    async def wait_new_block(self) -> int:
        await self._new_block.wait()
        return self.state.height

    def tx_result(self, tx_hash: bytes) -> tuple[bool, bool, str] | None:
        record = self.store.transaction(tx_hash)
        if record is not None:
            return True, record.ok, record.error
        if tx_hash in self.mempool:
            return False, False, ""
        return None

    def commit_next(self) -> None:
        """Build, apply and commit one block from the mempool (what a single validator does)."""
        time_ms = max(self.state.time_ms + 1, wall_ms())
        txs = self.mempool.reap(block_transactions_max, block_bytes_max, time_ms=time_ms)
        block = ledger.build_block(
            self.state, self.state.height + 1, self.state.block_hash, time_ms, self._proposer, txs
        )
        new_state, results = ledger.apply_block(self.state, block)
        self.store.commit_block(block, None, new_state, results)
        self.state = new_state
        self.mempool.update(block, new_state)
        self.blocks += 1
        event, self._new_block = self._new_block, trio.Event()
        event.set()

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            with trio.move_on_after(self._idle_s):
                await self._pending.wait()
                # Gather what arrives within one block interval into the same block.
                await trio.sleep(self._block_s)
            self._pending = trio.Event()
            self.commit_next()
