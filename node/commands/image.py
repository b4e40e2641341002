"""`gpumesh image import|ls|rm`: the node's container image store.

``import`` hands the daemon the archive's absolute path (never its bytes: the daemon reads the
file on the same machine); a long import outlives one RPC call, so the command calls again
with the same path until the daemon says it is done.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node._tables import render_table
from node.commands._common import add_command, call, emit
from node.exceptions import NodeError

if TYPE_CHECKING:
    import argparse

    from node.commands._common import Subparsers

import_wait_s = 3600.0
"""The longest ``image import`` waits for the daemon (each call waits up to 20 s)."""


def register(sub: Subparsers) -> None:
    p = sub.add_parser("image", help="container images jobs can run in")
    isub = p.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    i = add_command(
        isub,
        "import",
        cmd_import,
        help="import an OCI image archive or a `docker save` archive; prints its reference",
    )
    i.add_argument("file", type=Path)
    add_command(isub, "ls", cmd_ls, help="the images in this node's store")
    r = add_command(isub, "rm", cmd_rm, help="remove an image (reference or 12+ hex prefix)")
    r.add_argument("ref")


def cmd_import(args: argparse.Namespace) -> int:
    path = args.file.expanduser().absolute()
    if not path.is_file():
        raise NodeError(f"{path}: no such file")
    deadline = time.monotonic() + import_wait_s
    result: dict[str, Any] = call(args.home, "image_import", {"path": str(path)})
    while not result.get("done"):
        if time.monotonic() > deadline:
            raise NodeError(f"the node is still importing {path} after {import_wait_s:.0f} s")
        result = call(args.home, "image_import", {"path": str(path)})
    return emit(args, result, str(result["ref"]))


def cmd_ls(args: argparse.Namespace) -> int:
    images: list[dict[str, Any]] = call(args.home, "image_list")
    rows = [
        [
            str(image["ref"]).removeprefix("sha256:")[:12],
            str(image["source"]) + (" (mesh)" if image.get("origin") == "mesh" else ""),
            str(len(image["layers"])),
            _mib(image["blob_bytes"]),
            _mib(image["unpacked_bytes"]),
            " ".join(image["config"]["entrypoint"] + image["config"]["cmd"])[:40],
            time.strftime("%Y-%m-%d %H:%M", time.localtime(image["imported_at_ms"] / 1000)),
        ]
        for image in images
    ]
    headers = ["IMAGE", "FROM", "LAYERS", "SIZE", "UNPACKED", "COMMAND", "IMPORTED"]
    text = render_table(headers, rows) if rows else "no images (gpumesh image import FILE)"
    return emit(args, images, text)


def cmd_rm(args: argparse.Namespace) -> int:
    removed = call(args.home, "image_remove", {"ref": args.ref})
    return emit(args, removed, f"removed {removed['ref']}")


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
