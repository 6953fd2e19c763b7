"""What the ``xpopt`` commands share: option types, the ``--out`` check, help defaults and
the ``settings`` block every JSON output carries.

Nothing here imports an array framework (versions come from the installed
distributions' metadata), so ``xpopt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import tempfile


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written, and every option's default shown.

    An option whose help already says ``(default ...`` is left alone (it
    words its default itself, e.g. "per optimizer"); every other option with
    a value gets `` (default: X)`` appended (flags are off unless given), as ``ArgumentDefaultsHelpFormatter``
    does, so no option hides its default.
    """

    def _get_help_string(self, action):
        help_ = action.help or ""
        if "(default" in help_ or action.default is argparse.SUPPRESS or not action.option_strings:
            return help_
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._StoreConstAction)):
            return help_   # flags: off unless given
        default = action.default
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        return f"{help_} (default: {str(default).replace('%', '%%')})"


# ------------------------------------------------------------------ option types
# argparse prints "xpopt CMD: error: argument --opt: MESSAGE" for an ArgumentTypeError,
# so each message says what is wrong with the value and how to fix it.

def _number(name: str, convert, kind: str, ok, wrong: str, give: str):
    """An argparse type called ``name``: ``convert(text)``, then ``ok(value)`` must hold.

    Its errors say what is wrong and what to give instead:
    ``'x' is not {kind}; give {give}`` and ``'0' {wrong}; give {give}``.
    """
    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}; give {give}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{text!r} {wrong}; give {give}")
        return v

    parse.__name__ = parse.__qualname__ = name
    return parse


positive_int = _number("positive_int", int, "an integer", lambda v: v >= 1, "is too small", "a whole number >= 1")
nonnegative_int = _number("nonnegative_int", int, "an integer", lambda v: v >= 0, "is negative",
                          "a whole number >= 0")
positive_float = _number("positive_float", float, "a number", lambda v: math.isfinite(v) and v > 0,
                         "is not a learning rate", "a finite learning rate > 0 such as 3e-3")


def width_list(text: str) -> list:
    """Comma-separated widths: integers >= 1, at least two, distinct, the first (the base) the smallest."""
    parts = [w.strip() for w in text.split(",") if w.strip()]
    ws = []
    for w in parts:
        try:
            ws.append(int(w))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{w!r} is not an integer; give comma-separated widths such as "
                                             "128,256,512") from None
    if len(ws) < 2:
        raise argparse.ArgumentTypeError(f"{text!r} has {len(ws)} width(s); give at least two, such as 128,512 "
                                         "(the slope / LR spread is measured across widths)")
    if min(ws) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} has a width < 1; give positive widths such as 128,256,512")
    dup = sorted({w for w in ws if ws.count(w) > 1})
    if dup:
        raise argparse.ArgumentTypeError(f"{text!r} lists {', '.join(map(str, dup))} twice; give each width once")
    if ws[0] != min(ws):
        fixed = ",".join(map(str, sorted(ws)))
        raise argparse.ArgumentTypeError(f"the first width is the base and must be the smallest, but {ws[0]} > "
                                         f"{min(ws)}; give --widths {fixed}")
    return ws


def float_list(text: str) -> list:
    """Comma-separated log2 LRs: finite numbers, at least two, distinct."""
    parts = [v.strip() for v in text.split(",") if v.strip()]
    vals = []
    for v in parts:
        try:
            f = float(v)
        except ValueError:
            f = float("nan")
        if not math.isfinite(f):
            raise argparse.ArgumentTypeError(f"{v!r} is not a finite number; give comma-separated log2 LRs such "
                                             "as --log2-lrs=-10,-8,-6")
        vals.append(f)
    if len(vals) < 2:
        raise argparse.ArgumentTypeError(f"{text!r} has {len(vals)} value(s); give at least two log2 LRs such as "
                                         "--log2-lrs=-10,-8,-6")
    if len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a value; give each log2 LR once")
    return vals


def check_out_dir(out: str) -> str | None:
    """Create ``out`` and write a probe file in it; ``None`` if that worked, else why not.

    Called before a run, so an unwritable ``--out`` fails in a second with exit 2
    instead of with a traceback after minutes of training.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        return f"{out!r} exists and is not a directory; give a folder (it is created if missing)"
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".xpopt-probe-"):
            pass
    except OSError as e:
        return f"{out!r} cannot be created or written to ({e.strerror or e}); give a folder you can write to"
    return None


# ------------------------------------------------------------------ settings

_DISTRIBUTIONS = ("xpopt", "numpy", "torch", "jax", "jaxlib", "optax", "cupy", "matplotlib")


def versions() -> dict:
    """Installed versions (distribution metadata; nothing imported), None where absent."""
    from importlib import metadata

    from .._version import __version__

    out = {"python": platform.python_version()}
    for name in _DISTRIBUTIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["xpopt"] = __version__     # the running code's, even from a source tree
    return out


def machine() -> dict:
    """Where the numbers came from: OS, CPU, core count (and the CUDA device when torch has one loaded)."""
    info = {"platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or None, "cpu_count": os.cpu_count()}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        try:
            if torch.cuda.is_available():
                info["cuda_device"] = torch.cuda.get_device_name(0)
        except Exception:   # pragma: no cover - a broken CUDA install must not break the report
            pass
    return info


def settings(argv=None, **options) -> dict:
    """The ``settings`` block of a JSON output: the options as run, the command line (``argv``,
    which ``cli.main`` keeps as ``args._argv``), the installed versions and the machine."""
    return {**options, "command_line": None if argv is None else shlex.join(["xpopt", *argv]),
            "versions": versions(), "machine": machine()}
