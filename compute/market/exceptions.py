"""Errors of the job market: one base, ``MarketError``, and a subclass per expected failure."""

from __future__ import annotations


class MarketError(Exception):
    """Raised when the market cannot do what was asked (base of every market error)."""


class NetError(MarketError):
    """Raised when a direct request to a peer fails (unreachable, timeout, remote refusal);
    the node's ``MarketNetAPI`` adapter maps its transport's errors to this."""


class ChainRejected(MarketError):
    """Raised when the chain refuses a transaction (the mempool's reason is the message)."""


class Unsatisfiable(MarketError):
    """Raised when no live offer can satisfy a submission; the message names what is unmet."""


class InvalidSubmission(MarketError, ValueError):
    """Raised when a job submission is malformed (empty command, inputs too large, ...)."""


class InvalidManifest(InvalidSubmission):
    """Raised when a job manifest breaks the market's rules (argv, env, input names, sizes):
    at submit on the requester, and on an award at the provider, before any slot is taken."""


class UnknownJob(MarketError, KeyError):
    """Raised when a job id is not in this node's job store."""


class JobNotReady(MarketError):
    """Raised when a job's result or outputs are asked for before the job is done."""


class StoreCorrupt(MarketError):
    """Raised when the job store holds bytes that do not decode as its schema says."""


class StoreFormatError(StoreCorrupt):
    """Raised at open when the job store was written in another format than this code reads."""
