"""The ``xpopt`` command.

Subcommands live in their own modules, imported here; those modules import
no array framework at import time (each framework is imported inside the
command that runs it), so ``import xpopt.cli`` and ``xpopt --help`` stay fast.

Bad input exits 2 with argparse's usage and one ``xpopt CMD: error: ...``
line that names the option and the fix; ``--help`` shows every default.
"""

from __future__ import annotations

import argparse
import sys

from ._version import __version__
from .commands._env import HelpFormatter


def _add_validate(sub) -> None:
    from .commands import validate

    p = sub.add_parser(
        "validate",
        help="train one small model on every installed backend and check they agree",
        description=validate.DESCRIPTION,
        formatter_class=HelpFormatter,
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
        p = sub.add_parser(name, help=help_, description=desc, formatter_class=HelpFormatter)
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


#: BLAS libraries' thread-count variables (OpenBLAS, including numpy's scipy-openblas; MKL).
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _single_threaded_blas() -> None:
    """``xpopt validate``: NumPy's BLAS on one thread unless the environment says otherwise.

    The model's matrices are at most 64 x 128, too small for BLAS threads to pay,
    and on a busy machine their spin-waits stall every product (measured on 2
    shared cores: the float64 Kron oracle 1.8 steps/s with OpenBLAS's 2 threads,
    41 with one; Muon's 3.5 vs 229).  The variables are read when NumPy loads,
    so this only acts when it has not been imported yet (``python -m xpopt``).
    """
    import os

    if "numpy" not in sys.modules:
        for var in BLAS_THREAD_VARS:
            os.environ.setdefault(var, "1")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (argparse's 2 for bad arguments).

    argparse prints its own message before it exits (usage errors, ``--help``);
    a ``SystemExit`` carrying a message instead of a code is printed here, so
    nothing exits silently.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["validate"]:
        _single_threaded_blas()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        args._argv = argv   # recorded in the JSON outputs' settings
        return args.func(args)
    except SystemExit as e:  # argparse: --help/--version (0), usage errors (2)
        code = e.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(f"xpopt: error: {code}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
