"""Per-subsystem log levels take effect for every package's loggers, and each record prints once."""

from __future__ import annotations

import io
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import compute._sandbox
import consensus._driver
import p2p._mesh
import p2p._reqresp
from ledger import SigningKey
from node import Home, NodeConfig
from node._logging import setup_logging
from node._testnet import genesis_document, peer_id_of
from node.testing import free_port_block, wait_until
from p2p import Mesh, P2PConfig


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """Whatever setup_logging writes, as JSON lines; the logging tree restored afterwards."""
    root = logging.getLogger()
    libp2p = logging.getLogger("libp2p")
    saved = (root.handlers[:], root.level, libp2p.handlers[:], libp2p.level, libp2p.propagate)
    levels = {
        name: logger.level
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    stream = io.StringIO()
    try:
        yield stream
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        libp2p.handlers[:], libp2p.level, libp2p.propagate = saved[2], saved[3], saved[4]
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def messages(stream: io.StringIO) -> list[object]:
    return [r["msg"] for r in records(stream)]


def test_subsystem_levels_reach_every_package_and_libp2p_prints_once(logs: io.StringIO) -> None:
    setup_logging("json", "warning,p2p=debug,compute=error,libp2p=warning", stream=logs)
    # The mesh is made after logging is set up, as in the daemon; it must not re-route libp2p.
    Mesh(b"\x01" * 32, "log-test", P2PConfig.for_tests())

    p2p._mesh.logger.debug("p2p mesh debug")
    p2p._reqresp.logger.debug("p2p reqresp debug")
    compute._sandbox.log.warning("compute warning")
    compute._sandbox.log.error("compute error")
    consensus._driver.log.info("consensus info")
    consensus._driver.log.warning("consensus warning")
    logging.getLogger("node.chain").info("node info")
    logging.getLogger("libp2p.network.swarm").warning("libp2p swarm warning")
    logging.getLogger("libp2p.pubsub.gossipsub").warning("libp2p pubsub warning")
    logging.getLogger("libp2p.host").info("libp2p info")

    assert messages(logs) == [
        "p2p mesh debug",
        "p2p reqresp debug",
        "compute error",
        "consensus warning",
        "libp2p swarm warning",
        "libp2p pubsub warning",
    ], "each record the spec lets through must print exactly once, and no other"


def test_libp2p_is_quiet_by_default_and_levels_can_be_reset(logs: io.StringIO) -> None:
    Mesh(b"\x02" * 32, "log-test", P2PConfig.for_tests())  # before logging, as in a test run
    setup_logging("json", "info", stream=logs)
    logging.getLogger("libp2p.network").error("routine disconnect")
    logging.getLogger("libp2p.network").critical("libp2p critical")
    p2p._mesh.logger.debug("p2p debug")
    p2p._mesh.logger.info("p2p info")
    compute._sandbox.log.info("compute info")
    assert messages(logs) == ["libp2p critical", "p2p info", "compute info"]

    logs.seek(0)
    logs.truncate()
    setup_logging("json", "error,compute.sandbox=debug", stream=logs)
    p2p._mesh.logger.info("p2p info again")
    compute._sandbox.log.debug("sandbox debug")
    assert messages(logs) == ["sandbox debug"], "a second setup must replace the first's levels"


def test_a_running_node_logs_p2p_debug_when_asked(tmp_path: Path) -> None:
    """The daemon with `--log-level warning,p2p=debug`: p2p's debug lines, no node info lines."""
    base = free_port_block(2)
    home = Home(tmp_path / "home")
    absent = SigningKey.generate()
    config = NodeConfig.for_tests().replace(
        node={"chain_id": "log-test"},
        p2p={
            "listen_port": base,
            "mdns": False,
            "bootstrap": (f"/ip4/127.0.0.1/tcp/{base + 1}/p2p/{peer_id_of(absent)}",),
        },
        rpc={"port": 0},
    )
    key = home.init(config)

    home.genesis_path.write_text(json.dumps(genesis_document("log-test", [key], 1)))
    log_path = tmp_path / "node.log"
    with log_path.open("w") as out:
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "node",
                "run",
                "--home",
                str(home.root),
                "--log-format",
                "json",
                "--log-level",
                "warning,p2p=debug",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def p2p_debug() -> list[dict[str, object]]:
            lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]
            return [r for r in lines if r["level"] == "debug" and "p2p" in str(r["logger"])]

        found = wait_until(p2p_debug, timeout_s=60, what="a p2p debug line (a failed dial)")
        assert any("dial" in str(r["msg"]) for r in found), found
    finally:
        daemon.send_signal(signal.SIGINT)
        daemon.wait(timeout=30)
    lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]
    assert not [r for r in lines if r["level"] == "info"], "root level warning: no info lines"


def test_a_bad_level_is_a_clear_error_before_the_daemon_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], logs: io.StringIO
) -> None:
    from node.cli import main

    home = tmp_path / "home"
    assert main(["init", "--home", str(home), "--no-mdns"]) == 0
    capsys.readouterr()
    assert main(["run", "--home", str(home), "--log-level", "info,p2p=loud"]) == 1
    err = capsys.readouterr().err
    assert "--log-level" in err and "unknown log level 'loud'" in err, err
    assert not (home / "rpc.port").exists(), "the daemon must not have started"
