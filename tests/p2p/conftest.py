"""Shared settings for the p2p tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/p2p/" in str(item.fspath):
            # py-libp2p 0.8.1 leaves some TCP sockets for the garbage collector when a host
            # stops while peers are connected (its swarm closes muxers, not raw sockets);
            # not ours to fix, and they are closed by GC.
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
