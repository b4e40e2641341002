"""The market simulation and its cheater zoo over many seeds (``compute.market.simulation``).

Each seed runs real ``MarketService``s on an in-memory network with loss, delay and duplicates,
a real ledger, restarts at any step, and one member of the zoo; every cheat must be caught by
the check meant for it and the invariants must hold. A failing seed prints its replay command.
"""

from __future__ import annotations

from compute.market import simulation
from compute.market.simulation import SimFailure, SimResult, replay_command, run_seed

seeds_ci = 200
engaged_share_min = 0.5
"""A cheat must reach its victims (win an award, get its hostile job to a provider, ...) in at
least this share of its seeds, or 'caught' would mean little."""


def test_zoo_holds_every_invariant_and_catches_every_cheat_over_200_seeds() -> None:
    results: list[SimResult] = []
    failures: list[str] = []
    for seed in range(seeds_ci):
        try:
            results.append(run_seed(seed))
        except AssertionError as exc:
            failures.append(f"{exc}\nreplay: {replay_command(seed)}")
    assert not failures, f"{len(failures)} of {seeds_ci} seeds failed:\n\n" + "\n\n".join(
        failures[:5]
    )
    assert {r.cheat for r in results} == set(simulation.ZOO), "some cheat never ran"
    assert all(r.states for r in results), "a seed ran no honest job"
    for name, cls in simulation.ZOO.items():
        if cls is simulation.NoCheat:
            continue
        runs = [r for r in results if r.cheat == name]
        engaged = sum(r.engaged for r in runs)
        assert engaged >= engaged_share_min * len(runs), (
            f"{name} reached its victims in only {engaged} of {len(runs)} seeds"
        )


def test_a_seed_replays_exactly() -> None:
    first = run_seed(7)
    again = run_seed(7)
    assert first == again, f"seed 7 ran differently twice:\n{first}\n{again}"


def test_the_invariants_catch_an_uncaught_cheat() -> None:
    """A provider that returns cheap wrong work, with no ``--verify`` to catch it, must fail
    the run: the invariants are not vacuous."""
    failures = []
    for seed in range(5):
        try:
            run_seed(seed, cheat="cheap-work-unverified")
        except SimFailure as exc:
            failures.append(str(exc))
    assert failures, "five runs with an unverified cheap-work provider all passed"
    assert all("got outputs" in f for f in failures), failures
