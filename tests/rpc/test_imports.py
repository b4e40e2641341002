"""rpc imports nothing else of gpumesh, and asyncio/aiohttp stay in the asyncio-side module."""

from __future__ import annotations

import ast
from pathlib import Path

package_dir = Path(__file__).resolve().parents[2] / "rpc"
ours = {"node", "p2p", "consensus", "ledger", "compute"}
asyncio_side = {"_app.py"}


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_rpc_imports_nothing_of_ours_and_keeps_asyncio_in_one_module() -> None:
    files = sorted(package_dir.glob("*.py"))
    assert files, f"no sources found in {package_dir}"
    for path in files:
        roots = imported_roots(path)
        assert not roots & ours, f"{path.name} imports {sorted(roots & ours)}"
        if path.name not in asyncio_side:
            assert not roots & {"asyncio", "aiohttp"}, f"{path.name} imports asyncio/aiohttp"
