"""``xpopt coordcheck`` and ``xpopt transfer``: tables, PNGs and a pass/fail exit code.

Standard parametrisation runs beside each rule as the contrast; only the
rules asked for (``mup`` / ``spectral``) decide the exit code.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os

from . import _env as E
from . import mup_tools as T

COORD_DESCRIPTION = """Coordinate check: per width, apply the rule, take a few optimizer steps on the
embedded data and record each layer's mean |activation| (and its change since
init); fit the log2-log2 slope against width.  PASS when every internal layer's
|slope| < 0.2 (nanochat's criterion).  Writes coordcheck-*.png and .json to --out."""

TRANSFER_DESCRIPTION = """LR transfer: train each width over a log2 LR grid; the best LR should move by
at most 2 log2 units across widths.  Writes transfer-*.png and .json to --out."""


def _common(p: argparse.ArgumentParser, widths: str, steps: int) -> None:
    p.add_argument("--framework", choices=["torch", "jax"], default="torch",
                   help="which framework trains the model (xpopt.adapters.torch or .optax)")
    p.add_argument("--optimizer", nargs="+", choices=["sgd", "adam", "muon", "kron"], default=["adam"],
                   help="optimizers to check, one JSON / PNG each")
    p.add_argument("--rule", nargs="+", choices=["mup", "spectral"], default=["mup"],
                   help="rules to judge (standard parametrisation is always run beside them)")
    p.add_argument("--widths", type=E.width_list, default=E.width_list(widths), metavar="W0,W1,...",
                   help=f"comma-separated widths, at least two; the first is the base and the smallest "
                        f"(default: {widths})")
    p.add_argument("--steps", type=E.positive_int, default=steps, help="optimizer steps per run (>= 1)")
    p.add_argument("--out", default="xpopt-mup", metavar="DIR", help="folder for PNG and JSON (created if missing)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--seed", type=E.nonnegative_int, default=0, help="seed of the init and the data (>= 0)")


def add_coord_arguments(p) -> None:
    _common(p, "128,256,512,1024", 3)
    lrs = ", ".join(f"{k} {v:g}" for k, v in T.COORD_LR.items())
    p.add_argument("--lr", type=E.positive_float, default=None,
                   help=f"base-width LR, > 0 (default: per optimizer: {lrs})")


def add_transfer_arguments(p) -> None:
    _common(p, "128,512", 50)
    p.add_argument("--log2-lrs", type=E.float_list, default=None, metavar="L0,L1,...",
                   help="comma-separated log2 LRs of the base width, at least two, e.g. --log2-lrs=-10,-8,-6 "
                        "(default: 9 integers centred on the optimizer's LR: "
                        + ", ".join(f"{k} {round(math.log2(v)) - 4}..{round(math.log2(v)) + 4}"
                                    for k, v in T.DEFAULT_LR.items()) + ")")


_NEEDS = {"torch": ["torch"], "jax": ["jax", "optax"]}


def _check_args(args) -> None:
    """What the option types cannot see alone; ``parser.error`` (exit 2) before anything runs."""
    parser = args._parser
    missing = [m for m in _NEEDS[args.framework] if importlib.util.find_spec(m) is None]
    if missing:
        parser.error(f"argument --framework: {args.framework} needs {', '.join(missing)}, which is not installed; "
                     f"pip install xpopt[{args.framework}] or choose the other framework")
    for name in ("optimizer", "rule"):
        vals = getattr(args, name)
        dup = sorted({v for v in vals if vals.count(v) > 1})
        if dup:
            parser.error(f"argument --{name}: {', '.join(dup)} given twice; give each once")
    why = E.check_out_dir(args.out)
    if why:
        parser.error(f"argument --out: {why}")


def _settings(args, opt: str, **extra) -> dict:
    return E.settings(getattr(args, "_argv", None), command=args.command, framework=args.framework, optimizer=opt,
                      rules=["standard"] + list(args.rule), widths=list(args.widths), base_width=args.widths[0],
                      steps=args.steps, seed=args.seed, **extra)


def _run(args, kind: str, measure, to_json, plot, settings) -> int:
    """Per optimizer: standard plus each asked rule, printed, saved as JSON (and a PNG);
    exit code 1 when an asked rule fails."""
    _check_args(args)
    draw = not args.no_plot and importlib.util.find_spec("matplotlib") is not None
    ok = True
    for opt in args.optimizer:
        results = {}
        for rule in ["standard"] + list(args.rule):
            r = measure(opt, rule)
            print(r.table() + "\n")
            results[rule] = r
            if rule != "standard":
                ok &= r.passed
        stem = os.path.join(args.out, f"{kind}-{args.framework}-{opt}")
        with open(stem + ".json", "w") as f:
            json.dump({"settings": settings(opt), "results": {rule: to_json(r) for rule, r in results.items()},
                       "passed": all(r.passed for rule, r in results.items() if rule != "standard")}, f, indent=1)
        print(f"wrote {stem}.json")
        if draw:
            plot(results, stem + ".png")
            print(f"wrote {stem}.png")
        elif not args.no_plot:
            print("PNG not drawn: matplotlib is not installed (pip install xpopt[cli], or pass --no-plot)")
    return 0 if ok else 1


def run_coordcheck(args) -> int:
    def measure(opt, rule):
        return T.coord_check(args.framework, optimizer=opt, rule=rule, widths=args.widths,
                             steps=args.steps, lr=args.lr, seed=args.seed, progress=True)

    def to_json(c):
        return dict(widths=c.widths, stats=c.stats, slopes=c.slopes, passed=c.passed)

    def settings(opt):
        lr = T.COORD_LR[opt] if args.lr is None else args.lr
        return _settings(args, opt, lr=lr, lr_default=args.lr is None,
                         fallback_lr=lr * T.MUON_FALLBACK_RATIO if opt == "muon" else None,
                         slope_limit=T.SLOPE_LIMIT)

    return _run(args, "coordcheck", measure, to_json, _plot_coord, settings)


def run_transfer(args) -> int:
    def measure(opt, rule):
        return T.lr_transfer(args.framework, optimizer=opt, rule=rule, widths=args.widths,
                             log2_lrs=args.log2_lrs, steps=args.steps, seed=args.seed, progress=True)

    def to_json(t):
        return dict(widths=t.widths, log2_lrs=t.log2_lrs, losses={str(k): v for k, v in t.losses.items()},
                    best={str(k): v for k, v in t.best.items()}, spread=t.spread, passed=t.passed)

    def settings(opt):
        grid = T.default_log2_lrs(opt) if args.log2_lrs is None else list(args.log2_lrs)
        return _settings(args, opt, log2_lrs=grid, lrs=[2.0 ** v for v in grid], lr_default=args.log2_lrs is None,
                         fallback_lr_ratio=T.MUON_FALLBACK_RATIO if opt == "muon" else None,
                         spread_limit=T.SPREAD_LIMIT)

    return _run(args, "transfer", measure, to_json, _plot_transfer, settings)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(results: dict, path: str, draw) -> None:
    """One panel per rule, ``draw(ax, rule, result)`` fills it."""
    plt = _plt()
    # one y scale for all panels: muP's flat lines are only readable beside standard's growth
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False, sharey=True)
    for ax, (rule, r) in zip(axes[0], results.items()):
        draw(ax, rule, r)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_coord(results: dict, path: str) -> None:
    def draw(ax, rule, c):
        for layer, vals in c.stats.items():
            if not layer.startswith("d_"):
                ax.plot(c.widths, vals, "o-", label=f"{layer} ({c.slopes[layer]:+.2f})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("width")
        ax.set_ylabel(f"mean |activation| after {c.steps} steps")
        ax.set_title(f"{c.framework} {c.optimizer}: {rule} ({'PASS' if c.passed else 'FAIL'})")

    _figure(results, path, draw)


def _plot_transfer(results: dict, path: str) -> None:
    def draw(ax, rule, t):
        for w in t.widths:
            ax.plot(t.log2_lrs, t.losses[w], "o-", label=f"width {w} (best {t.best[w]:+.0f})")
        ax.set_yscale("log")
        ax.set_xlabel("log2 LR (base width)")
        ax.set_ylabel(f"training loss after {t.steps} steps")
        ax.set_title(f"{t.framework} {t.optimizer}: {rule} (spread {t.spread:.0f})")

    _figure(results, path, draw)
