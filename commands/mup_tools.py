"""Coordinate check and LR transfer (``xpopt coordcheck``, ``xpopt transfer``), torch and JAX.

**Coordinate check** (seed 001's criterion): for each width, build the model,
apply the rule (init, output and LR multipliers relative to the base width),
take ``steps`` optimizer steps on the embedded data and record every layer's
mean ``|activation|``; per layer, fit the log2-log2 slope against width.  A
parametrisation is width-stable when every internal layer's ``|slope| <
0.2``; standard parametrisation shows slopes near 1 (activations growing as
the width) after a few Adam steps.

**LR transfer**: train each width for ``steps`` steps over a log2 LR grid;
the best LR per width should move by at most 2 log2 units across widths
under muP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from . import _mup_models as MM
from ._mup_models import COORD_LR, DEFAULT_LR, KRON_INIT_SCALE, MUON_FALLBACK_RATIO, activation_stats  # noqa: F401

SLOPE_LIMIT = 0.2          # seed 001
SPREAD_LIMIT = 2.0         # seed 001: best-LR spread in log2 units


@dataclass
class CoordCheck:
    framework: str
    optimizer: str
    rule: str
    widths: list
    steps: int
    stats: dict            # layer -> [mean |act| per width] after the last step
    slopes: dict = field(default_factory=dict)
    internal: tuple = ("input", "hidden1", "hidden2")

    def __post_init__(self):
        lw = np.log2(np.asarray(self.widths, dtype=float))
        for layer, vals in self.stats.items():
            self.slopes[layer] = float(np.polyfit(lw, np.log2(np.asarray(vals) + 1e-30), 1)[0])

    @property
    def passed(self) -> bool:
        """Seed 001's criterion: every internal layer's mean |activation| has |slope| < 0.2."""
        return all(abs(self.slopes[k]) < SLOPE_LIMIT for k in self.internal)

    @property
    def changes_passed(self) -> bool:
        """The stricter form: the change since init, ``mean |h - h0|``, is width-stable too."""
        return all(abs(self.slopes["d_" + k]) < SLOPE_LIMIT for k in self.internal if "d_" + k in self.slopes)

    def table(self) -> str:
        head = f"coordcheck {self.framework} {self.optimizer} rule={self.rule} steps={self.steps}"
        cols = " ".join(f"{w:>9}" for w in self.widths)
        lines = [head, f"{'layer':<9} {cols}   slope  verdict   (d_: mean |h - h0|, the change since init)"]
        for layer, vals in self.stats.items():
            ok = abs(self.slopes[layer]) < SLOPE_LIMIT
            verdict = ("ok" if ok else "GROWS" if self.slopes[layer] > 0 else "SHRINKS")
            if layer.removeprefix("d_") not in self.internal:
                verdict += " (readout: not judged)"
            lines.append(f"{layer:<9} " + " ".join(f"{v:9.3g}" for v in vals) + f"  {self.slopes[layer]:+.3f}  {verdict}")
        lines.append(("PASS" if self.passed else "FAIL") + " (|activation|, seed 001); changes since init: "
                     + ("width-stable" if self.changes_passed else "NOT width-stable"))
        return "\n".join(lines)


# ------------------------------------------------------------------ torch

def _torch_model(width: int, seed: int):
    import torch

    torch.manual_seed(seed)
    return torch.nn.ModuleDict({
        "input": torch.nn.Linear(MM.D_IN, width), "hidden1": torch.nn.Linear(width, width),
        "hidden2": torch.nn.Linear(width, width), "output": torch.nn.Linear(width, MM.D_OUT)})


def _torch_forward(model, x, record=None):
    import torch

    h = x
    for name in MM.LAYERS:
        h = model[name](h)
        if record is not None:
            record[name] = h.detach().clone()
        if name != "output":
            h = torch.tanh(h)
    return h


def _torch_optimizer(optimizer: str, groups):
    import torch

    from ..adapters.torch import Kron, Muon

    if optimizer == "sgd":
        return torch.optim.SGD(groups)
    if optimizer == "adam":
        return torch.optim.Adam(groups)
    if optimizer == "muon":
        return Muon(groups, adjust_lr_fn="match_rms_adamw")
    return Kron(groups, preconditioner_update_probability=1.0, dtype="float32", b1=0.9,
                preconditioner_init_scale=KRON_INIT_SCALE)


def torch_run(width: int, *, optimizer: str, rule: str, lr: float, steps: int, base_width: int, seed: int = 0):
    """Train one width; returns ``(per-step losses, last activation stats)``."""
    import torch

    from ..adapters.torch import mup_init_, mup_param_groups

    base = _torch_model(base_width, seed)
    delta = _torch_model(2 * base_width, seed)     # fixes the roles at the base width too
    model = _torch_model(width, seed)
    mup_init_(model, base, rule=rule, delta=delta)
    groups = mup_param_groups(model, base, lr=lr, optimizer=optimizer, rule=rule, delta=delta,
                              fallback_lr=lr * MUON_FALLBACK_RATIO if optimizer == "muon" else None)
    opt = _torch_optimizer(optimizer, groups)
    x, y = (torch.from_numpy(a) for a in MM.data(seed))
    losses, h0, h = [], {}, {}
    with torch.no_grad():
        _torch_forward(model, x, h0)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = torch.mean((_torch_forward(model, x) - y) ** 2)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        final = float(torch.mean((_torch_forward(model, x, h) - y) ** 2))
    losses.append(final)
    return losses, activation_stats(h0, h, lambda t: float(t.abs().mean()))


# ------------------------------------------------------------------ entry points

def coord_check(framework: str = "torch", *, optimizer: str = "adam", rule: str = "mup",
                widths: Sequence[int] = (128, 256, 512, 1024), steps: int = 3, lr: Optional[float] = None,
                base_width: Optional[int] = None, seed: int = 0, progress: bool = False) -> CoordCheck:
    """Run a coordinate check; ``lr`` is the base width's (default per optimizer: ``COORD_LR``)."""
    widths, base_width = _check_run(widths, base_width, steps, optimizer, seed)
    lr = COORD_LR[optimizer] if lr is None else lr
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r} is not valid: give a finite learning rate > 0")
    run = _runner(framework)
    stats: dict = {}
    for w in _progress(widths, progress, f"coordcheck {framework} {optimizer} {rule}"):
        _, s = run(w, optimizer=optimizer, rule=rule, lr=lr, steps=steps, base_width=base_width, seed=seed)
        for k, v in s.items():
            stats.setdefault(k, []).append(v)
    return CoordCheck(framework, optimizer, rule, widths, steps, stats)


