"""`gpumesh service unit|install`: run the node under systemd.

The unit runs ``python -m node run`` from the Python that runs this command (so a virtualenv
install keeps working), as the given user, with the home in ``GPUMESH_HOME``. It restarts the
node when it fails, gives it ``stop_timeout_s`` to leave its peers cleanly on SIGTERM (the
daemon needs about 5 s), and leaves the sandbox its privileges: a provider node switches each
job to its own uid and cgroup, which hardening options such as ``NoNewPrivileges`` or
``ProtectSystem=strict`` would break. ``install`` writes the file and prints the systemctl
commands; it never starts or enables anything itself.
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final

from node._home import Home
from node.commands._common import add_command
from node.exceptions import NodeError

if TYPE_CHECKING:
    import argparse

    from node.commands._common import Subparsers

stop_timeout_s: Final = 30
"""systemd's TimeoutStopSec: SIGTERM, then SIGKILL after this (the daemon needs ~5 s)."""
restart_delay_s: Final = 5
unit_dir_default: Final = Path("/etc/systemd/system")
open_files_max: Final = 65536
"""LimitNOFILE: one socket per peer, stream and RPC connection, plus LevelDB's files."""


def register(sub: Subparsers) -> None:
    p = sub.add_parser("service", help="run the node as a systemd service")
    ssub = p.add_subparsers(dest="service_command", required=True, metavar="ACTION")
    for name, run, text in (
        ("unit", cmd_unit, "print the systemd unit for this home"),
        ("install", cmd_install, "write the systemd unit (then enable it with systemctl)"),
    ):
        s = add_command(ssub, name, run, help=text, json=False)
        s.add_argument("--user", default=None, help="run as this user (default: you)")
        s.add_argument("--name", default="gpumesh", help="unit name (default: gpumesh)")
        if name == "install":
            s.add_argument("--unit-dir", type=Path, default=unit_dir_default)


def unit_text(home: Path, user: str, python: str) -> str:
    """The unit file for a node at ``home`` run by ``user`` with the interpreter ``python``."""
    for value, what in ((str(home), "home"), (user, "user"), (python, "python")):
        if any(c.isspace() or c in "\"'\\%$;" for c in value):
            raise NodeError(f"the {what} {value!r} cannot go into a unit file unquoted")
    return f"""# Written by `gpumesh service`; see docs/operating.md (install, upgrade, backups).
[Unit]
Description=gpumesh node ({home})
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={user}
Environment=GPUMESH_HOME={home}
Environment=PYTHONUNBUFFERED=1
ExecStart={python} -m node run --home {home}
Restart=on-failure
RestartSec={restart_delay_s}s
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec={stop_timeout_s}s
LimitNOFILE={open_files_max}

[Install]
WantedBy=multi-user.target
"""


def _unit_for(args: argparse.Namespace) -> str:
    home = Home(args.home).root.resolve()
    if not (home / "config.toml").exists():
        raise NodeError(f"{home} is not a node home (create it with `gpumesh init --home {home}`)")
    return unit_text(home, args.user or getpass.getuser(), sys.executable)


def cmd_unit(args: argparse.Namespace) -> int:
    print(_unit_for(args), end="")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    text = _unit_for(args)
    target = Path(args.unit_dir) / f"{args.name}.service"
    try:
        Path(args.unit_dir).mkdir(parents=True, exist_ok=True)
        temporary = target.with_suffix(".service.tmp")
        temporary.write_text(text)
        os.chmod(temporary, 0o644)
        temporary.replace(target)
    except OSError as exc:
        raise NodeError(
            f"cannot write {target}: {exc} (run as root for {unit_dir_default})"
        ) from None
    print(f"wrote {target}")
    print(
        f"start it now and at boot:  systemctl daemon-reload && systemctl enable --now {args.name}"
    )
    print(f"follow its logs:           journalctl -u {args.name} -f")
    return 0
