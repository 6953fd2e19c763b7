"""``xpopt.adapters.torch.Muon``: a torch.optim.Optimizer that only translates to core.

Numbers are checked against NumPy float64 (the project's oracle): once against
a re-derivation of the update rule written inline here (Newton-Schulz,
momentum, LR scale and AdamW in plain numpy), and over several steps against
``core.muon.muon_step`` / ``core.adam.adamw_step`` run on float64 arrays.
Every tolerance says why it is what it is; gradients and initial values are
float32-representable, so the torch and numpy sides start from identical data.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install xpopt[torch])")

from _nudge import nudge  # noqa: E402
from _peers import torch_module_threads  # noqa: E402,F401

import xpopt.backends.torch as torch_backend  # noqa: E402
from xpopt.adapters.torch import Muon, Route  # noqa: E402
from xpopt.core.adam import adamw_step  # noqa: E402
import xpopt.core.muon as core_muon  # noqa: E402
from xpopt.core.muon import muon_step  # noqa: E402

KJ = (3.4445, -4.7750, 2.0315)  # Keller Jordan's published NS quintic


# The matrices here are tiny (<= 16 x 32): with torch's default intra-op
# threads on a busy 2-core machine, OpenMP barriers made an 8x8 addmm take
# ~7 ms (measured 0.3 s per step vs 2 ms with one thread).  One thread for the
# module (or $XPOPT_TEST_TORCH_THREADS), restored after; the oracle
# trajectory tests run with 1 and 2 (``torch_threads``).
pytestmark = pytest.mark.usefixtures("torch_module_threads")


# ------------------------------------------------------------------ helpers

def f32(a) -> np.ndarray:
    """float64 array holding float32-representable values."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def make_params(shapes, seed=0, dtype=torch.float32, nudge_seed=0):
    """``nudge_seed`` > 0 moves each value by 1..4 float32 ulps (tests/_nudge.py)."""
    rng = np.random.default_rng(seed)
    init = nudge([f32(rng.standard_normal(s)) for s in shapes], nudge_seed)
    return init, [torch.nn.Parameter(torch.tensor(a, dtype=dtype)) for a in init]


def grad_seq(shapes, steps, seed=1, nudge_seed=0):
    rng = np.random.default_rng(seed)
    return nudge([[f32(rng.standard_normal(s)) for s in shapes] for _ in range(steps)], nudge_seed)


def run_torch(opt, params, grads, dtype=torch.float32):
    """Apply ``grads`` (list per step) through ``opt``; returns float64 snapshots per step."""
    snaps = []
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g, dtype=dtype)
        opt.step()
        snaps.append([p.detach().double().numpy().copy() for p in params])
    return snaps


