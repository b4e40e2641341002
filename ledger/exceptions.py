"""Errors raised by the ledger package."""


class LedgerError(Exception):
    """Base class of every error the ledger package raises on purpose."""


class DecodeError(LedgerError):
    """Raised when bytes are not the canonical encoding of the expected type."""


class SignatureError(LedgerError):
    """Raised when a signature does not verify for its signer, chain id and type tag."""


class InvalidTransaction(LedgerError):
    """Raised when a transaction fails a stateless or stateful check; the message says which."""


class InvalidBlock(LedgerError):
    """Raised when a block cannot be applied at all: wrong chain, height, parent, time or roots."""


class InvalidGenesis(LedgerError):
    """Raised when a genesis file is malformed; the message names the offending key."""


class StoreError(LedgerError):
    """Raised when the store refuses a write (wrong height, wrong parent) or finds it corrupt."""


class MempoolRejected(LedgerError):
    """Raised when the mempool refuses a transaction; ``reason`` is a short stable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class OutputsError(LedgerError):
    """Raised when sealed outputs do not match the roots their delivery committed to."""
