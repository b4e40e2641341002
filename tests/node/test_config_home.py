from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from node import ConfigError, Home, HomeError, NodeConfig
from node._logging import JsonFormatter, parse_levels


def test_config_round_trips_through_toml(tmp_path: Path) -> None:
    config = NodeConfig.for_tests().replace(p2p={"bootstrap": ("/ip4/127.0.0.1/tcp/1/p2p/Qm",)})
    path = tmp_path / "config.toml"
    path.write_text(config.to_toml())
    assert NodeConfig.load(path) == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[p2p]\nlisten_port = 70000\n", r"\[p2p\] listen_port"),
        ('[p2p]\nlisten_host = "0.0.0.0"\n', r"\[p2p\] listen_host"),
        ('[p2p]\nmdns = "yes"\n', r"\[p2p\] mdns must be true or false"),
        ("[rpc]\nbogus = 1\n", r"\[rpc\] unknown key 'bogus'"),
        ("[nope]\n", r"unknown section \[nope\]"),
        ("[p2p\n", "not valid TOML"),
        ('[p2p]\nbootstrap = ["127.0.0.1:80"]\n', r"\[p2p\] bootstrap entry"),
    ],
)
def test_bad_config_names_section_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        NodeConfig.load(path)


def test_init_writes_private_key_and_refuses_to_overwrite(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    key = home.init(NodeConfig.for_tests())
    mode = stat.S_IMODE(home.key_path.stat().st_mode)
    assert mode == 0o600, f"key file mode is {mode:o}, want 600"
    assert home.load_key().address == key.address
    with pytest.raises(HomeError, match="refusing to overwrite"):
        home.init(NodeConfig.for_tests())
    assert home.load_key().address == key.address, "init must not replace an existing key"


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    home.init(NodeConfig.for_tests())
    os.chmod(home.key_path, 0o644)
    with pytest.raises(HomeError, match="readable by others"):
        home.load_key()


def test_second_daemon_on_same_home_is_refused(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    home.init(NodeConfig.for_tests())
    with home.lock():
        with pytest.raises(HomeError, match="another gpumesh daemon"):
            with Home(tmp_path / "h").lock():
                pass
    with home.lock():  # released on exit: a restart may take it again
        pass


def test_json_log_lines_carry_extra_fields() -> None:
    record = logging.makeLogRecord(
        {"name": "p2p", "levelno": logging.INFO, "levelname": "INFO", "msg": "peer up", "peer": "x"}
    )
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "peer up"
    assert entry["logger"] == "p2p"
    assert entry["peer"] == "x"


def test_log_level_spec() -> None:
    assert parse_levels("info,p2p=debug") == {"": logging.INFO, "p2p": logging.DEBUG}
    with pytest.raises(ValueError, match="unknown log level"):
        parse_levels("info,p2p=chatty")