@dataclass
class Transfer:
    framework: str
    optimizer: str
    rule: str
    widths: list
    log2_lrs: list
    losses: dict             # width -> [final loss per lr]
    steps: int = 0

    @property
    def best(self) -> dict:
        out = {}
        for w, ls in self.losses.items():
            ls = np.asarray(ls, dtype=float)
            ls = np.where(np.isfinite(ls), ls, np.inf)
            out[w] = self.log2_lrs[int(np.argmin(ls))]
        return out

    @property
    def spread(self) -> float:
        b = list(self.best.values())
        return float(max(b) - min(b))

    @property
    def passed(self) -> bool:
        return self.spread <= SPREAD_LIMIT

    def table(self) -> str:
        lines = [f"transfer {self.framework} {self.optimizer} rule={self.rule}",
                 f"{'log2 lr':>8} " + " ".join(f"{'w=' + str(w):>11}" for w in self.widths)]
        for i, l in enumerate(self.log2_lrs):
            lines.append(f"{l:>8.1f} " + " ".join(f"{self.losses[w][i]:11.4g}" for w in self.widths))
        lines.append("best log2 lr: " + ", ".join(f"w={w}: {b:+.1f}" for w, b in self.best.items())
                     + f"; spread {self.spread:.1f} (limit {SPREAD_LIMIT})")
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


def lr_transfer(framework: str = "torch", *, optimizer: str = "adam", rule: str = "mup",
                widths: Sequence[int] = (128, 512), log2_lrs: Optional[Sequence[float]] = None, steps: int = 50,
                base_width: Optional[int] = None, seed: int = 0, progress: bool = False) -> Transfer:
    """Sweep a log2 LR grid (the base width's LR) at each width; final training loss per point."""
    widths, base_width = _check_run(widths, base_width, steps, optimizer, seed)
    if log2_lrs is None:
        log2_lrs = default_log2_lrs(optimizer)
    if not log2_lrs or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in log2_lrs):
        raise ValueError(f"log2_lrs={log2_lrs!r} is not valid: give finite numbers such as [-10, -8, -6]")
    run = _runner(framework)
    losses = {}
    for w in _progress(widths, progress, f"transfer {framework} {optimizer} {rule}"):
        losses[w] = []
        for l2 in log2_lrs:
            ls, _ = run(w, optimizer=optimizer, rule=rule, lr=2.0 ** l2, steps=steps, base_width=base_width,
                        seed=seed)
            losses[w].append(ls[-1] if np.isfinite(ls[-1]) else float("inf"))
    return Transfer(framework, optimizer, rule, widths, list(log2_lrs), losses, steps)


def default_log2_lrs(optimizer: str) -> list:
    """The transfer grid when none is given: 9 integers centred on ``DEFAULT_LR[optimizer]``."""
    c = round(math.log2(DEFAULT_LR[optimizer]))
    return [c + d for d in range(-4, 5)]


def _check_run(widths, base_width, steps, optimizer, seed):
    """``(sorted widths, base width)`` after the checks both entry points share."""
    if optimizer not in DEFAULT_LR:
        raise ValueError(f"optimizer={optimizer!r} is not valid; use one of {list(DEFAULT_LR)}")
    ws = sorted(int(w) for w in widths)
    if len(ws) < 2 or ws[0] < 1 or len(set(ws)) != len(ws):
        raise ValueError(f"widths={list(widths)!r} is not valid: give at least two distinct widths >= 1")
    base_width = ws[0] if base_width is None else int(base_width)
    if not 1 <= base_width <= ws[0]:
        raise ValueError(f"base_width={base_width} is not valid: it must be >= 1 and at most the smallest "
                         f"width ({ws[0]}); the rules scale every width relative to it")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} is not valid: give an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} is not valid: give an integer >= 0")
    return ws, base_width


def _runner(framework: str):
    if framework == "torch":
        return torch_run
    if framework == "jax":
        from ._mup_jax import jax_run

        return jax_run
    raise ValueError(f"framework={framework!r} is not valid; use 'torch' or 'jax'")


def _progress(items, on: bool, desc: str):
    if not on:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False)
