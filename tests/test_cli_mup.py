"""``xpopt coordcheck`` / ``xpopt transfer`` as commands: bad input, help, JSON settings.

The measurements themselves (slopes, LR spread) are tested in test_mup_torch.py
and test_mup_jax.py; here the runs are tiny (widths 16 and 32, one or two
steps, SGD) since only the command's behaviour is checked.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest

from xpopt import cli

HAVE_TORCH = importlib.util.find_spec("torch") is not None
TINY = ["--widths", "16,32", "--optimizer", "sgd", "--no-plot"]


def _main(capsys, *argv):
    rc = cli.main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ------------------------------------------------------------------ bad input: one line, exit 2


@pytest.mark.parametrize("argv, option, fix", [
    (["coordcheck", "--widths", "128"], "--widths", "at least two"),
    (["coordcheck", "--widths", "128,abc"], "--widths", "'abc' is not an integer"),
    (["transfer", "--widths", "64"], "--widths", "at least two"),
    (["coordcheck", "--widths", "32,16"], "--widths", "give --widths 16,32"),      # base larger than the others
    (["coordcheck", "--widths", "16,16"], "--widths", "twice"),
    (["coordcheck", "--widths", "0,16"], "--widths", "positive"),
    (["coordcheck", *TINY, "--steps", "0"], "--steps", ">= 1"),
    (["coordcheck", *TINY, "--steps", "-1"], "--steps", ">= 1"),
    (["transfer", *TINY, "--steps", "0"], "--steps", ">= 1"),
    (["coordcheck", *TINY, "--lr", "-1"], "--lr", "> 0"),
    (["coordcheck", *TINY, "--lr", "0"], "--lr", "> 0"),
    (["coordcheck", *TINY, "--lr", "nan"], "--lr", "> 0"),
    (["transfer", *TINY, "--log2-lrs=x"], "--log2-lrs", "--log2-lrs=-10,-8,-6"),
    (["transfer", *TINY, "--log2-lrs=-3"], "--log2-lrs", "at least two"),
    (["coordcheck", *TINY, "--seed", "-1"], "--seed", ">= 0"),
    (["coordcheck", "--widths", "16,32", "--optimizer", "sgd", "sgd", "--no-plot"], "--optimizer", "twice"),
])
def test_bad_option_exits_2_with_one_line_naming_it(tmp_path, capsys, argv, option, fix):
    """Each bad value: argparse's usage and one error line naming the option and the fix;
    nothing run, nothing written."""
    out = tmp_path / "out"
    rc, printed, err = _main(capsys, *argv, "--out", str(out))
    assert rc == 2, printed + err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"xpopt {argv[0]}: error: argument {option}: ") and fix in lines[0], lines[0]
    assert "Traceback" not in err and printed == ""
    assert not out.exists()


@pytest.mark.parametrize("cmd", ["coordcheck", "transfer"])
def test_unwritable_out_exits_2_before_running(tmp_path, capsys, cmd):
    """An --out that cannot be created (below a file) or is a file: exit 2 at once, no traceback."""
    f = tmp_path / "file"
    f.write_text("x")
    for out in (f, f / "sub"):
        rc, printed, err = _main(capsys, cmd, *TINY, "--out", str(out))
        assert rc == 2 and "Traceback" not in err and printed == ""
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"xpopt {cmd}: error: argument --out: ") and "give a folder" in line, line


def test_systemexit_with_a_message_is_printed(capsys, monkeypatch):
    """cli.main used to drop a ``SystemExit("message")`` silently (exit 2, nothing printed)."""
    from xpopt.commands import mup_cli

    def boom(args):
        raise SystemExit("something is wrong with --frob; give a number")

    monkeypatch.setattr(mup_cli, "run_coordcheck", boom)
    rc, _, err = _main(capsys, "coordcheck", "--widths", "16,32")
    assert rc == 2 and "something is wrong with --frob; give a number" in err


def test_api_rejects_what_the_cli_rejects():
    from xpopt.commands import mup_tools as T

    for kw, match in [(dict(lr=-1.0), "lr=-1.0"), (dict(steps=0), "steps=0"), (dict(widths=(16,)), "widths"),
                      (dict(widths=(16, 32), base_width=64), "base_width=64"), (dict(seed=-1), "seed=-1")]:
        with pytest.raises(ValueError, match=match):
            T.coord_check("torch", **{"widths": (16, 32), **kw})
    with pytest.raises(ValueError, match="log2_lrs"):
        T.lr_transfer("torch", widths=(16, 32), log2_lrs=[float("nan"), 1.0])


# ------------------------------------------------------------------ help shows every default


def _subparsers():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("cmd", ["validate", "coordcheck", "transfer"])
def test_help_shows_every_default(cmd, capsys):
    p = _subparsers()[cmd]
    fmt = p.formatter_class(prog=p.prog)
    for a in p._actions:
        if not a.option_strings or isinstance(a, (argparse._HelpAction, argparse._StoreConstAction)):
            continue
        assert a.help, f"{cmd} {a.option_strings[0]} has no help"
        assert "(default" in fmt._get_help_string(a), f"{cmd} {a.option_strings[0]} hides its default"
    rc, printed, _ = _main(capsys, cmd, "--help")
    assert rc == 0 and printed.count("(default") >= sum(
        1 for a in p._actions if a.option_strings and not isinstance(a, (argparse._HelpAction,
                                                                        argparse._StoreConstAction)))


def test_help_defaults_are_the_real_ones(capsys):
    _, printed, _ = _main(capsys, "coordcheck", "--help")
    flat = " ".join(printed.split())
    for text in ("(default: torch)", "(default: adam)", "(default: mup)", "(default: 128,256,512,1024)",
                 "(default: 3)", "(default: xpopt-mup)", "(default: 0)", "adam 0.03"):
        assert text in flat, text
    _, printed, _ = _main(capsys, "transfer", "--help")
    flat = " ".join(printed.split())
    assert "(default: 128,512)" in flat and "(default: 50)" in flat and "adam -12..-4" in flat


# ------------------------------------------------------------------ JSON carries its settings


def _check_settings(s, **want):
    for k, v in want.items():
        assert s[k] == v, (k, s[k], v)
    assert s["versions"]["xpopt"] and s["versions"]["python"]
    assert s["versions"]["torch"] and "numpy" in s["versions"] and "jax" in s["versions"]
    assert s["machine"]["platform"] and s["machine"]["machine"] and s["machine"]["cpu_count"]
    assert s["command_line"].startswith("xpopt ")


@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_coordcheck_json_carries_settings(tmp_path, capsys):
    out = tmp_path / "o"
    rc, printed, err = _main(capsys, "coordcheck", *TINY, "--steps", "1", "--lr", "0.25", "--seed", "3",
                             "--out", str(out))
    assert rc in (0, 1), err
    doc = json.loads((out / "coordcheck-torch-sgd.json").read_text())
    _check_settings(doc["settings"], command="coordcheck", framework="torch", optimizer="sgd",
                    rules=["standard", "mup"], widths=[16, 32], base_width=16, steps=1, seed=3, lr=0.25,
                    lr_default=False)
    assert "--lr 0.25" in doc["settings"]["command_line"]
    assert set(doc["results"]) == {"standard", "mup"} and doc["results"]["mup"]["widths"] == [16, 32]
    assert doc["passed"] == doc["results"]["mup"]["passed"]


@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_transfer_json_carries_settings(tmp_path, capsys):
    out = tmp_path / "o"
    rc, printed, err = _main(capsys, "transfer", *TINY, "--steps", "2", "--log2-lrs=-3,-2", "--out", str(out))
    assert rc in (0, 1), err
    doc = json.loads((out / "transfer-torch-sgd.json").read_text())
    _check_settings(doc["settings"], command="transfer", optimizer="sgd", widths=[16, 32], steps=2, seed=0,
                    log2_lrs=[-3.0, -2.0], lrs=[0.125, 0.25], lr_default=False)
    assert doc["results"]["mup"]["log2_lrs"] == [-3.0, -2.0]


def test_settings_block_imports_no_framework():
    import subprocess
    import sys

    code = ("import sys; from xpopt.commands import _env as E; s = E.settings(x=1)\n"
            "assert s['x'] == 1 and s['versions']['xpopt']\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'jax', 'optax', 'cupy', 'matplotlib'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_option_types_directly():
    from xpopt.commands import _env as E

    assert E.width_list("128, 256,512") == [128, 256, 512]
    assert E.float_list("-10,-8.5") == [-10.0, -8.5]
    assert E.positive_float("3e-3") == 3e-3
    for fn, bad in [(E.width_list, "128,,"), (E.positive_int, "1.5"), (E.positive_float, "inf"),
                    (E.float_list, "1,1"), (E.nonnegative_int, "x")]:
        with pytest.raises(argparse.ArgumentTypeError):
            fn(bad)
