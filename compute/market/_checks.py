"""Pure checks of what a requester asks a provider to run: the manifest and its input names.

Both sides run the same checks: the requester at submit (a user mistake fails at once) and the
provider on the award, before it takes a slot (a hostile requester that skips its own checks is
refused). Nothing here does I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ledger
from compute._sandbox import JobSpec
from compute.exceptions import ComputeError
from compute.market.exceptions import InvalidManifest
from compute.market.types import (
    argv_items_max,
    env_items_max,
    input_files_max,
    manifest_bytes_max,
)

if TYPE_CHECKING:
    from compute.market.types import JobManifest

input_name_bytes_max = 1024
input_name_part_bytes_max = 255
"""One path component (the usual file-system NAME_MAX)."""
input_depth_max = 16
OUTPUT_DIR = "out"
"""The job's output directory, relative to its work directory: no input may be it or under it."""


def check_input_name(name: str) -> str:
    """Return ``name`` if it is a safe input path (relative, normalised, no ``..``, not the
    output directory or under it, bounded); raise ``InvalidManifest`` naming the rule broken."""
    shown = repr(name[:64])
    if not isinstance(name, str) or not name:
        raise InvalidManifest("an input name is empty")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidManifest(f"input name {shown} is not valid UTF-8") from None
    if len(encoded) > input_name_bytes_max:
        raise InvalidManifest(f"input name {shown} is over {input_name_bytes_max} bytes")
    if "\0" in name or "\\" in name:
        raise InvalidManifest(f"input name {shown} contains NUL or a backslash")
    if name.startswith("/"):
        raise InvalidManifest(f"input name {shown} must be relative")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidManifest(f"input name {shown} must be normalised, with no '.' or '..'")
    if len(parts) > input_depth_max:
        raise InvalidManifest(f"input name {shown} is deeper than {input_depth_max} levels")
    if any(len(part.encode()) > input_name_part_bytes_max for part in parts):
        raise InvalidManifest(f"input name {shown} has a part over {input_name_part_bytes_max} B")
    if parts[0] == OUTPUT_DIR:
        raise InvalidManifest(f"input name {shown} is the output directory or under it")
    return name


def check_input_names(names: list[str] | tuple[str, ...]) -> None:
    """Every name is safe, none repeats, and none is a directory of another (``a`` and
    ``a/b`` cannot both be files)."""
    if len(names) > input_files_max:
        raise InvalidManifest(f"more than {input_files_max} input files")
    seen: set[str] = set()
    for name in names:
        check_input_name(name)
        if name in seen:
            raise InvalidManifest(f"input {name[:64]!r} is given twice")
        seen.add(name)
    for name in names:
        parts = name.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in seen:
                raise InvalidManifest(f"input {name[:64]!r} lies under another input file")


def check_manifest(manifest: JobManifest, inputs_bytes_max: int) -> None:
    """Everything a provider needs to trust about a manifest before it takes a slot."""
    if not (0 if manifest.image else 1) <= len(manifest.argv) <= argv_items_max:
        raise InvalidManifest(f"the command must have 1..{argv_items_max} arguments")
    if not all(isinstance(arg, str) for arg in manifest.argv):
        raise InvalidManifest("every argument must be a string")
    if len(manifest.env) > env_items_max:
        raise InvalidManifest(f"at most {env_items_max} environment variables")
    check_input_names(tuple(ref.name for ref in manifest.inputs))
    for ref in manifest.inputs:
        if len(ref.root) != 32 or ref.size_bytes < 0:
            raise InvalidManifest(f"input {ref.name[:64]!r} has a bad digest or size")
    total = sum(ref.size_bytes for ref in manifest.inputs)
    if total > inputs_bytes_max:
        raise InvalidManifest(f"inputs are {total} bytes; the limit is {inputs_bytes_max}")
    image = "" if manifest.image is None else f"sha256:{manifest.image.manifest_sha256.hex()}"
    try:
        # The sandbox's own rules (argument and environment limits, reserved names).
        spec = JobSpec(
            argv=tuple(manifest.argv),
            inputs=tuple((ref.name, b"") for ref in manifest.inputs),
            env=tuple(manifest.env),
            image=image,
        )
        spec.validate()
    except ComputeError as exc:
        raise InvalidManifest(str(exc)) from exc
    if len(ledger.encode(manifest)) > manifest_bytes_max:
        raise InvalidManifest(f"the command and input names exceed {manifest_bytes_max} bytes")
