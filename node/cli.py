"""The `gpumesh` command line: set up, run and talk to a node, and run local testnets.

Each group of subcommands lives in its own module under ``node.commands`` and registers itself;
this module only builds the parser from them and runs the chosen command.
"""

from __future__ import annotations

import argparse
import sys

from node.commands import MODULES
from node.exceptions import NodeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpumesh", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except NodeError as exc:
        print(f"gpumesh: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `gpumesh ... | head` closed the pipe: not an error
        sys.stderr.close()
        return 0
