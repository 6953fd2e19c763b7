"""``xpopt coordcheck`` and ``xpopt transfer``: tables, PNGs and a pass/fail exit code.

Standard parametrisation runs beside each rule as the contrast; only the
rules asked for (``mup`` / ``spectral``) decide the exit code.
"""

from __future__ import annotations

import argparse
import json
import os

from . import mup_tools as T

COORD_DESCRIPTION = """Coordinate check: per width, apply the rule, take a few optimizer steps on the
embedded data and record each layer's mean |activation| (and its change since
init); fit the log2-log2 slope against width.  PASS when every internal layer's
|slope| < 0.2 (nanochat's criterion).  Writes coordcheck-*.png and .json to --out."""

TRANSFER_DESCRIPTION = """LR transfer: train each width over a log2 LR grid; the best LR should move by
at most 2 log2 units across widths.  Writes transfer-*.png and .json to --out."""


def _common(p: argparse.ArgumentParser, widths: str, steps: int) -> None:
    p.add_argument("--framework", choices=["torch", "jax"], default="torch")
    p.add_argument("--optimizer", nargs="+", choices=["sgd", "adam", "muon", "kron"], default=["adam"])
    p.add_argument("--rule", nargs="+", choices=["mup", "spectral"], default=["mup"],
                   help="rules to judge (standard parametrisation is always run beside them)")
    p.add_argument("--widths", default=widths, help=f"comma-separated widths (default {widths}); the first is the base")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--out", default="xpopt-mup", help="folder for PNG and JSON")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--seed", type=int, default=0)


def add_coord_arguments(p) -> None:
    _common(p, "128,256,512,1024", 3)
    p.add_argument("--lr", type=float, default=None, help="base-width LR (default per optimizer)")


def add_transfer_arguments(p) -> None:
    _common(p, "128,512", 50)
    p.add_argument("--log2-lrs", default=None, help="comma-separated log2 LRs, e.g. --log2-lrs=-10,-8,-6 (default: 9 around the optimizer's)")


def _widths(s: str) -> list:
    try:
        ws = [int(w) for w in s.split(",") if w.strip()]
    except ValueError:
        raise SystemExit(f"--widths={s!r}: give comma-separated integers such as 128,256,512") from None
    if len(ws) < 2 or min(ws) < 1:
        raise SystemExit(f"--widths={s!r}: give at least two positive widths")
    return ws


def _run(args, kind: str, measure, to_json, plot) -> int:
    """Per optimizer: standard plus each asked rule, printed, saved as JSON (and a PNG);
    exit code 1 when an asked rule fails."""
    os.makedirs(args.out, exist_ok=True)
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
            json.dump({rule: to_json(r) for rule, r in results.items()}, f, indent=1)
        if not args.no_plot:
            plot(results, stem + ".png")
            print(f"wrote {stem}.png")
    return 0 if ok else 1


def run_coordcheck(args) -> int:
    def measure(opt, rule):
        return T.coord_check(args.framework, optimizer=opt, rule=rule, widths=_widths(args.widths),
                             steps=args.steps, lr=args.lr, seed=args.seed, progress=True)

    def to_json(c):
        return dict(widths=c.widths, stats=c.stats, slopes=c.slopes, passed=c.passed)

    return _run(args, "coordcheck", measure, to_json, _plot_coord)


def run_transfer(args) -> int:
    grid = None if args.log2_lrs is None else [float(v) for v in args.log2_lrs.split(",")]

    def measure(opt, rule):
        return T.lr_transfer(args.framework, optimizer=opt, rule=rule, widths=_widths(args.widths),
                             log2_lrs=grid, steps=args.steps, seed=args.seed, progress=True)

    def to_json(t):
        return dict(widths=t.widths, log2_lrs=t.log2_lrs, losses={str(k): v for k, v in t.losses.items()},
                    best={str(k): v for k, v in t.best.items()}, spread=t.spread, passed=t.passed)

    return _run(args, "transfer", measure, to_json, _plot_transfer)


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
