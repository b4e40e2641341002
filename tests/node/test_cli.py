"""The `gpumesh` CLI: its structure, and its commands against a live two-node testnet."""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from node import _testnet
from node.cli import build_parser, main
from node.commands import MODULES

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ROOT / "node" / "commands"


def leaf_parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for action in subs:
        for name, child in action.choices.items():
            yield from leaf_parsers(child, (*path, name))


def test_every_command_binds_its_own_handler() -> None:
    leaves = list(leaf_parsers(build_parser()))
    assert len(leaves) >= 27, f"only {len(leaves)} commands found"
    for path, parser in leaves:
        run = parser.get_default("run")
        assert callable(run), f"`gpumesh {' '.join(path)}` has no handler bound"


def test_command_modules_never_import_each_other() -> None:
    names = {m.__name__.rsplit(".", 1)[1] for m in MODULES}
    for module in MODULES:
        path = Path(module.__file__ or "")
        tree = ast.parse(path.read_text())
        for item in ast.walk(tree):
            if isinstance(item, ast.ImportFrom) and item.module:
                imported = item.module.split(".")
                if imported[:2] == ["node", "commands"] and len(imported) > 2:
                    assert imported[2] not in names, f"{path.name} imports {item.module}"
                assert item.module != "node.cli", f"{path.name} imports node.cli"
    # No dispatch chain that ends in "unhandled": handlers are bound where parsers are made.
    for path in [*COMMANDS.glob("*.py"), ROOT / "node" / "cli.py"]:
        assert "AssertionError" not in path.read_text(), f"{path.name} has an if-chain fallback"


def test_module_entry_point_prints_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "node", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    for command in ("init", "run", "status", "job", "chain", "send", "testnet"):
        assert command in out.stdout, f"--help does not list {command}"


def test_no_running_node_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--home", str(tmp_path)]) == 1
    assert "no running node" in capsys.readouterr().err
    assert main(["job", "submit", "--home", str(tmp_path), "--wait", "--", "true"]) == 1
    assert "no running node" in capsys.readouterr().err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> object:
    rc = main([*argv, "--json"])
    out = capsys.readouterr()
    assert rc == 0, f"gpumesh {' '.join(argv)} exited {rc}: {out.err}"
    return json.loads(out.out)


def test_status_peers_chain_and_offers(
    testnet: _testnet.TestnetLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    home = str(testnet.nodes[1].home)
    info = run_json(capsys, "status", "--home", home)
    assert isinstance(info, dict)
    assert info["chain_id"] == "node-test"
    assert info["address"] == testnet.nodes[1].address
    assert info["peer_count"] == 1
    peers = run_json(capsys, "peers", "--home", home)
    assert isinstance(peers, list) and len(peers) == 1
    head = run_json(capsys, "chain", "head", "--home", home)
    assert isinstance(head, dict) and head["height"] >= 1
    block = run_json(capsys, "chain", "block", str(head["height"]), "--home", home)
    assert isinstance(block, dict) and block["hash"] == head["hash"]
    account = run_json(capsys, "chain", "account", "--home", home)
    assert isinstance(account, dict) and account["balance"] > 0
    offers = run_json(capsys, "offers", "--home", home, "--model", "A100-80GB")
    assert isinstance(offers, list)
    assert [o["provider"] for o in offers] == [testnet.nodes[0].address]
    # The table forms print without failing and show what they were asked for.
    assert main(["offers", "--home", home]) == 0
    assert "A100-80GB x1" in capsys.readouterr().out


def test_job_submit_wait_follows_every_state_to_done(
    testnet: _testnet.TestnetLayout, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    home = str(testnet.nodes[1].home)
    script = tmp_path / "job.sh"
    script.write_text("mkdir -p out && echo 42 > out/answer.txt && echo computed\n")
    rc = main(
        [
            "job",
            "submit",
            "--home",
            home,
            "--gpus",
            "1",
            "--bid-window",
            "300ms",
            "--input",
            str(script),
            "--output-dir",
            str(tmp_path / "results"),
            "--wait",
            "--",
            "sh",
            "job.sh",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, f"the job did not end done:\n{out.err}\n{out.out}"
    # Following the jobs topic sees every state; a poll would skip the short-lived ones.
    seen = [line.split("[", 1)[1].split("]", 1)[0] for line in out.err.splitlines() if "[" in line]
    assert seen == ["bidding", "awarded", "locked", "running", "settling", "done"], out.err
    assert "computed" in out.out
    assert (tmp_path / "results" / "answer.txt").read_text().strip() == "42"
    jobs = run_json(capsys, "job", "list", "--home", home, "--role", "requester")
    assert isinstance(jobs, list) and [j["state"] for j in jobs] == ["done"]


def test_send_wait_returns_the_committed_transfer(
    testnet: _testnet.TestnetLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    home = str(testnet.nodes[1].home)
    to = testnet.nodes[0].address
    before = run_json(capsys, "chain", "account", to, "--home", home)
    assert isinstance(before, dict)
    done = run_json(capsys, "send", to, "7", "--fee", "1", "--wait", "--home", home)
    assert isinstance(done, dict)
    assert done["state"] == "committed" and done["ok"], done
    assert done["tx"]["amount"] == 7
    after = run_json(capsys, "chain", "account", to, "--home", home)
    assert isinstance(after, dict)
    assert after["balance"] >= before["balance"] + 7


def test_rpc_command_and_its_errors(
    testnet: _testnet.TestnetLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    home = str(testnet.nodes[0].home)
    assert main(["rpc", "--home", home, "net_peerCount"]) == 0
    assert json.loads(capsys.readouterr().out) == 1
    assert main(["rpc", "--home", home, "net_peerCount", "{nope"]) == 1
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["rpc", "--home", home, "no_suchMethod"]) == 1
    assert "-32601" in capsys.readouterr().err


def test_dashboard_prints_the_url_with_the_token_in_the_fragment(
    testnet: _testnet.TestnetLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    home = testnet.nodes[0].home
    assert main(["dashboard", "--home", str(home)]) == 0
    url = capsys.readouterr().out.strip()
    port = (Path(home) / "rpc.port").read_text().strip()
    token = (Path(home) / "rpc.cookie").read_text().strip()
    assert url == f"http://127.0.0.1:{port}/#token={token}"


def test_service_install_writes_a_unit_systemd_accepts(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert main(["init", "--home", str(home), "--no-mdns"]) == 0
    units = tmp_path / "units"
    assert main(["service", "install", "--home", str(home), "--unit-dir", str(units)]) == 0
    unit = (units / "gpumesh.service").read_text()
    assert f"ExecStart={sys.executable} -m node run --home {home.resolve()}" in unit
    for line in ("Restart=on-failure", "TimeoutStopSec=30s", "KillSignal=SIGTERM"):
        assert line in unit, f"the unit lacks {line}"
    assert f"Environment=GPUMESH_HOME={home.resolve()}" in unit
    assert oct((units / "gpumesh.service").stat().st_mode & 0o777) == "0o644"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing: cannot check the unit")
        pytest.skip("systemd-analyze is not installed")
    checked = subprocess.run(
        [analyze, "verify", str(units / "gpumesh.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [
        line
        for line in checked.stderr.splitlines()
        if "gpumesh.service" in line and "Failed to" not in line
    ]
    assert not problems, checked.stderr


def test_service_refuses_a_directory_that_is_not_a_home(tmp_path: Path) -> None:
    assert main(["service", "unit", "--home", str(tmp_path)]) == 1
