"""The job market end to end: real meshes on loopback, a real ledger, real job processes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import trio

import ledger
from compute.market import (
    PROTOCOL_AWARD,
    Award,
    JobManifest,
    JobRecord,
    JobRequest,
    JobState,
    JobSubmission,
    MarketConfig,
    NetError,
    Requirements,
    Role,
    Unsatisfiable,
)
from ledger import TradeStatus
from p2p.testing import wait_until
from tests.compute.market.cluster import BALANCE, BOND, CHAIN_ID, now_ms, open_cluster

GiB = 1024**3
COPY_JOB = (
    "sh",
    "-c",
    'cat in.txt > "$GPUMESH_OUTPUT_DIR/out.txt"; echo "gpus=$CUDA_VISIBLE_DEVICES"; echo warn >&2',
)


def copy_job(text: bytes, **changes: object) -> JobSubmission:
    values: dict[str, object] = {
        "argv": COPY_JOB,
        "inputs": (("in.txt", text),),
        "requirements": Requirements(gpus=1, min_vram_bytes=16 * GiB),
        "max_price_per_gpu_second": 100,
        "max_wall_ms": 5_000,
    }
    values.update(changes)
    return JobSubmission(**values)  # type: ignore[arg-type]


async def test_jobs_complete_and_settle_with_money_adding_up(tmp_path: Path) -> None:
    async with open_cluster(tmp_path) as cluster:
        requester = cluster.requester
        supply_before = cluster.chain.state.total_supply()
        events = requester.market.subscribe()
        started = trio.current_time()
        records = [
            await requester.market.submit(copy_job(b"cheapest job\n")),
            await requester.market.submit(
                copy_job(b"a100 job\n", requirements=Requirements(gpus=1, model="A100-80GB"))
            ),
            await requester.market.submit(copy_job(b"least loaded\n", strategy="least-loaded")),
        ]
        failing = await requester.market.submit(
            copy_job(b"", argv=("sh", "-c", "sleep 0.3; echo boom >&2; exit 3"), inputs=())
        )
        done = [await cluster.wait_state(requester, r.job_id, {JobState.DONE}, 60) for r in records]
        # A job that fails in the sandbox still settles: a receipt with its exit status, and
        # the provider is paid for the time it used.
        failed = await cluster.wait_state(requester, failing.job_id, {JobState.DONE}, 60)
        assert failed.receipt is not None and failed.receipt.exit_status == 3, failed.to_json()
        assert failed.cost > 0, f"the failed job's usage was not paid: {failed.to_json()}"
        assert (await requester.market.result(failed.job_id)).stderr == b"boom\n"
        assert len(requester.market.bids(failed.job_id)) >= 1, "the bids are not kept"
        logs = await requester.market.logs(records[0].job_id)
        assert logs.stderr == b"warn\n" and logs.state == "done", f"logs: {logs}"
        elapsed = trio.current_time() - started
        providers = {r.terms.provider for r in done if r.terms is not None}
        assert cluster.nodes[3].key.address in providers, "the A100 job must go to the A100 node"
        for record, text in zip(
            done, [b"cheapest job\n", b"a100 job\n", b"least loaded\n"], strict=True
        ):
            result = await requester.market.result(record.job_id)
            assert result.outputs == {"out.txt": text}, f"wrong outputs: {result.outputs}"
            assert result.stdout.startswith(b"gpus=GPU-"), f"job saw no GPU: {result.stdout!r}"
            assert result.stderr == b"warn\n", f"stderr not carried: {result.stderr!r}"
            trade = cluster.chain.trade(record.attempt_job_id)
            assert trade is not None and trade.status is TradeStatus.SETTLED, f"trade: {trade}"
            assert record.cost == trade.paid, "the record's cost is what the chain paid"
            stamps = record.to_json()["timestamps"]
            assert isinstance(stamps, dict)
            for state in ("bidding", "awarded", "locked", "settling", "done"):
                assert state in stamps, f"no {state} timestamp in {stamps}"
        # The event hook saw the first job walk through every state, in order.
        seen: list[str] = []
        while True:
            try:
                event = events.receive_nowait()
            except trio.WouldBlock:
                break
            if event.job_id == records[0].job_id and (not seen or seen[-1] != event.state.label):
                seen.append(event.state.label)
        expected = ["bidding", "awarded", "locked", "running", "settling", "done"]
        assert [s for s in seen if s != "running"] == [s for s in expected if s != "running"], (
            f"state events out of order: {seen}"
        )
        # Money: what providers earned is what the requester spent, and nothing was minted.
        state = cluster.chain.state
        mine = state.account(requester.key.address)
        fees = mine.nonce * cluster.chain.params().fee_min  # one fee per transaction it sent
        spent = BALANCE - mine.balance - fees
        assert state.account(requester.key.address).locked == 0, "escrow left locked"
        earned = sum(state.account(n.key.address).earned for n in cluster.nodes[1:])
        costs = [r.cost for r in [*done, failed]]
        assert spent == earned == sum(costs), f"spent {spent}, earned {earned}, costs {costs}"
        assert state.total_supply() == supply_before, "supply changed"
        for node in cluster.nodes[1:]:
            for record in node.market.list(Role.PROVIDER):
                assert record.state is JobState.DONE, f"provider record {record.to_json()}"
        # Latencies the docs quote (docs/market.md); printed, never asserted (shared CPUs).
        provider_side = {
            r.attempt_job_id: r for n in cluster.nodes[1:] for r in n.market.list(Role.PROVIDER)
        }
        for record in done:
            at = {s.state: s.at_ms for s in record.stamps}
            # The provider's own stamp: a short job can settle before its notice arrives.
            ran = provider_side[record.attempt_job_id].stamps
            at[JobState.RUNNING] = next(s.at_ms for s in ran if s.state is JobState.RUNNING)
            submitted = at[JobState.BIDDING]
            print(
                "latency_ms",
                {
                    "to_awarded": at[JobState.AWARDED] - submitted,
                    "to_locked": at[JobState.LOCKED] - submitted,
                    "to_running": at[JobState.RUNNING] - submitted,
                    "to_settled": at[JobState.SETTLING] - submitted,
                    "to_done": at[JobState.DONE] - submitted,
                },
            )
        print(f"4 jobs submit-to-done {elapsed:.2f} s")


async def test_unsatisfiable_job_fails_fast_naming_the_requirement(tmp_path: Path) -> None:
    async with open_cluster(tmp_path) as cluster:
        market = cluster.requester.market
        with pytest.raises(Unsatisfiable, match=r">= 2 GPUs with >= 80 GB VRAM; best: ") as info:
            await market.submit(
                copy_job(b"x", requirements=Requirements(gpus=2, min_vram_bytes=80 * GiB))
            )
        assert "A100-80GB 80 GB x1" in str(info.value), f"best offer not named: {info.value}"
        with pytest.raises(Unsatisfiable, match="too expensive: cheapest 30"):
            await market.submit(copy_job(b"x", max_price_per_gpu_second=10))
        with pytest.raises(Unsatisfiable, match="model H100"):
            await market.submit(copy_job(b"x", requirements=Requirements(gpus=1, model="H100")))
        assert market.list() == [], "a refused submission must leave no job behind"


async def test_outputs_not_matching_the_delivery_are_never_paid(tmp_path: Path) -> None:
    # Provider 1 (the cheapest) serves tampered sealed outputs over the wire: the requester
    # never acks them, the provider gets nothing, and the job moves to an honest provider.
    async with open_cluster(tmp_path, tampering=frozenset({1})) as cluster:
        requester = cluster.requester
        cheater = cluster.nodes[1].key.address
        record = await requester.market.submit(copy_job(b"honest bytes\n"))
        record = await cluster.wait_state(requester, record.job_id, {JobState.DONE}, 60)
        assert record.terms is not None and record.terms.provider != cheater, "cheater paid"
        assert record.attempt > 0, "the first attempt (the cheapest, the cheater) was retried"
        result = await requester.market.result(record.job_id)
        assert result.outputs == {"out.txt": b"honest bytes\n"}, result.outputs
        account = cluster.chain.account(cheater)
        assert (account.earned, account.completed, account.failed) == (0, 0, 1), account


async def test_cancel_kills_the_running_job_and_refunds_the_escrow(tmp_path: Path) -> None:
    async with open_cluster(tmp_path) as cluster:
        requester = cluster.requester
        provider = cluster.nodes[1]
        record = await requester.market.submit(
            copy_job(b"", argv=("sleep", "30"), inputs=(), max_wall_ms=40_000)
        )
        await cluster.wait_state(requester, record.job_id, {JobState.RUNNING}, 30)
        logs = await requester.market.logs(record.job_id)
        assert logs.state == "running", f"the provider reports {logs.state}, not running"
        assert provider.provider is not None
        assert provider.provider.allocator.allocations(), "the provider holds no slot for the job"
        record = await requester.market.cancel(record.job_id)
        assert record.state is JobState.CANCELLED, f"cancel ended {record.to_json()}"
        trade = cluster.chain.trade(record.attempt_job_id)
        assert trade is not None and trade.status is TradeStatus.CANCELLED, f"trade: {trade}"
        # The provider is paid for the time it held the job (pro rata); the rest comes back.
        account = cluster.chain.account(requester.key.address)
        paid = cluster.chain.account(provider.key.address).earned
        assert paid == trade.paid and paid < trade.terms.max_cost, f"pro rata pay: {trade}"
        fees = account.nonce * cluster.chain.params().fee_min
        assert (account.balance + paid + fees, account.locked) == (BALANCE, 0), (
            f"escrow not returned: {account}"
        )
        side = await cluster.wait_state(
            provider, record.attempt_job_id, {JobState.CANCELLED}, 10, role=Role.PROVIDER
        )
        assert side.result is None, "a cancelled job must not have run to completion"
        await wait_until(
            lambda: not provider.provider.allocator.allocations(),  # type: ignore[union-attr]
            10,
            "the provider frees the killed job's slots",
        )


async def test_vanished_provider_is_refunded_and_the_job_retried_elsewhere(
    tmp_path: Path,
) -> None:
    config = MarketConfig.for_tests(attempt_slack_ms=2_000)
    async with open_cluster(tmp_path, config=config) as cluster:
        requester = cluster.requester
        gone = cluster.nodes[1]
        record = await requester.market.submit(
            copy_job(
                b"retried\n",
                argv=("sh", "-c", 'sleep 1; cp in.txt "$GPUMESH_OUTPUT_DIR/out.txt"'),
                max_wall_ms=3_000,
                deadline_ms=now_ms() + 60_000,
            )
        )
        await cluster.wait_state(gone, record.job_id, {JobState.RUNNING}, 30, role=Role.PROVIDER)
        first_attempt = record.attempt_job_id
        await cluster.stop_node(gone)
        record = await cluster.wait_state(requester, record.job_id, {JobState.DONE}, 60)
        trade = cluster.chain.trade(first_attempt)
        assert trade is not None and trade.status is TradeStatus.REFUNDED, f"first trade {trade}"
        assert record.attempt == 1 and record.terms is not None, f"not retried: {record.to_json()}"
        assert record.terms.provider != gone.key.address, "retried with the vanished provider"
        result = await requester.market.result(record.job_id)
        assert result.outputs == {"out.txt": b"retried\n"}, f"outputs {result.outputs}"
        # The missed deadline is on chain, for every requester's reputation strategy to see.
        gone_account = cluster.chain.account(gone.key.address)
        assert gone_account.failed == 1, f"the missed deadline is not counted: {gone_account}"
        assert cluster.chain.account(requester.key.address).locked == 0, "escrow left locked"


async def test_requester_restart_resumes_the_job(tmp_path: Path) -> None:
    async with open_cluster(tmp_path) as cluster:
        requester = cluster.requester
        record = await requester.market.submit(
            copy_job(b"survives\n", argv=("sh", "-c", 'sleep 1; cp in.txt "$GPUMESH_OUTPUT_DIR/o"'))
        )
        await cluster.wait_state(requester, record.job_id, {JobState.RUNNING}, 30)
        await cluster.stop_service(requester)
        await cluster.start_service(requester)
        assert requester.market.get(record.job_id).state is JobState.RUNNING, "state not reloaded"
        record = await cluster.wait_state(requester, record.job_id, {JobState.DONE}, 60)
        result = await requester.market.result(record.job_id)
        assert result.outputs == {"o": b"survives\n"}, f"outputs {result.outputs}"
        # Stopped while bidding: the bids taken so far are on disk, the window reopens.
        bidding = await requester.market.submit(copy_job(b"again\n"))
        await wait_until(
            lambda: bool(requester.market.get(bidding.job_id).bids), 30, "a first bid arrives"
        )
        await cluster.stop_service(requester)
        await cluster.start_service(requester)
        assert requester.market.bids(bidding.job_id), "bids taken before the restart were lost"
        await cluster.wait_state(requester, bidding.job_id, {JobState.DONE}, 60)


async def test_provider_restart_reruns_the_interrupted_job(tmp_path: Path) -> None:
    async with open_cluster(tmp_path) as cluster:
        requester = cluster.requester
        provider = cluster.nodes[1]
        record = await requester.market.submit(
            copy_job(b"rerun\n", argv=("sh", "-c", 'sleep 1; cp in.txt "$GPUMESH_OUTPUT_DIR/o"'))
        )
        aid = record.attempt_job_id
        await cluster.wait_state(provider, aid, {JobState.RUNNING}, 30, role=Role.PROVIDER)
        await cluster.stop_service(provider)
        assert provider.provider is not None
        assert not provider.provider.allocator.allocations(), "the killed job kept its slots"
        await cluster.start_service(provider)
        side = await cluster.wait_state(provider, aid, {JobState.DONE}, 60, role=Role.PROVIDER)
        running = [s for s in side.stamps if s.state is JobState.RUNNING]
        assert len(running) == 2, f"the job was not re-run after the restart: {side.stamps}"
        record = await cluster.wait_state(requester, record.job_id, {JobState.DONE}, 60)
        result = await requester.market.result(record.job_id)
        assert result.outputs == {"o": b"rerun\n"}, f"outputs {result.outputs}"


async def test_cpu_only_job_runs_on_a_cpu_provider(tmp_path: Path) -> None:
    # simulate_gpus "" on a machine without NVML: a CPU-only provider with one CPU slot.
    async with open_cluster(tmp_path, providers=(("", 5),)) as cluster:
        requester = cluster.requester
        record = await requester.market.submit(
            copy_job(b"on a cpu\n", requirements=Requirements(gpus=0), max_price_per_gpu_second=20)
        )
        record = await cluster.wait_state(requester, record.job_id, {JobState.DONE}, 60)
        assert record.terms is not None and record.terms.gpus == 0, f"terms {record.terms}"
        # A CPU slot is priced by the offer's cpu_price_per_slot_second (10 by default).
        assert record.terms.price_per_gpu_second == 10, f"terms {record.terms}"
        result = await requester.market.result(record.job_id)
        assert result.outputs == {"out.txt": b"on a cpu\n"}, f"outputs {result.outputs}"
        assert result.stdout == b"gpus=\n", f"a CPU job must see no GPU: {result.stdout!r}"
        with pytest.raises(Unsatisfiable, match="no provider offers >= 1 GPU"):
            await requester.market.submit(copy_job(b"x"))


async def test_outputs_past_the_declared_cap_settle_and_say_why_none_came(
    tmp_path: Path,
) -> None:
    async with open_cluster(tmp_path) as cluster:
        requester = cluster.requester
        record = await requester.market.submit(
            copy_job(
                b"",
                argv=("sh", "-c", 'head -c 8192 /dev/zero > "$GPUMESH_OUTPUT_DIR/big.bin"'),
                inputs=(),
                outputs_bytes_max=4096,
            )
        )
        record = await cluster.wait_state(requester, record.job_id, {JobState.DONE}, 60)
        # The run used the provider's time (paid), but its outputs broke the job's own cap:
        # none are delivered and the job says so instead of looking like a success.
        assert record.receipt is not None and record.cost > 0, record.to_json()
        assert "output_limit" in record.error, record.to_json()
        result = await requester.market.result(record.job_id)
        assert result.outputs == {}, f"outputs {result.outputs}"


async def test_provider_refuses_awards_a_requester_cannot_pay_for(tmp_path: Path) -> None:
    async with open_cluster(tmp_path, providers=(("RTX4090:1", 30),)) as cluster:
        provider = cluster.nodes[1]
        broke = ledger.SigningKey.generate()  # signs the award; has no balance on chain
        request = ledger.sign_object(
            JobRequest(
                chain_id=CHAIN_ID,
                created_ms=now_ms(),
                requirements=Requirements(gpus=1),
                max_price_per_gpu_second=100,
                max_wall_ms=5_000,
                deadline_ms=now_ms() + 60_000,
                bid_window_ms=1_000,
                manifest_digest=ledger.hash_of(JobManifest(("true",), (), ())),
                inputs_bytes=0,
            ),
            broke,
            CHAIN_ID,
        )
        job_id = ledger.hash_of(request)
        award = ledger.sign_object(
            Award(
                job_id=job_id,
                request=request,
                attempt=0,
                attempt_job_id=job_id,
                provider=provider.key.address,
                price_per_gpu_second=30,
                gpus=1,
                max_cost=request.max_cost(30),
                deadline_ms=now_ms() + 30_000,
                manifest=JobManifest(("true",), (), ()),
                group_id=job_id,
            ),
            broke,
            CHAIN_ID,
        )
        with pytest.raises(NetError, match="balance does not cover the escrow"):
            await cluster.requester.net.request(
                provider.net.local_peer_id, PROTOCOL_AWARD, ledger.encode(award), 10
            )
        assert provider.provider is not None
        assert not provider.provider.allocator.allocations(), "slots held for an unpayable award"
        assert provider.market.list(Role.PROVIDER) == [], "an unpayable award left a job behind"


async def test_provider_too_late_to_rerun_cancels_its_trade_unslashed(
    tmp_path: Path,
) -> None:
    # A 1 s slack: after the restart the deadline no longer fits a re-run of the job.
    config = MarketConfig.for_tests(attempt_slack_ms=1_000)
    async with open_cluster(tmp_path, config=config, providers=(("RTX4090:1", 30),)) as cluster:
        requester = cluster.requester
        provider = cluster.nodes[1]
        record = await requester.market.submit(
            copy_job(
                b"",
                argv=("sleep", "2"),
                inputs=(),
                max_wall_ms=3_000,
                deadline_ms=now_ms() + 10_000,
                outputs_bytes_max=0,  # no transfer allowance either: the slack is all there is
            )
        )
        aid = record.attempt_job_id
        await cluster.wait_state(provider, aid, {JobState.RUNNING}, 30, role=Role.PROVIDER)
        await cluster.stop_service(provider)
        # The service comes back "1.5 s later" by its clock: too late for a 3 s re-run.
        await cluster.start_service(provider, clock_ms=lambda: now_ms() + 1_500)
        side = await cluster.wait_state(provider, aid, {JobState.FAILED}, 30, role=Role.PROVIDER)
        assert "no time to re-run" in side.error, f"provider record: {side.to_json()}"
        record = await cluster.wait_state(requester, record.job_id, {JobState.REFUNDED}, 60)
        # The honest provider gave the trade up itself before the deadline: never slashed.
        trade = cluster.chain.trade(aid)
        assert trade is not None and trade.status is TradeStatus.CANCELLED, f"trade {trade}"
        assert not trade.slashed and cluster.chain.account(provider.key.address).slashed == 0
        assert "gave the job up" in record.error, f"requester record: {record.to_json()}"
        account = cluster.chain.account(requester.key.address)
        assert (account.balance, account.locked) == (BALANCE, 0), f"escrow not returned: {account}"


async def test_a_provider_stakes_up_to_its_configured_bond(tmp_path: Path) -> None:
    config = MarketConfig.for_tests(stake=3 * BOND)
    async with open_cluster(tmp_path, providers=(("RTX4090:1", 30),), config=config) as cluster:
        provider = cluster.nodes[1]
        await wait_until(
            lambda: cluster.chain.account(provider.key.address).bonded == 3 * BOND,
            30,
            "the provider tops its bond up to [market] stake",
        )
        account = cluster.chain.account(cluster.requester.key.address)
        assert account.bonded == BOND, "a node that does not provide staked"


async def test_verify_pays_the_majority_and_slashes_the_outvoted_provider(
    tmp_path: Path,
) -> None:
    async with open_cluster(tmp_path) as cluster:
        requester = cluster.requester
        cheat = cluster.nodes[1]  # the cheapest: picked first
        assert cheat.provider is not None
        executor = cheat.provider.executor
        honest_run = executor.run

        async def cheap_run(job_id: Any, spec: Any, allocation: Any) -> Any:
            # Cheap work: skip the job, write a plausible answer, seal and deliver it honestly.
            cheap = ("sh", "-c", 'echo cheap > "$GPUMESH_OUTPUT_DIR/out.txt"')
            return await honest_run(job_id, dataclasses.replace(spec, argv=cheap), allocation)

        executor.run = cheap_run  # type: ignore[method-assign]
        # A deterministic job (no GPU id in its output): honest replicas agree byte for byte.
        argv = ("sh", "-c", 'cat in.txt > "$GPUMESH_OUTPUT_DIR/out.txt"')
        submission = copy_job(b"the real answer\n", argv=argv, verify=2)
        record = await requester.market.submit(submission)
        assert record.group_id == record.job_id and record.verify == 2, record.to_json()

        def group() -> list[JobRecord]:
            return [r for r in requester.market.list(Role.REQUESTER) if r.group_id == record.job_id]

        await wait_until(
            lambda: all(r.state.terminal for r in group()) and len(group()) == 3,
            90,
            "every replica of the verified job ends (a mismatch gets one more run)",
        )
        replicas = group()
        states = [(r.state.label, r.error) for r in replicas]
        cheats = [r for r in replicas if r.terms and r.terms.provider == cheat.key.address]
        assert len(cheats) == 1, f"the cheat should have run one replica: {states}"
        assert cheats[0].state is JobState.OUTPUT_MISMATCH, f"not caught: {states}"
        assert "outvoted" in cheats[0].error and "slashed" in cheats[0].error, states
        honest = [r for r in replicas if r is not cheats[0]]
        assert all(r.state is JobState.DONE for r in honest), f"honest replicas: {states}"
        result = await requester.market.result(record.job_id)
        assert result.outputs == {"out.txt": b"the real answer\n"}, f"outputs {result.outputs}"
        account = cluster.chain.account(cheat.key.address)
        assert account.slashed == 1 and account.earned == 0, f"cheat not slashed: {account}"
        providers = {r.terms.provider for r in replicas if r.terms is not None}
        assert len(providers) == 3, "the replicas must run on distinct providers"
        for other in honest:
            trade = cluster.chain.trade(other.attempt_job_id)
            assert trade is not None and trade.status is TradeStatus.SETTLED, f"{trade}"


def write_instead(node: Any, text: str) -> None:
    """Make ``node``'s provider skip the job and deliver ``text`` as its output, honestly
    sealed (cheap work)."""
    executor = node.provider.executor
    honest_run = executor.run

    async def cheap_run(job_id: Any, spec: Any, allocation: Any) -> Any:
        cheap = ("sh", "-c", f'echo {text} > "$GPUMESH_OUTPUT_DIR/out.txt"')
        return await honest_run(job_id, dataclasses.replace(spec, argv=cheap), allocation)

    executor.run = cheap_run


async def test_verify_slashes_a_cheat_whose_replica_was_retried_on_another_provider(
    tmp_path: Path,
) -> None:
    """A cheat delivers wrong work and gives its trade up at once. Two replicas and the
    extra run deliver three roots, so its replica is retried on a fourth provider, whose
    delivery joins the majority: the cheat's delivery, of an earlier attempt of a replica
    that ends done, is still kept and slashed."""
    providers = (("RTX4090:2", 10), ("RTX4090:2", 20), ("RTX4090:2", 30), ("RTX4090:2", 40))
    async with open_cluster(tmp_path, providers=providers) as cluster:
        requester = cluster.requester
        cheat, wrong = cluster.nodes[1], cluster.nodes[2]  # the cheapest two: picked first
        write_instead(cheat, "cheap")
        write_instead(wrong, "also-wrong")

        def checked(aid: bytes) -> bool:
            records = requester.market.list(Role.REQUESTER)
            return any(d.job_id == aid for r in records for d in r.deliveries)

        async def bail_out(record: JobRecord) -> None:
            # No waiting for the ack: the trade is given up (Cancel, refunded in full) as soon
            # as the requester holds the signed delivery.
            await wait_until(lambda: checked(record.attempt_job_id), 30, "the delivery is checked")

        assert cheat.market.provider is not None
        cheat.market.provider.exchange.wait_ack = bail_out  # type: ignore[assignment,method-assign]
        argv = ("sh", "-c", 'cat in.txt > "$GPUMESH_OUTPUT_DIR/out.txt"')
        record = await requester.market.submit(copy_job(b"the answer\n", argv=argv, verify=2))

        def group() -> list[JobRecord]:
            return [r for r in requester.market.list(Role.REQUESTER) if r.group_id == record.job_id]

        await wait_until(
            lambda: len(group()) == 3 and all(r.state.terminal for r in group()),
            120,
            "every replica of the verified job ends",
        )
        replicas = group()
        states = [
            (r.state.label, r.error, [d.signer.hex()[:8] for d in r.deliveries]) for r in replicas
        ]
        retried = [r for r in replicas if any(d.signer == cheat.key.address for d in r.deliveries)]
        assert len(retried) == 1, f"the cheat should have delivered one replica: {states}"
        first, last = retried[0].deliveries[0], retried[0].deliveries[-1]
        assert first.signer == cheat.key.address and retried[0].attempt > 0, states
        assert last.signer not in (cheat.key.address, wrong.key.address), states
        assert retried[0].state is JobState.DONE, f"the retried replica: {states}"
        result = await requester.market.result(record.job_id)
        assert result.outputs == {"out.txt": b"the answer\n"}, f"outputs {result.outputs}"
        for node in (cheat, wrong):
            account = cluster.chain.account(node.key.address)
            assert account.slashed == 1 and account.earned == 0, f"{states}\n{account}"
        honest = [r for r in replicas if r.state is JobState.DONE]
        assert len(honest) == 2, f"two replicas of the majority settle: {states}"
        for other in honest:
            trade = cluster.chain.trade(other.attempt_job_id)
            assert trade is not None and trade.status is TradeStatus.SETTLED, f"{trade}"
            assert trade.terms.provider not in (cheat.key.address, wrong.key.address), states


async def test_cancelling_a_verified_job_cancels_every_replica(tmp_path: Path) -> None:
    async with open_cluster(tmp_path) as cluster:
        requester = cluster.requester
        submission = copy_job(b"", argv=("sleep", "30"), inputs=(), max_wall_ms=40_000, verify=2)
        record = await requester.market.submit(submission)

        def group() -> list[JobRecord]:
            return [r for r in requester.market.list(Role.REQUESTER) if r.group_id == record.job_id]

        await wait_until(
            lambda: len(group()) == 2 and all(r.state is JobState.RUNNING for r in group()),
            60,
            "both replicas run",
        )
        cancelled = await requester.market.cancel(record.job_id)
        assert cancelled.state is JobState.CANCELLED, f"cancel ended {cancelled.to_json()}"
        replicas = group()
        states = [(r.state.label, r.error) for r in replicas]
        assert len(replicas) == 2, f"a cancelled group runs no extra replica: {states}"
        assert all(r.state is JobState.CANCELLED for r in replicas), states
        # Each replica's trade is cancelled as a job run once: its provider is paid for the
        # time it held the job (pro rata) and the rest of the escrow comes back.
        paid = 0
        for replica in replicas:
            trade = cluster.chain.trade(replica.attempt_job_id)
            assert trade is not None and trade.status is TradeStatus.CANCELLED, f"{trade}"
            assert 0 < trade.paid < trade.terms.max_cost, f"pro rata pay: {trade}"
            paid += trade.paid
            provider = next(n for n in cluster.nodes if n.key.address == trade.terms.provider)
            side = await cluster.wait_state(
                provider, replica.attempt_job_id, {JobState.CANCELLED}, 10, role=Role.PROVIDER
            )
            assert side.result is None, "a cancelled replica must not have run to completion"
        account = cluster.chain.account(requester.key.address)
        fees = account.nonce * cluster.chain.params().fee_min
        assert (account.balance + paid + fees, account.locked) == (BALANCE, 0), (
            f"escrow not returned: {account}"
        )
