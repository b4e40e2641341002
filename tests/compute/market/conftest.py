"""Shared settings for the market tests (they run real libp2p meshes)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/compute/market/" in str(item.fspath):
            # py-libp2p 0.8.1 leaves some TCP sockets for the garbage collector when a host
            # stops while peers are connected (see tests/p2p/conftest.py); not ours to fix.
            item.add_marker(pytest.mark.filterwarnings("ignore::ResourceWarning"))
            item.add_marker(
                pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
            )


@pytest.fixture(autouse=True)
def _collect_libp2p_garbage() -> Iterator[None]:
    # Collect inside the test, where the filters above apply, not at session end.
    yield
    import gc

    for _ in range(3):
        gc.collect()
