"""Signing and checking proposals and votes through ``ledger.sign_object``/``verify_object``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar, cast

from ledger import sign_object, verify_object

if TYPE_CHECKING:
    from consensus.types import Proposal, Vote
    from ledger import SigningKey

M = TypeVar("M", bound="Proposal | Vote")


def sign_message(message: M, key: SigningKey, chain_id: str) -> M:
    # ledger's SignedObject protocol declares settable attributes; frozen dataclasses are not,
    # so mypy needs the cast. The bytes signed are exactly sign_object's.
    signed: M = sign_object(cast("Any", message), key, chain_id)
    return signed


def verify_message(message: Proposal | Vote, chain_id: str) -> bool:
    return verify_object(cast("Any", message), chain_id)
