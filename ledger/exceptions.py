"""Errors raised by the ledger package."""


class LedgerError(Exception):
    """Base class of every error the ledger package raises on purpose."""


class DecodeError(LedgerError):
    """Raised when bytes are not the canonical encoding of the expected type."""


class SignatureError(LedgerError):
    """Raised when a signature does not verify for its signer, chain id and type tag."""
