"""The node: config and home directory, the daemon that composes every subsystem, the CLI.

Where things live:
- ``_config``: ``NodeConfig`` and its sections (config.toml), validated on load.
- ``_home``: the home directory layout, the node key (0600), the one-daemon lock.
- ``_daemon``: ``Node`` (composes p2p, consensus, ledger, compute, rpc) and ``serve``.
- ``_testnet``: local multi-node testnets (`gpumesh testnet ...`).
- ``_logging``: plain or JSON structured logs with per-subsystem levels.
- ``_metrics``: ``NodeMetrics``, every service's counters in Prometheus form (``/metrics``).
- ``_explorer``: ``ExplorerIndex``, per-account indexes and the paged explorer RPC methods.
- ``cli``: the `gpumesh` command, built from ``commands`` (one module per group of
  subcommands, each registering its own).

``node`` is the only package that imports all the others.
"""

from node._config import NodeConfig
from node._home import Home
from node.exceptions import ConfigError, HomeError, NodeError, TestnetError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Home",
    "HomeError",
    "NodeConfig",
    "NodeError",
    "TestnetError",
    "__version__",
]
