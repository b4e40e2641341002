"""JSON-RPC methods of the chain: consensus_status and chain_* (read API and tx submission)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import ledger
from ledger import Block, DecodeError, MempoolRejected, Transaction, tx_hash
from node._json import hex_bytes, to_json
from rpc import INVALID_PARAMS, Param, Result, RpcError

if TYPE_CHECKING:
    from node._chain import ChainService
    from rpc import MethodRegistry

NOT_FOUND = -32004
TX_REJECTED = -32010
NOT_READY = -32011
tx_hex_chars_max = 2 * 256 * 1024


def block_json(block: Block, *, full: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "height": block.height,
        "hash": block.hash().hex(),
        "prev_hash": block.prev_hash.hex(),
        "time_ms": block.time_ms,
        "proposer": block.proposer.hex(),
        "tx_root": block.tx_root.hex(),
        "state_root": block.state_root.hex(),
        "tx_count": len(block.transactions),
    }
    if full:
        out["transactions"] = [tx_json(tx) for tx in block.transactions]
    else:
        out["tx_hashes"] = [tx_hash(tx).hex() for tx in block.transactions]
    return out


def tx_json(tx: Transaction) -> dict[str, Any]:
    body = to_json(tx)
    body["hash"] = tx_hash(tx).hex()
    return dict(body)


def hex_param(value: Any, name: str, length: int | None = 32) -> bytes:
    """A hex parameter, or the spec's invalid-params error naming it."""
    try:
        return hex_bytes(value, name, length)
    except ValueError as exc:
        raise RpcError(INVALID_PARAMS, str(exc)) from None


def register_chain_methods(registry: MethodRegistry, chain: ChainService) -> None:
    def ready() -> ChainService:
        if not chain.ready:
            raise RpcError(NOT_READY, "the chain service is starting")
        return chain

    async def consensus_status() -> dict[str, Any]:
        if chain.driver is None or not chain.ready:
            raise RpcError(NOT_READY, "the chain service is starting")
        status = to_json(chain.driver.status())
        status["mempool"] = to_json(chain.mempool_statistics())
        status["driver"] = to_json(chain.driver.stats)
        return dict(status)

    async def chain_head() -> dict[str, Any]:
        head = ready().head_record()
        if head is None:
            genesis = chain.genesis
            return {"height": 0, "hash": genesis.hash().hex(), "time_ms": genesis.genesis_time_ms}
        return {
            "height": head.height,
            "hash": head.block_hash.hex(),
            "time_ms": head.time_ms,
            "state_root": head.state_root.hex(),
        }

    async def chain_block(
        height: int | None = None, hash: str | None = None, full: bool = False
    ) -> dict[str, Any]:
        if (height is None) == (hash is None):
            raise RpcError(INVALID_PARAMS, "give exactly one of height or hash")
        if height is not None:
            block = ready().block(height)
        else:
            block = ready().block_by_hash(hex_param(hash, "hash"))
        if block is None:
            raise RpcError(NOT_FOUND, "no such block")
        out = block_json(block, full=full)
        commit = chain.block_commit(block.height)
        out["commit"] = (
            None
            if commit is None
            else {
                "round": commit.round,
                "signatures": len(commit.signatures),
                "validators": [s.validator.hex() for s in commit.signatures],
            }
        )
        return out

    async def chain_tx(hash: str) -> dict[str, Any]:
        digest = hex_param(hash, "hash")
        status = ready().tx_status(digest)
        if status.state != "committed":
            pending = status.state == "pending"
            message = {
                "pending": "transaction pending",
                "evicted": f"transaction evicted: {status.error}",
                "unknown": "no such transaction",
            }[status.state]
            raise RpcError(
                NOT_FOUND,
                message,
                {"pending": pending, "state": status.state, "error": status.error},
            )
        assert status.tx is not None
        return {
            "tx": tx_json(status.tx),
            "height": status.height,
            "index": status.index,
            "ok": status.ok,
            "error": status.error,
            "state": status.state,
        }

    async def chain_params() -> dict[str, Any]:
        return dict(to_json(chain.params))

    async def chain_account(address: str) -> dict[str, Any]:
        raw = hex_param(address, "address")
        account = ready().account(raw)
        out = dict(to_json(account))
        out["address"] = raw.hex()
        out["next_nonce"] = chain.next_nonce(raw)
        return out

    async def chain_sendTx(tx: str) -> dict[str, Any]:
        if not isinstance(tx, str) or len(tx) > tx_hex_chars_max:
            raise RpcError(INVALID_PARAMS, f"tx must be hex, at most {tx_hex_chars_max} chars")
        try:
            decoded: Transaction = ledger.decode(Transaction, hex_param(tx, "tx", None))  # type: ignore[arg-type]
        except DecodeError as exc:
            raise RpcError(INVALID_PARAMS, str(exc)) from None
        try:
            digest = await ready().submit(decoded)
        except MempoolRejected as exc:
            raise RpcError(TX_REJECTED, f"rejected: {exc}", {"reason": exc.reason}) from None
        return {"tx_hash": digest.hex()}

    async def chain_receipt(job_id: str) -> dict[str, Any]:
        record = ready().receipt(hex_param(job_id, "job_id"))
        if record is None:
            raise RpcError(NOT_FOUND, "no receipt for that job")
        return dict(to_json(record))

    async def chain_trade(job_id: str) -> dict[str, Any]:
        trade = ready().trade(hex_param(job_id, "job_id"))
        if trade is None:
            raise RpcError(NOT_FOUND, "no trade for that job")
        return dict(to_json(trade))

    hex32 = "hex string, 32 bytes"
    registry.register(
        "consensus_status",
        consensus_status,
        description="Height, round, step, validators, catching_up, mempool and driver counters.",
        result=Result("object"),
    )
    registry.register(
        "chain_head", chain_head, description="The last committed block.", result=Result("object")
    )
    registry.register(
        "chain_block",
        chain_block,
        description="A committed block by height or hash, with its commit certificate.",
        params=(
            Param("height", "integer", False, "Block height."),
            Param("hash", "string", False, f"Block hash, {hex32}."),
            Param("full", "boolean", False, "Include whole transactions, not just hashes."),
        ),
        result=Result("object"),
    )
    registry.register(
        "chain_tx",
        chain_tx,
        description="A committed transaction and its result.",
        params=(Param("hash", "string", True, f"Transaction hash, {hex32}."),),
        result=Result("object"),
    )
    registry.register(
        "chain_params",
        chain_params,
        description="The chain's rules from genesis: fee_min, provider_bond_min, "
        "unbonding_delay_ms, charge_min, slash_amount, evidence_window_ms.",
        result=Result("object"),
    )
    registry.register(
        "chain_account",
        chain_account,
        description="Balance, locked escrow, nonce, provider earnings, next usable nonce.",
        params=(Param("address", "string", True, f"Account address, {hex32}."),),
        result=Result("object"),
    )
    registry.register(
        "chain_sendTx",
        chain_sendTx,
        description="Submit a signed transaction (hex of its canonical encoding).",
        params=(Param("tx", "string", True, "Hex of the canonical msgpack encoding."),),
        result=Result("object", "The transaction hash."),
    )
    registry.register(
        "chain_receipt",
        chain_receipt,
        description="The settled receipt of a job, by job id.",
        params=(Param("job_id", "string", True, f"Job id, {hex32}."),),
        result=Result("object"),
    )
    registry.register(
        "chain_trade",
        chain_trade,
        description="The trade (escrow) of a job, by job id.",
        params=(Param("job_id", "string", True, f"Job id, {hex32}."),),
        result=Result("object"),
    )