def rel_err(a, b) -> float:
    """max|a - b| / max|b|: scale-free, so one tolerance serves every param."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# Small model: a 2-D weight, a 4-D conv kernel (flattened to 6 x 27), a bias
# and a scalar; the last two go to the AdamW fallback by shape.
SHAPES = [(8, 16), (6, 3, 3, 3), (8,), ()]
MUON_IDX, FB_IDX = (0, 1), (2, 3)


def ns64(G, coeffs, steps, eps=1e-7):
    """Newton-Schulz written out in float64 numpy (no SVD), for the oracle."""
    X = G.T if G.shape[0] > G.shape[1] else G
    X = X / max(np.linalg.norm(X), eps)
    for i in range(steps):
        a, b, c = coeffs[min(i, len(coeffs) - 1)]
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if G.shape[0] > G.shape[1] else X


# ------------------------------------------------------ numerics vs oracle

def test_one_step_matches_inline_float64_rule():
    init, params = make_params(SHAPES)
    (grads,) = grad_seq(SHAPES, 1)
    lr, mu, wd, b1, b2, feps = 0.05, 0.9, 0.1, 0.9, 0.95, 1e-8
    opt = Muon(params, lr=lr, momentum=mu, nesterov=True, weight_decay=wd, ns_coefficients=[KJ],
               ns_steps=5, betas=(b1, b2), fallback_eps=feps)
    assert [r.route for r in opt.routes()] == ["muon", "muon", "fallback", "fallback"]
    (after,) = run_torch(opt, params, [grads])

    want = []
    for i, (w, g) in enumerate(zip(init, grads)):
        if i in MUON_IDX:
            buf = 0.0 + (1 - mu) * (g - 0.0)              # EMA momentum from a zero buffer
            u = g + mu * (buf - g)                        # nesterov look-ahead
            m = u.reshape(u.shape[0], -1)                 # (out, in*kh*kw)
            scale = 0.2 * math.sqrt(max(m.shape))         # match_rms_adamw
            want.append(w * (1 - lr * wd) - lr * scale * ns64(m, [KJ], 5).reshape(w.shape))
        else:
            m = (1 - b1) * g
            v = (1 - b2) * g * g
            mhat, vhat = m / (1 - b1), v / (1 - b2)       # bias correction, t = 1
            want.append(w * (1 - lr * wd) - lr * mhat / (np.sqrt(vhat) + feps))
    # Float32 NS agrees with float64 NS to ~1e-6 relative (measured 0.6-2e-6 on
    # these shapes: unit roundoff 6e-8 amplified by NS's slope ~a at small
    # singular values); AdamW's direction is a few ulp. 2e-5 of the step is a
    # 10x margin on that, plus the float32 roundings of W itself (4 ulp, see
    # assert_trajectory_close), which dominate for |W| ~ 3. A rule error (LR
    # scale, nesterov, wd order, bias correction) is >= 1e-2 of the step.
    assert_trajectory_close([after], [want], init, 2e-5)
    assert all(np.max(np.abs(a - w)) > 1e-3 for a, w in zip(after, init))


def oracle(init, grads, muon_idx, fb_idx, *, lr, fallback_lr=None, betas=(0.9, 0.95), fallback_eps=1e-8,
           weight_decay=0.0, fallback_weight_decay=None, fallback="adamw", **muon_kw):
    """Trajectory of core.muon_step / core.adamw_step on NumPy float64."""
    P = [a.copy() for a in init]
    bufs = [np.zeros_like(init[i]) for i in muon_idx]
    ms = {i: np.zeros_like(init[i]) for i in fb_idx}
    vs = {i: np.zeros_like(init[i]) for i in fb_idx}
    snaps = []
    for t, gs in enumerate(grads, start=1):
        new, bufs = muon_step([P[i] for i in muon_idx], [gs[i] for i in muon_idx], bufs, lr=lr,
                              weight_decay=weight_decay, **muon_kw)
        for i, p in zip(muon_idx, new):
            P[i] = p
        for i in fb_idx:
            P[i], ms[i], vs[i] = adamw_step(
                P[i], gs[i], ms[i], vs[i], t, lr=lr if fallback_lr is None else fallback_lr, betas=betas,
                eps=fallback_eps, nesterov=fallback == "nadamw",
                weight_decay=weight_decay if fallback_weight_decay is None else fallback_weight_decay)
        snaps.append([p.copy() for p in P])
    return snaps


F32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7, one ulp at 1.0


def assert_trajectory_close(ours, ref, init, tol, label="", ulps=4):
    """Each step's displacement from ``init`` agrees to ``tol`` of its size.

    Plus ``ulps`` float32 ulps of the param per step taken: every step rounds
    the new param to float32 (1/2 ulp), and the decay ``p*(1-lr*wd)`` rounds
    once more with torch's float32 copy of the scalar (1/2 ulp + 1/2 ulp of
    the factor); for a small step (a 1e-3 fallback LR) those roundings, not
    the update's relative error, dominate. Pass ``ulps=0`` for float64.
    """
    for t, (so, sr) in enumerate(zip(ours, ref)):
        for i, (a, b) in enumerate(zip(so, sr)):
            disp = np.max(np.abs(b - init[i]))
            err = np.max(np.abs(a - b))
            bound = tol * disp + (t + 1) * ulps * F32_EPS * np.max(np.abs(b))
            assert err <= bound, (label, t, i, err / disp, err, bound)


STEPS = 6
# Over 6 steps the float32 errors of each step add up (grads are fixed, not
# fed back, so nothing amplifies them): ~6 x the one-step 1e-6 relative.
# Measured over nudge seeds 0..11 with 1 and 2 torch threads: <= 1.4e-5 of
# the displacement on the Muon tensors, and every error <= 0.17 of
# assert_trajectory_close's bound (the worst: the scalar's first 1e-3-LR
# fallback step, where the ulps term carries it).  1e-4 keeps a >6x margin;
# the option tests below show real differences are >= 1e-2.
TRAJ_TOL = 1e-4


@pytest.mark.parametrize("opts", [
    dict(),
    dict(weight_decay=0.05, lr=0.03, fallback="nadamw", betas=(0.8, 0.99)),
    dict(conv_mode="batched", normalize_spatial=True, adjust_lr_fn="original", momentum=0.8),
    dict(conv_mode="batched", normalize_spatial=False, adjust_lr_fn="rms_to_rms",
         ns_coefficients="polar_express", ns_steps=8, safety_factor=1.01),
    dict(adjust_lr_fn="none", fallback_lr=1e-3, fallback_weight_decay=0.2, weight_decay=0.01,
         fallback_eps=1e-6),
    # few steps, so the prescale matters: safety_factor and eps must reach core
    dict(ns_coefficients=KJ, ns_steps=2, safety_factor=2.0),
    dict(ns_coefficients=KJ, ns_steps=2, eps=2.0),
], ids=["defaults", "wd-nadamw", "batched-conv-original", "polar-express", "fallback-opts", "safety",
        "eps-floor"])
def test_several_steps_match_core_float64(opts, nudge_seed, torch_threads):
    init, params = make_params(SHAPES, nudge_seed=nudge_seed)
    grads = grad_seq(SHAPES, STEPS, nudge_seed=nudge_seed)
    ours = run_torch(Muon(params, **opts), params, grads)
    kw = dict(opts)
    lr = kw.pop("lr", 0.02)
    ns = dict(coefficients=kw.pop("ns_coefficients", "quintic"), steps=kw.pop("ns_steps", 5),
              safety_factor=kw.pop("safety_factor", 1.0))
    fb = {k: kw.pop(k) for k in ("fallback_lr", "betas", "fallback_eps", "fallback_weight_decay", "fallback")
          if k in kw}
    ref = oracle(init, grads, MUON_IDX, FB_IDX, lr=lr, **fb, **kw, **ns)
    assert_trajectory_close(ours, ref, init, TRAJ_TOL, opts)
    # the trajectory really moved (a frozen optimiser would pass the above)
    assert all(np.max(np.abs(ours[-1][i] - init[i])) > 1e-3 for i in range(len(SHAPES)))


def test_float64_params_match_core_tightly():
    # float64 end to end: the adapter must be the same arithmetic as core, so
    # only op-order differences (torch BLAS vs numpy BLAS, fused addmm) remain,
    # ~1e-15 per op; 1e-11 allows for NS amplifying them over 4 steps.
    init, params = make_params(SHAPES, dtype=torch.float64)
    grads = grad_seq(SHAPES, 4)
    ours = run_torch(Muon(params, weight_decay=0.1), params, grads, dtype=torch.float64)
    ref = oracle(init, grads, MUON_IDX, FB_IDX, lr=0.02, weight_decay=0.1)
    assert_trajectory_close(ours, ref, init, 1e-11, ulps=0)


def test_batched_equals_unbatched(monkeypatch):
    # three same-shape matrices (stacked into one NS call), a transposed one
    # and a conv kernel in both conv modes.
    shapes = [(8, 16), (8, 16), (8, 16), (16, 8), (6, 3, 3, 3)]
    grads = grad_seq(shapes, 4)
    calls = []
    real = core_muon.orthogonalize

    def counting(G, **kw):
        calls.append(tuple(G.shape))
        return real(G, **kw)

    monkeypatch.setattr(core_muon, "orthogonalize", counting)
    conv = {"flatten": [(6, 27)], "batched": [(9, 6, 3)]}
    for conv_mode in ("flatten", "batched"):
        runs = []
        for batched in (True, False):
            _, params = make_params(shapes)
            calls.clear()
            runs.append(run_torch(Muon(params, batched=batched, conv_mode=conv_mode), params, grads))
            # the option reaches core: one stacked call for the three (8, 16)
            # matrices per step, or one call per matrix
            per_step = ([(3, 8, 16)] if batched else [(8, 16)] * 3) + [(16, 8)] + conv[conv_mode]
            assert sorted(calls) == sorted(per_step * len(grads)), (conv_mode, batched, calls[:6])
        for sa, sb in zip(*runs):
            for a, b in zip(sa, sb):
                # Same float32 maths; only the GEMM kernel differs (baddbmm on a
                # stack vs addmm per matrix), which may reorder a dot product's
                # sums: a few ulp of the update. 1e-6 relative to the param
                # (|W| ~ 1) is ~8 ulp of float32.
                assert np.max(np.abs(a - b)) <= 1e-6 * np.max(np.abs(b)), conv_mode


def test_nesterov_and_momentum_forms():
    init, _ = make_params(SHAPES)
    grads = grad_seq(SHAPES, STEPS)
    traj, bufs = {}, {}
    mu = 0.9
    for nesterov in (True, False):
        for form in ("ema", "classic"):
            _, params = make_params(SHAPES)
            opt = Muon(params, nesterov=nesterov, momentum_form=form, momentum=mu)
            ours = run_torch(opt, params, grads)
            ref = oracle(init, grads, MUON_IDX, FB_IDX, lr=0.02, nesterov=nesterov, momentum_form=form,
                         momentum=mu)
            assert_trajectory_close(ours, ref, init, TRAJ_TOL, (nesterov, form))
            traj[nesterov, form] = ours[-1]
            bufs[nesterov, form] = [opt.state[params[i]]["momentum_buffer"].double().numpy() for i in MUON_IDX]

    def diff(a, b):
        return max(rel_err(x - i, y - i) for x, y, i in zip(traj[a], traj[b], init))

    # nesterov changes the update: far outside the float32 tolerance.
    assert diff((True, "ema"), (False, "ema")) > 100 * TRAJ_TOL
    assert diff((True, "classic"), (False, "classic")) > 100 * TRAJ_TOL
    # The forms differ in the state: the classic buffer is the EMA one / (1-mu)
    # (float32 rounding of 6 accumulations: 1e-5 relative is ~100 ulp) ...
    for nesterov in (True, False):
        for e, c in zip(bufs[nesterov, "ema"], bufs[nesterov, "classic"]):
            assert rel_err(e, (1 - mu) * c) < 1e-5
            assert rel_err(e, c) > 0.5
    # ... and, with or without nesterov, the update u is then scaled by the same
    # (1-mu) (ema: (1-mu)(g + mu*S) vs classic: g + mu*S, S = sum mu^k g_k), which
    # orthogonalisation removes: the parameters follow the same trajectory.
    for nesterov in (True, False):
        assert diff((nesterov, "ema"), (nesterov, "classic")) < TRAJ_TOL


# ----------------------------------------------------------------- routing

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)                    # (16, 8): Muon-shaped
        self.conv = torch.nn.Conv2d(3, 6, 3)                       # (6, 3, 3, 3)
        self.dw = torch.nn.Conv2d(6, 6, 3, groups=6, bias=False)   # (6, 1, 3, 3)
        self.fc = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 2)                          # (2, 8)
        self.wide = torch.nn.Linear(2048, 4, bias=False)           # (4, 2048)
        self.pos = torch.nn.Parameter(torch.zeros(1, 4, 8))


EXPECTED_ROUTES = {
    "embed.weight": ("fallback", "fallback_filter"),
    "conv.weight": ("muon", "ok"),
    "conv.bias": ("fallback", "insufficient_dims"),
    "dw.weight": ("fallback", "leading_unit_dims"),
    "fc.weight": ("muon", "ok"),
    "fc.bias": ("fallback", "insufficient_dims"),
    "head.weight": ("fallback", "min_dim_too_small:2"),
    "head.bias": ("fallback", "insufficient_dims"),
    "wide.weight": ("fallback", "extreme_aspect_ratio:512.0"),
    "pos": ("fallback", "leading_unit_dims"),
}


def test_routing_reasons_filter_and_verbose_log(caplog):
    net = Net()
    seen = []

    def filt(name, p):
        seen.append(name)
        return name.startswith("embed")

    with caplog.at_level(logging.INFO, logger="xpopt"):
        opt = Muon(net.named_parameters(), fallback_filter=filt, verbose=True)
    routes = opt.routes()
    assert all(isinstance(r, Route) for r in routes)
    got = {r.name: (r.route, r.reason) for r in routes}
    assert got == EXPECTED_ROUTES
    assert {r.name: r.shape for r in routes} == {n: tuple(p.shape) for n, p in net.named_parameters()}
    assert seen == [n for n, _ in net.named_parameters()]     # filter saw the real names
    assert opt.param_groups[0]["param_names"] == seen         # torch's native named params
    # one INFO line per parameter on the "xpopt" logger, with name, shape, route, reason
    lines = [r.getMessage() for r in caplog.records if r.name == "xpopt" and r.levelno == logging.INFO]
    assert len(lines) == len(EXPECTED_ROUTES)
    for line, (name, p) in zip(lines, net.named_parameters()):
        route, reason = EXPECTED_ROUTES[name]
        assert name in line and str(tuple(p.shape)) in line and route in line and reason in line, line


def test_not_verbose_logs_nothing(caplog):
    with caplog.at_level(logging.DEBUG, logger="xpopt"):
        Muon(Net().named_parameters())
    assert not [r for r in caplog.records if r.name == "xpopt"]


def test_group_flags_and_unnamed_labels():
    _, (a, b, c, d) = make_params([(8, 16), (8, 16), (8, 16), (8,)])
    opt = Muon([
        {"params": [a]},
        {"params": [b], "use_fallback": True},
        {"params": [c], "use_muon": False},
        {"params": [d]},
    ])
    assert [(r.name, r.route, r.reason) for r in opt.routes()] == [
        ("group 0, param 0", "muon", "ok"),
        ("group 1, param 0", "fallback", "use_fallback_flag"),
        ("group 2, param 0", "fallback", "use_muon_flag"),
        ("group 3, param 0", "fallback", "insufficient_dims"),
    ]
    # use_muon=True forces a shape suitability rejects (4 x 2048 aspect ratio)
    wide = torch.nn.Parameter(torch.zeros(4, 2048))
    opt = Muon([{"params": [wide], "use_muon": True}])
    assert opt.routes()[0][2:4] == ("muon", "use_muon_flag")
    # ... but not one that cannot be a matrix, with the fix in the message
    with pytest.raises(ValueError, match=r"group 0, param 0.*fallback"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(8))], "use_muon": True}])


def test_named_group_dicts_and_fallback_state():
    net = Net()
    named = dict(net.named_parameters())
    opt = Muon([
        {"params": [("fc.weight", named["fc.weight"]), ("conv.weight", named["conv.weight"])]},
        {"params": [("embed.weight", named["embed.weight"])], "use_fallback": True, "lr": 1e-3},
    ])
    assert [(r.name, r.route) for r in opt.routes()] == [
        ("fc.weight", "muon"), ("conv.weight", "muon"), ("embed.weight", "fallback")]
    for p in named.values():
        p.grad = torch.ones_like(p)
    opt.step()
    assert set(opt.state[named["fc.weight"]]) == {"step", "momentum_buffer"}
    assert set(opt.state[named["embed.weight"]]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[named["embed.weight"]]["step"] == 1          # step counts from 1
    assert named["head.weight"] not in opt.state                   # not in the optimizer


def test_add_param_group_routes_and_validates():
    _, (a, b, c) = make_params([(8, 16), (8,), (8, 8)])
    opt = Muon([a])
    opt.add_param_group({"params": [b], "lr": 0.1})
    assert opt.routes()[-1].route == "fallback" and opt.param_groups[1]["lr"] == 0.1
    with pytest.raises(ValueError, match=r"lr must be >= 0.*got -1 \(param group 2\)"):
        opt.add_param_group({"params": [c], "lr": -1})
    assert len(opt.param_groups) == 2                            # the bad group was not kept
    opt.add_param_group({"params": [c]})
    assert len(opt.routes()) == 3


# ---------------------------------------------- groups, schedulers, closure

def test_param_groups_with_different_options():
    init, params = make_params(SHAPES)
    grads = grad_seq(SHAPES, 4)
    g0 = dict(lr=0.03, adjust_lr_fn="original")
    g1 = dict(lr=0.01, conv_mode="batched", nesterov=False, momentum_form="classic", weight_decay=0.1)
    g2 = dict(lr=0.02, fallback="nadamw", betas=(0.8, 0.99), fallback_lr=3e-3, fallback_weight_decay=0.2)
    opt = Muon([{"params": [params[0]], **g0}, {"params": [params[1]], **g1},
                {"params": params[2:], **g2}], weight_decay=0.05)
    ours = run_torch(opt, params, grads)
    refs = [
        oracle(init, grads, (0,), (), weight_decay=0.05, **g0),
        oracle(init, grads, (1,), (), **g1),
        oracle(init, grads, (), (2, 3), weight_decay=0.05, **g2),
    ]
    which = {0: 0, 1: 1, 2: 2, 3: 2}
    for t in range(len(grads)):
        for i in range(len(SHAPES)):
            ref = refs[which[i]][t][i]
            assert rel_err(ours[t][i] - init[i], ref - init[i]) < TRAJ_TOL, (t, i)
    # and the groups really used their own options: the same param under the
    # defaults lands elsewhere.
    _, p2 = make_params(SHAPES)
    default = run_torch(Muon(p2, weight_decay=0.05), p2, grads)
    for i in range(len(SHAPES)):
        assert rel_err(ours[-1][i] - init[i], default[-1][i] - init[i]) > 100 * TRAJ_TOL, i


def test_lr_scheduler_scales_the_step():
    # float64 and momentum=0 with a constant gradient: the Muon direction is
    # exactly the same every step, and AdamW's is g/(|g|+eps) every step (bias
    # correction makes m_hat = g, v_hat = g^2), so each step's displacement is
    # proportional to that step's lr. float64 rounding: ~1e-15 relative.
    shapes = [(8, 16), (8,)]
    _, params = make_params(shapes, dtype=torch.float64)
    g = [torch.tensor(a) for a in grad_seq(shapes, 1)[0]]
    opt = Muon(params, momentum=0.0, lr=0.02)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    deltas, lrs = [], []
    for _ in range(4):
        before = [p.detach().clone() for p in params]
        for p, gi in zip(params, g):
            p.grad = gi.clone()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        deltas.append([p.detach() - b for p, b in zip(params, before)])
    assert lrs == [0.02, 0.01, 0.005, 0.0025]
    for t in range(1, 4):
        for d, d0 in zip(deltas[t], deltas[0]):
            torch.testing.assert_close(d / d0, torch.full_like(d, lrs[t] / lrs[0]), rtol=1e-9, atol=0)


def test_closure_and_zero_grad():
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 8)
    twin = copy.deepcopy(net)
    x = torch.randn(16, 8)
    opt = Muon(net.parameters())
    opt_twin = Muon(twin.parameters())
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = net(x).square().mean()
        loss.backward()                      # step() runs the closure with grad enabled
        return loss

    loss = opt.step(closure)
    assert calls == [1] and torch.is_tensor(loss)
    assert loss.item() == pytest.approx(twin(x).square().mean().item(), rel=0, abs=0)
    # the manual equivalent (backward, then step) gives the same params bitwise
    twin(x).square().mean().backward()
    assert opt_twin.step() is None
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    closure()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters())
    # params without grads are skipped, not updated
    before = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


def test_nan_gradient_policy():
    # documented: no check; a NaN grad poisons only its own parameter, even
    # when same-shape matrices share one batched NS call.
    _, params = make_params([(8, 16), (8, 16), (8,)])
    opt = Muon(params)
    grads = grad_seq([(8, 16), (8, 16), (8,)], 1)[0]
    grads[0][0, 0] = np.nan
    run_torch(opt, params, [grads])
    assert torch.isnan(params[0]).all()
    assert torch.isfinite(params[1]).all() and torch.isfinite(params[2]).all()


# -------------------------------------------------------------- state_dict

def _named(params):
    return [(f"p{i}", p) for i, p in enumerate(params)]


def test_state_dict_round_trip_is_bitwise():
    shapes = [(8, 16), (8, 16), (6, 3, 3, 3), (8,), ()]
    grads = grad_seq(shapes, 6)
    kw = dict(weight_decay=0.1, fallback="nadamw",
              fallback_filter=lambda n, p: n == "p1")   # a lambda: state_dict must still pickle

    _, ref_params = make_params(shapes)
    ref_opt = Muon(_named(ref_params), **kw)
    ref = run_torch(ref_opt, ref_params, grads)

    _, params = make_params(shapes)
    opt = Muon(_named(params), **kw)
    run_torch(opt, params, grads[:3])
    buf = io.BytesIO()
    torch.save({"model": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)

    new_params = [torch.nn.Parameter(t) for t in ckpt["model"]]
    new_opt = Muon(_named(new_params), **kw)
    new_opt.load_state_dict(ckpt["opt"])
    assert new_opt.routes() == opt.routes()
    assert new_opt.param_groups[0]["fallback_filter"] is kw["fallback_filter"]
    after = run_torch(new_opt, new_params, grads[3:])
    for a, b in zip(after[-1], ref[-1]):
        assert np.array_equal(a, b)
    for p, q in zip(new_params, ref_params):
        assert torch.equal(new_opt.state[p].get("momentum_buffer", p), ref_opt.state[q].get("momentum_buffer", q))
        assert new_opt.state[p].get("step") == ref_opt.state[q].get("step")
    # loaded state is a copy: stepping the loaded optimizer left the checkpoint alone
    assert not torch.equal(ckpt["opt"]["state"][0]["momentum_buffer"],
                           new_opt.state[new_params[0]]["momentum_buffer"])


def test_bf16_params_keep_float32_state_and_round_once():
    shapes = [(16, 32), (32,)]
    grads = grad_seq(shapes, 3)
    _, p16 = make_params(shapes, dtype=torch.bfloat16)
    _, p32 = make_params(shapes, dtype=torch.bfloat16)
    p32 = [torch.nn.Parameter(p.detach().float()) for p in p32]
    opt16, opt32 = Muon(p16, weight_decay=0.1), Muon(p32, weight_decay=0.1)
    start = [p.detach().clone() for p in p16]
    for gs in grads:
        for a, b, g in zip(p16, p32, gs):
            a.grad = torch.tensor(g, dtype=torch.bfloat16)
            b.grad = a.grad.float()
            with torch.no_grad():
                b.copy_(a.float())           # the float32 twin starts where bf16 is
        opt16.step()
        opt32.step()
        for a, b in zip(p16, p32):
            # updated in float32 and rounded once: exactly the float32 twin's
            # result rounded to bf16 (bitwise), and float32 state identical too.
            assert a.dtype == torch.bfloat16
            assert torch.equal(a, b.detach().to(torch.bfloat16))
            for k, v in opt16.state[a].items():
                if torch.is_tensor(v):
                    assert v.dtype == torch.float32 and torch.equal(v, opt32.state[b][k]), k
    assert all(not torch.equal(a, s) for a, s in zip(p16, start))


def test_bf16_state_stays_float32_after_load():
    shapes = [(16, 32), (32,)]
    grads = grad_seq(shapes, 4)
    _, ref_params = make_params(shapes, dtype=torch.bfloat16)
    ref = run_torch(Muon(ref_params), ref_params, grads, dtype=torch.bfloat16)

    _, params = make_params(shapes, dtype=torch.bfloat16)
    opt = Muon(params)
    run_torch(opt, params, grads[:2], dtype=torch.bfloat16)
    sd = copy.deepcopy(opt.state_dict())
    new_params = [torch.nn.Parameter(p.detach().clone()) for p in params]

    # torch's own load casts floating state to the param dtype (the reason the
    # adapter overrides it): proven here so the test below can fail.
    plain = Muon([torch.nn.Parameter(p.detach().clone()) for p in params])
    torch.optim.Optimizer.load_state_dict(plain, sd)
    assert plain.state[plain.param_groups[0]["params"][0]]["momentum_buffer"].dtype == torch.bfloat16

    new_opt = Muon(new_params)
    new_opt.load_state_dict(sd)
    for i, p in enumerate(new_params):
        for k, v in new_opt.state[p].items():
            if torch.is_tensor(v):
                assert v.dtype == torch.float32, k
                assert torch.equal(v, sd["state"][i][k])
    before = [p.detach().clone() for p in new_params]
    after = run_torch(new_opt, new_params, grads[2:], dtype=torch.bfloat16)
    assert all(not torch.equal(p, b) for p, b in zip(new_params, before))
    for a, b in zip(after[-1], ref[-1]):
        assert np.array_equal(a, b)


def test_load_rejects_state_routed_differently():
    _, params = make_params([(8, 16), (8,)])
    opt = Muon(_named(params))
    run_torch(opt, params, grad_seq([(8, 16), (8,)], 1))
    sd = opt.state_dict()
    other = Muon(_named([torch.nn.Parameter(p.detach().clone()) for p in params]),
                 fallback_filter=lambda n, p: n == "p0")
    with pytest.raises(ValueError, match=r"'p0'.*same routing options"):
        other.load_state_dict(sd)
    assert not other.state                                  # nothing was loaded


# ------------------------------------------------------------------ errors

def _p(*shape, **kw):
    return torch.nn.Parameter(torch.zeros(*shape, **kw))


# The messages are the shared validators' (core.muon.MuonOptions, as the optax
# and arrays adapters give them): "Muon: <option> must be ..., got <value> (<group>)".
@pytest.mark.parametrize("kw, exc, match", [
    (dict(lr=-0.1), ValueError, r"lr must be >= 0.*got -0\.1"),
    (dict(lr=float("nan")), ValueError, r"lr must be >= 0.*got nan"),
    (dict(momentum=1.0), ValueError, r"momentum must be in \[0, 1\), got 1\.0"),
    (dict(momentum=-0.1), ValueError, r"momentum.*got -0\.1"),
    (dict(ns_coefficients="cubic"), ValueError, r"ns_coefficients='cubic'.*preset"),
    (dict(ns_coefficients=[(1.0, 2.0)]), ValueError, r"ns_coefficients"),
    (dict(adjust_lr_fn="kimi"), ValueError, r"adjust_lr_fn='kimi'.*match_rms_adamw"),
    (dict(conv_mode="spatial"), ValueError, r"conv_mode='spatial'.*flatten"),
    (dict(fallback="sgd"), ValueError, r"fallback='sgd'.*nadamw"),
    (dict(momentum_form="heavy"), ValueError, r"momentum_form='heavy'.*classic"),
    (dict(ns_steps=0), ValueError, r"ns_steps must be an integer >= 1.*got 0"),
    (dict(ns_steps=2.5), ValueError, r"ns_steps.*got 2\.5"),
    (dict(betas=(1.0, 0.9)), ValueError, r"betas.*\[0, 1\)"),
    (dict(betas=0.9), ValueError, r"betas must be a pair.*got 0\.9"),
    (dict(eps=-1e-7), ValueError, r"eps must be >= 0.*got -1e-07"),
    (dict(fallback_eps=-1.0), ValueError, r"fallback_eps"),
    (dict(weight_decay=-0.1), ValueError, r"weight_decay"),
    (dict(ns_dtype="int8"), ValueError, r"ns_dtype='int8'"),
    (dict(nesterov="yes"), TypeError, r"nesterov"),
    (dict(fallback_filter="embed"), TypeError, r"fallback_filter.*callable"),
])
def test_option_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        Muon([_p(8, 16)], **kw)


def test_option_error_in_a_group_names_the_group():
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\), got 1\.5 \(param group 1\)"):
        Muon([{"params": [_p(8, 16)]}, {"params": [_p(8)], "momentum": 1.5}])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_bad_param_dtype_named(dtype):
    bad = torch.zeros(4, 4, dtype=dtype)
    with pytest.raises(TypeError, match=r"'blocks\.0\.w'.*floating dtype"):
        Muon([("fc.weight", _p(8, 16)), ("blocks.0.w", bad)])
    with pytest.raises(TypeError, match=r"group 1, param 0.*floating dtype"):
        Muon([{"params": [_p(8, 16)]}, {"params": [bad]}])


def test_mixed_devices_named():
    with pytest.raises(ValueError, match=r"'head\.weight' is on device meta.*'fc\.weight'.*model\.to"):
        Muon([("fc.weight", _p(8, 16)), ("head.weight", _p(8, 16, device="meta"))])
    with pytest.raises(ValueError, match=r"group 1, param 0 is on device meta"):
        Muon([{"params": [_p(8, 16)]}, {"params": [_p(8, device="meta")]}])


def test_sparse_grad_raises_at_step_naming_param():
    emb, w = _p(10, 8), _p(8, 8)
    opt = Muon([("emb.weight", emb), ("w", w)])
    w.grad = torch.ones(8, 8)
    emb.grad = torch.sparse_coo_tensor([[0, 3]], torch.ones(2, 8), (10, 8), check_invariants=True)
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match=r"'emb\.weight'.*sparse.*dense"):
        opt.step()
    assert torch.equal(w, before) and not opt.state       # nothing half-applied


# ----------------------------------------------------------- bf16 warning

def test_bf16_ns_on_cpu_warns_once_per_optimizer(monkeypatch):
    monkeypatch.setattr(torch_backend, "has_native_bf16", lambda x: False)
    shapes = [(16, 32), (16, 32)]
    grads = grad_seq(shapes, 3)
    for _ in range(2):                         # a second optimizer warns again, once
        _, params = make_params(shapes)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")    # no dedup by location: count every call
            run_torch(Muon(params, ns_dtype="bfloat16"), params, grads)
        msgs = [str(w.message) for w in rec if issubclass(w.category, UserWarning)]
        assert len(msgs) == 1, msgs
        assert "100x slower" in msgs[0] and "float32" in msgs[0]

    monkeypatch.setattr(torch_backend, "has_native_bf16", lambda x: True)
    _, params = make_params(shapes)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        run_torch(Muon(params, ns_dtype=torch.bfloat16), params, grads[:1])
    assert not [w for w in rec if issubclass(w.category, UserWarning)]
    # and the default never asks for bf16, so it never warns
    monkeypatch.setattr(torch_backend, "has_native_bf16", lambda x: False)
    _, params = make_params(shapes, dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        run_torch(Muon(params), params, grads[:1], dtype=torch.bfloat16)
    assert not [w for w in rec if issubclass(w.category, UserWarning)]


def test_bf16_ns_dtype_is_used():
    # ns_dtype=bfloat16 really runs NS in bf16: its update differs from the
    # float32 one by bf16 rounding (~1e-2 relative), far above float32 noise.
    shapes = [(16, 32)]
    grads = grad_seq(shapes, 1)
    init, pa = make_params(shapes)
    _, pb = make_params(shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        (a,) = run_torch(Muon(pa, ns_dtype="bfloat16"), pa, grads)
    (b,) = run_torch(Muon(pb), pb, grads)
    err = rel_err(a[0] - init[0], b[0] - init[0])
    assert 1e-4 < err < 0.1, err
