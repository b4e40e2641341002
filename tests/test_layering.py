"""The declared layering (docs/ARCHITECTURE.md), checked on every import statement we write."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"node", "p2p", "consensus", "ledger", "compute", "rpc"}
ALLOWED: dict[str, set[str]] = {
    "ledger": set(),
    "p2p": set(),
    "rpc": set(),
    "consensus": {"ledger"},
    "compute": {"ledger"},
    "node": OURS - {"node"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for item in ast.walk(tree):
        if isinstance(item, ast.Import):
            found.update(alias.name.split(".")[0] for alias in item.names)
        elif isinstance(item, ast.ImportFrom) and item.level == 0 and item.module:
            found.add(item.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_its_layer_allows(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"package {package} has no modules"
    for path in files:
        foreign = imported_packages(path) - ALLOWED[package] - {package}
        assert not foreign, f"{path.relative_to(ROOT)} imports {sorted(foreign)}: not allowed"


def test_asyncio_stays_inside_rpc() -> None:
    for package in OURS - {"rpc"}:
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for item in ast.walk(tree):
                names: list[str] = []
                if isinstance(item, ast.Import):
                    names = [a.name for a in item.names]
                elif isinstance(item, ast.ImportFrom) and item.module:
                    names = [item.module]
                bad = [n for n in names if n.split(".")[0] in ("asyncio", "aiohttp")]
                assert not bad, f"{path.relative_to(ROOT)} imports {bad}: asyncio stays in rpc/"
