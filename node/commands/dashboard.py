"""`gpumesh dashboard`: the URL of the node's dashboard and explorer, token in the fragment.

The fragment (after ``#``) never leaves the browser, so the token is not sent to the server in
the request line or logged anywhere; the page reads it and then replaces the fragment. Like
Jupyter, this prints the URL and opens nothing.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from node.commands._common import add_command, endpoint

if TYPE_CHECKING:
    import argparse

    from node.commands._common import Subparsers


def register(sub: Subparsers) -> None:
    add_command(sub, "dashboard", cmd_dashboard, help="print the URL of this node's dashboard")


def dashboard_url(origin: str, token: str, page: str = "") -> str:
    """``origin/#token=...`` (and ``&page=/route`` to open on a page)."""
    return f"{origin}/#token={token}" + (f"&page={page}" if page else "")


def cmd_dashboard(args: argparse.Namespace) -> int:
    origin, token = endpoint(args.home)
    url = dashboard_url(origin, token)
    if args.json:
        print(json.dumps({"url": url}))
    else:
        print(url)
    return 0
