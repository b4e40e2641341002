"""Genesis: the chain id, the initial allocations (the only mint) and the validator set.

The JSON form is ``{"chain_id": str, "genesis_time_ms": int, "accounts": [{"address": hex,
"balance": int, "bonded": int}], "validators": [{"address": hex, "power": int}], "params": {...}}``.
An account's ``bonded`` (stake a provider starts with, slashable) is optional (0).
``params`` (``ChainParams``) is optional, and so is each of its keys: a missing one takes the
field's default (the permissive rules of a chain without fees or bonds); an unknown key is an
error, so a typo cannot silently give a chain the wrong rules.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ledger._codec import hash_of
from ledger._keys import Address
from ledger._state import LedgerState, genesis_state
from ledger.exceptions import InvalidGenesis
from ledger.types import BlockHash, ChainParams, Validator, amount_max

genesis_bytes_max = 16 * 1024 * 1024
chain_id_chars_max = 64
validators_max = 1000


@dataclasses.dataclass(frozen=True, slots=True)
class GenesisAccount:
    address: Address
    balance: int
    bonded: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Genesis:
    chain_id: str
    genesis_time_ms: int
    accounts: tuple[GenesisAccount, ...]
    validators: tuple[Validator, ...]
    params: ChainParams = dataclasses.field(default_factory=ChainParams)

    def __post_init__(self) -> None:
        if not 0 < len(self.chain_id) <= chain_id_chars_max or not self.chain_id.isprintable():
            raise InvalidGenesis(f"chain_id must be 1..{chain_id_chars_max} printable characters")
        if not 0 <= self.genesis_time_ms <= amount_max:
            raise InvalidGenesis("genesis_time_ms is out of range")
        seen: set[bytes] = set()
        for i, account in enumerate(self.accounts):
            if len(account.address) != 32:
                raise InvalidGenesis(f"accounts[{i}].address must be 32 bytes")
            if account.address in seen:
                raise InvalidGenesis(f"accounts[{i}].address appears twice")
            seen.add(account.address)
            if not 0 <= account.balance <= amount_max:
                raise InvalidGenesis(f"accounts[{i}].balance is outside 0..{amount_max}")
            if not 0 <= account.bonded <= amount_max:
                raise InvalidGenesis(f"accounts[{i}].bonded is outside 0..{amount_max}")
        if self.supply() > amount_max:
            raise InvalidGenesis(f"the total supply exceeds {amount_max}")
        if not 0 < len(self.validators) <= validators_max:
            raise InvalidGenesis(f"validators must hold 1..{validators_max} entries")
        seen.clear()
        for i, validator in enumerate(self.validators):
            if len(validator.address) != 32:
                raise InvalidGenesis(f"validators[{i}].address must be 32 bytes")
            if validator.address in seen:
                raise InvalidGenesis(f"validators[{i}].address appears twice")
            seen.add(validator.address)
            if not 0 < validator.power <= 2**32:
                raise InvalidGenesis(f"validators[{i}].power must be in 1..2**32")
        problems = self.params.problems()
        if problems:
            raise InvalidGenesis("; ".join(problems))

    def supply(self) -> int:
        """All the money there will ever be: every allocation, bonds included."""
        return sum(a.balance + a.bonded for a in self.accounts)

    def hash(self) -> BlockHash:
        """What block 1's ``prev_hash`` must be: the hash of the canonical genesis."""
        return BlockHash(hash_of(self))

    def initial_state(self) -> LedgerState:
        return genesis_state(
            self.chain_id,
            self.hash(),
            self.genesis_time_ms,
            {a.address: a.balance for a in self.accounts},
            self.validators,
            self.params,
            {a.address: a.bonded for a in self.accounts if a.bonded},
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "chain_id": self.chain_id,
                "genesis_time_ms": self.genesis_time_ms,
                "accounts": [
                    {"address": a.address.hex(), "balance": a.balance}
                    | ({"bonded": a.bonded} if a.bonded else {})
                    for a in self.accounts
                ],
                "validators": [
                    {"address": v.address.hex(), "power": v.power} for v in self.validators
                ],
                "params": {
                    f.name: getattr(self.params, f.name) for f in dataclasses.fields(ChainParams)
                },
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Genesis:
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidGenesis(f"genesis is not valid JSON: {exc}") from exc
        obj = _expect(raw, dict, "genesis")
        return cls(
            chain_id=_expect(obj.get("chain_id"), str, "chain_id"),
            genesis_time_ms=_expect_int(obj.get("genesis_time_ms"), "genesis_time_ms"),
            accounts=tuple(
                GenesisAccount(
                    _address(_expect(a, dict, f"accounts[{i}]"), f"accounts[{i}]"),
                    _expect_int(a.get("balance"), f"accounts[{i}].balance"),
                    _expect_int(a.get("bonded", 0), f"accounts[{i}].bonded"),
                )
                for i, a in enumerate(_expect(obj.get("accounts"), list, "accounts"))
            ),
            validators=tuple(
                Validator(
                    _address(_expect(v, dict, f"validators[{i}]"), f"validators[{i}]"),
                    _expect_int(v.get("power"), f"validators[{i}].power"),
                )
                for i, v in enumerate(_expect(obj.get("validators"), list, "validators"))
            ),
            params=_params(obj.get("params", {})),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Genesis:
        data = Path(path).read_bytes()
        if len(data) > genesis_bytes_max:
            raise InvalidGenesis(f"genesis file is larger than {genesis_bytes_max} bytes")
        return cls.from_json(data)

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: a reader never sees half a genesis file."""
        target = Path(path)
        temporary = target.with_name(target.name + ".tmp")
        temporary.write_text(self.to_json() + "\n")
        os.replace(temporary, target)


def _expect(value: Any, kind: type, where: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidGenesis(f"{where} must be a {kind.__name__}")
    return value


def _expect_int(value: Any, where: str) -> int:
    result: int = _expect(value, int, where)
    return result


def _params(raw: Any) -> ChainParams:
    obj: dict[str, Any] = _expect(raw, dict, "params")
    names = {f.name for f in dataclasses.fields(ChainParams)}
    unknown = sorted(set(obj) - names)
    if unknown:
        raise InvalidGenesis(f"params.{unknown[0]} is not a chain parameter")
    return ChainParams(**{k: _expect_int(v, f"params.{k}") for k, v in obj.items()})


def _address(obj: dict[str, Any], where: str) -> Address:
    text = _expect(obj.get("address"), str, f"{where}.address")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise InvalidGenesis(f"{where}.address is not hex") from None
    if len(raw) != 32:
        raise InvalidGenesis(f"{where}.address must be 32 bytes (64 hex digits)")
    return Address(raw)
