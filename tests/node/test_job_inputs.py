"""`gpumesh job submit --input FILE|DIR`: what the CLI hands the daemon (names -> absolute
paths, never the bytes), and the long call timeout of job_submit."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.commands.job import input_paths
from node.exceptions import NodeError
from rpc import MethodRegistry
from rpc._registry import RegistryError


def test_a_file_is_named_by_its_base_name_and_a_directory_by_paths_under_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "big.bin").write_bytes(b"x")
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_bytes(b"a")
    (data / "sub" / "b.txt").write_bytes(b"b")
    monkeypatch.chdir(tmp_path)
    found = input_paths(["big.bin", "data"])
    assert found == {
        "big.bin": str(tmp_path / "big.bin"),
        "data/a.txt": str(data / "a.txt"),
        "data/sub/b.txt": str(data / "sub" / "b.txt"),
    }
    assert all(Path(p).is_absolute() for p in found.values()), "the daemon gets absolute paths"


def test_inputs_that_collide_or_do_not_exist_are_refused(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "one" / "x").write_bytes(b"1")
    (tmp_path / "two" / "x").write_bytes(b"2")
    with pytest.raises(NodeError, match="both named 'x'"):
        input_paths([str(tmp_path / "one" / "x"), str(tmp_path / "two" / "x")])
    with pytest.raises(NodeError, match="not a file or a directory"):
        input_paths([str(tmp_path / "missing")])


def test_too_many_files_in_a_directory_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("node.commands.job.input_files_max", 3)
    for i in range(5):
        (tmp_path / f"f{i}").write_bytes(b"")
    with pytest.raises(NodeError, match="more than 3"):
        input_paths([str(tmp_path)])


def test_a_method_may_have_its_own_call_timeout() -> None:
    async def handler() -> int:
        return 1

    registry = MethodRegistry()
    method = registry.register("node_slow", handler, description="x", call_timeout_s=600.0)
    assert method.call_timeout_s == 600.0
    assert registry.register("node_fast", handler, description="x").call_timeout_s is None
    with pytest.raises(RegistryError, match="call_timeout_s"):
        registry.register("node_bad", handler, description="x", call_timeout_s=0)
