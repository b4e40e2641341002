"""Errors raised by the node package."""


class NodeError(Exception):
    """Base class of every error the node package raises on purpose."""


class ConfigError(NodeError):
    """Raised when config.toml is missing, malformed, or a value is out of range.

    The message names the section and key, so an operator can fix the file.
    """


class HomeError(NodeError):
    """Raised when a node home cannot be created or used (exists, locked, bad key file)."""


class TestnetError(NodeError):
    """Raised when a testnet directory is missing, malformed, or its nodes cannot start."""
