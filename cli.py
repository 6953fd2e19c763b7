"""The ``xpopt`` command.

Subcommands live in their own modules, imported here; those modules import
no array framework at import time (each framework is imported inside the
command that runs it), so ``import xpopt.cli`` and ``xpopt --help`` stay fast.
"""

from __future__ import annotations

import argparse
import sys

from ._version import __version__


def _add_validate(sub) -> None:
    from . import validate

    p = sub.add_parser(
        "validate",
        help="train one small model on every installed backend and check they agree",
        description=validate.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    validate.add_arguments(p)
    p.set_defaults(func=validate.run_validate, _parser=p)


def _add_mup(sub) -> None:
    from .commands import mup_cli

    for name, help_, desc, add, run in [
        ("coordcheck", "muP coordinate check: activation slopes vs width (PNG, table, exit code)",
         mup_cli.COORD_DESCRIPTION, mup_cli.add_coord_arguments, mup_cli.run_coordcheck),
        ("transfer", "muP LR transfer: best LR per width over a log2 grid (PNG, table, exit code)",
         mup_cli.TRANSFER_DESCRIPTION, mup_cli.add_transfer_arguments, mup_cli.run_transfer),
    ]:
        p = sub.add_parser(name, help=help_, description=desc, formatter_class=argparse.RawDescriptionHelpFormatter)
        add(p)
        p.set_defaults(func=run, _parser=p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xpopt",
        description="Muon and friends with the same numbers in PyTorch, JAX, CuPy and NumPy.",
        epilog="Run 'xpopt COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"xpopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_validate(sub)
    _add_mup(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (argparse's 2 for bad arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        return args.func(args)
    except SystemExit as e:  # argparse: --help/--version (0), usage errors (2)
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 2)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
