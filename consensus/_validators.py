"""The validator set: voting power, quorum arithmetic, weighted proposer rotation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from consensus.exceptions import ConfigError
from consensus.types import Validator, address_bytes

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ledger import Address

proposer_cycle_max = 10_000
"""Longest precomputed proposer sequence; larger total powers are scaled down to fit."""
validators_max = 1000
power_max = 2**62 // validators_max


class ValidatorSet:
    """An immutable validator set in canonical (address) order.

    The proposer of (height, round) is slot ``(height + round) mod len(cycle)`` of a
    smooth-weighted-round-robin sequence (Tendermint's priority algorithm with fixed powers): each
    validator proposes ``power`` times per ``total_power`` slots, interleaved rather than bunched.
    """

    __slots__ = ("_by_address", "_cycle", "total_power", "validators")

    def __init__(self, validators: Iterable[Validator]) -> None:
        ordered = tuple(sorted(validators, key=lambda v: v.address))
        if not ordered:
            raise ConfigError("[genesis] validators must not be empty")
        if len(ordered) > validators_max:
            raise ConfigError(f"[genesis] validators: at most {validators_max}")
        by_address: dict[bytes, Validator] = {}
        for v in ordered:
            if len(v.address) != address_bytes:
                raise ConfigError(f"[genesis] validator address must be {address_bytes} bytes")
            if not 0 < v.power <= power_max:
                raise ConfigError(f"[genesis] validator power must be in 1..{power_max}")
            if v.address in by_address:
                raise ConfigError(f"[genesis] duplicate validator {v.address.hex()}")
            by_address[v.address] = v
        self.validators = ordered
        self._by_address = by_address
        self.total_power = sum(v.power for v in ordered)
        self._cycle = _proposer_cycle(ordered, self.total_power)

    def __len__(self) -> int:
        return len(self.validators)

    def __contains__(self, address: object) -> bool:
        return address in self._by_address

    def power_of(self, address: bytes) -> int:
        v = self._by_address.get(address)
        return 0 if v is None else v.power

    def has_two_thirds(self, power: int) -> bool:
        """More than 2/3 of the total power (the paper's 2f+1)."""
        return 3 * power > 2 * self.total_power

    def has_one_third(self, power: int) -> bool:
        """More than 1/3 of the total power (the paper's f+1): at least one honest voter."""
        return 3 * power > self.total_power

    @property
    def proposer_cycle_length(self) -> int:
        """Rounds after which the proposer rotation repeats."""
        return len(self._cycle)

    def proposer(self, height: int, round_: int) -> Address:
        return self._cycle[(height + round_) % len(self._cycle)]


def _proposer_cycle(ordered: tuple[Validator, ...], total: int) -> tuple[Address, ...]:
    powers = [v.power for v in ordered]
    if total > proposer_cycle_max:
        # Keep every validator in the rotation, proportional to power (rounded up).
        powers = [max(1, p * proposer_cycle_max // total) for p in powers]
    cycle_len = sum(powers)
    priority = [0] * len(ordered)
    cycle: list[Address] = []
    for _ in range(cycle_len):
        for i, p in enumerate(powers):
            priority[i] += p
        best = max(range(len(ordered)), key=lambda i: (priority[i], -i))
        priority[best] -= cycle_len
        cycle.append(ordered[best].address)
    return tuple(cycle)
