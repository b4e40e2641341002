"""The `gpumesh` subcommands, one module per group; each module's ``register`` adds its own.

Where things live:
- ``_common``: what every module shares (``--home``/``--json``, the RPC call, output, parsing
  sizes and durations, WebSocket subscriptions). Modules import it, never each other.
- ``daemon``: ``init``, ``run``, ``dev``.
- ``info``: ``status``, ``peers``, ``gpus``, ``offers``, ``rpc``.
- ``chain``: ``chain head|block|tx|account|status`` and ``send``.
- ``job``: ``job submit|status|result|logs|cancel|list`` (``submit --wait`` follows the
  ``jobs`` topic).
- ``testnet``: ``testnet init|up|down|status``.
- ``image``: ``image import|ls|rm``, the node's container image store.
- ``dashboard``: the URL of the node's dashboard (token in the fragment).
- ``service``: the systemd unit (``service unit``, ``service install``).

A command's handler is bound with ``set_defaults(run=...)`` where its parser is made, so
``node.cli`` dispatches with ``args.run(args)`` and no table of names to keep in step.
"""

from __future__ import annotations

from node.commands import chain, daemon, dashboard, image, info, job, service, testnet

MODULES = (daemon, info, chain, job, image, testnet, dashboard, service)
"""In the order ``gpumesh --help`` lists them."""

__all__ = ["MODULES"]
