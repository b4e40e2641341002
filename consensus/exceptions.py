"""Errors raised by the consensus package."""


class ConsensusError(Exception):
    """Base class of every error the consensus package raises on purpose."""


class InvalidCommit(ConsensusError):
    """Raised when a commit certificate does not prove >2/3 of the voting power signed a block."""


class InvalidMessage(ConsensusError):
    """Raised when a proposal, vote or sync message fails decoding or validation."""


class InvalidBlock(ConsensusError):
    """Raised by the application when block bytes are not a valid next block."""


class WalError(ConsensusError):
    """Raised when the write-ahead log cannot be opened, read or written."""


class DoubleSignRefused(ConsensusError):
    """Raised when asked to sign a second, different message for one height/round/step."""


class TransportError(ConsensusError):
    """Raised by a transport when a request to a peer fails (unreachable, timeout, refused)."""


class ConfigError(ConsensusError):
    """Raised when a consensus config or genesis value is out of range; names section and key."""
