"""Genesis JSON: round trip, the initial state, and clear errors naming the bad key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ledger
from ledger import testing as factory

KEYS = [factory.key_for(i, "genesis") for i in range(3)]


def test_write_load_round_trip_and_initial_state(tmp_path: Path) -> None:
    genesis = factory.funded_genesis(KEYS, 123)
    path = tmp_path / "genesis.json"
    genesis.write(path)
    loaded = ledger.Genesis.load(path)
    assert loaded == genesis, "genesis changed through JSON"
    raw = json.loads(path.read_text())
    assert raw["accounts"][0]["address"] == KEYS[0].address.hex(), "addresses are hex in JSON"
    state = loaded.initial_state()
    assert state.height == 0 and state.block_hash == genesis.hash(), "block 1's parent"
    assert state.total_supply() == 369 == state.supply, "supply is the sum of allocations"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda g: g.update(chain_id=""), "chain_id"),
        (lambda g: g.update(genesis_time_ms="now"), "genesis_time_ms"),
        (lambda g: g["accounts"][0].update(balance=-1), r"accounts\[0\].balance"),
        (lambda g: g["accounts"][0].update(balance=2**63), r"accounts\[0\].balance"),
        (lambda g: g["accounts"][1].update(address="zz"), r"accounts\[1\].address"),
        (lambda g: g["accounts"].append(dict(g["accounts"][0])), "appears twice"),
        (lambda g: g["accounts"][0].update(balance=True), r"accounts\[0\].balance"),
        (lambda g: g.update(validators=[]), "validators"),
        (lambda g: g["validators"][0].update(power=0), r"validators\[0\].power"),
        (lambda g: [g["accounts"][i].update(balance=2**62) for i in range(3)], "total supply"),
        (lambda g: g["accounts"][0].update(bonded=-1), r"accounts\[0\].bonded"),
        (lambda g: g["accounts"][0].update(bonded="5"), r"accounts\[0\].bonded"),
        (lambda g: g["accounts"][0].update(bonded=2**63 - 1), "total supply"),
        (lambda g: g.update(params=[]), "params must be a dict"),
        (lambda g: g["params"].update(fee_mni=1), r"params.fee_mni is not a chain parameter"),
        (lambda g: g["params"].update(fee_min=-1), r"params.fee_min -1 is outside"),
        (lambda g: g["params"].update(fee_min="1"), r"params.fee_min must be a int"),
        (lambda g: g["params"].update(unbonding_delay_ms=0), r"params.unbonding_delay_ms"),
        (lambda g: g["params"].update(evidence_window_ms=10**12), r"params.evidence_window_ms"),
    ],
)
def test_bad_genesis_names_the_key(mutate: object, message: str) -> None:
    raw = json.loads(factory.funded_genesis(KEYS, 1).to_json())
    mutate(raw)  # type: ignore[operator]
    with pytest.raises(ledger.InvalidGenesis, match=message):
        ledger.Genesis.from_json(json.dumps(raw))


def test_params_default_when_absent_and_round_trip() -> None:
    raw = json.loads(factory.funded_genesis(KEYS, 1).to_json())
    del raw["params"]
    assert ledger.Genesis.from_json(json.dumps(raw)).params == ledger.ChainParams(), "defaults"
    raw["params"] = {"fee_min": 3}
    loaded = ledger.Genesis.from_json(json.dumps(raw))
    assert loaded.params == ledger.ChainParams(fee_min=3), "one key given, the rest default"
    assert loaded.initial_state().params.fee_min == 3, "the state carries the params"
    assert loaded.hash() != factory.funded_genesis(KEYS, 1).hash(), "params are in the hash"
    network = ledger.ChainParams.default()
    assert network.fee_min >= 1 and network.provider_bond_min > 0, network
    assert not network.problems(), network.problems()


def test_genesis_accounts_may_start_bonded_and_bonds_are_supply() -> None:
    genesis = ledger.Genesis(
        chain_id="bonds",
        genesis_time_ms=1,
        accounts=(
            ledger.GenesisAccount(KEYS[0].address, 100, 40),
            ledger.GenesisAccount(KEYS[1].address, 7),
        ),
        validators=(ledger.Validator(KEYS[0].address, 1),),
    )
    raw = json.loads(genesis.to_json())
    assert raw["accounts"][0]["bonded"] == 40 and "bonded" not in raw["accounts"][1], raw
    assert ledger.Genesis.from_json(genesis.to_json()) == genesis, "bonds through JSON"
    state = genesis.initial_state()
    assert state.account(KEYS[0].address) == ledger.Account(balance=100, bonded=40), "bonded"
    assert state.supply == state.total_supply() == 147 == genesis.supply(), "bonds are supply"


def test_garbage_is_not_a_genesis() -> None:
    with pytest.raises(ledger.InvalidGenesis, match="not valid JSON"):
        ledger.Genesis.from_json(b"\xff{")
    with pytest.raises(ledger.InvalidGenesis, match="genesis must be a dict"):
        ledger.Genesis.from_json("[]")


@given(
    st.lists(
        st.tuples(st.binary(min_size=32, max_size=32), st.integers(0, 2**50)),
        max_size=8,
        unique_by=lambda a: a[0],
    ),
    st.lists(
        st.tuples(st.binary(min_size=32, max_size=32), st.integers(1, 2**32)),
        min_size=1,
        max_size=4,
        unique_by=lambda v: v[0],
    ),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=64),
    st.integers(0, 2**62),
    st.integers(0, 2**62),
    st.integers(1, 10**10),
)
def test_genesis_json_and_codec_round_trip(
    accounts: list[tuple[bytes, int]],
    validators: list[tuple[bytes, int]],
    chain_id: str,
    time_ms: int,
    fee_min: int,
    unbonding_delay_ms: int,
) -> None:
    genesis = ledger.Genesis(
        chain_id=chain_id,
        genesis_time_ms=time_ms,
        accounts=tuple(ledger.GenesisAccount(ledger.Address(a), b) for a, b in accounts),
        validators=tuple(ledger.Validator(ledger.Address(a), p) for a, p in validators),
        params=ledger.ChainParams(
            fee_min=fee_min,
            unbonding_delay_ms=unbonding_delay_ms,
            evidence_window_ms=unbonding_delay_ms - 1,
        ),
    )
    assert ledger.Genesis.from_json(genesis.to_json()) == genesis, "JSON round trip"
    assert ledger.decode(ledger.Genesis, ledger.encode(genesis)) == genesis, "codec round trip"
