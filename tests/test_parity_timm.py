"""Parity with timm's Muon (``timm/optim/muon.py``, Ross Wightman).

timm is an optional test peer, installed with ``pip install --no-deps timm``
(a plain install pulls torchvision and a CUDA torch).  Its package
``__init__`` imports torchvision, so ``tests/_peers.load_timm_muon`` loads the
optimizer files on their own.

What is compared:

* routing: timm's ``_is_suitable_for_muon(p, return_reason=True)`` against
  ``core.muon.suitability`` on an exhaustive grid of shapes and thresholds;
* LR scale: timm's ``get_lr_scale`` against ``core.muon.lr_scale``;
* whole trajectories of a small smooth conv net (4-D kernels, a linear
  layer, biases on the AdamW/NAdamW fallback) through timm's ``Muon`` and
  ``xpopt.adapters.torch.Muon`` for each NS preset, each ``adjust_lr_fn``,
  both conv modes, nesterov on/off (timm switches its fallback to NAdamW
  with nesterov) and weight decay, in float32, each from 3 starts nudged by
  a few float32 ulps (tests/_nudge.py) with 1 and 2 torch threads;
* one bf16 run (timm's default NS dtype) by direction.
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
import warnings

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install xpopt[torch])")

from _nudge import nudge  # noqa: E402
from _peers import F32_TRAJ_TOL, load_timm_muon, torch_module_threads, trajectory_error  # noqa: E402,F401
from _subset import default_cases  # noqa: E402

from xpopt.core import muon as core_muon  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_module_threads")


@pytest.fixture(scope="module")
def timm_muon():
    return load_timm_muon()


def test_timm_loaded_without_its_package_init(timm_muon):
    # The whole point of the loader: timm/__init__.py (-> torchvision) never ran.
    assert "timm" not in sys.modules
    assert timm_muon.Muon.__module__.endswith(".muon")


# ---------------------------------------------------------------- routing ---

# Every shape of rank 0..4 over these sizes: unit dims, dims around the
# min_dim_size threshold (3, 4, 5), and sizes whose flattened aspect ratio
# falls either side of 128 (e.g. 4 x 600 -> 150, 5 x 600 -> 120).
_SIZES = (1, 2, 3, 4, 5, 8, 64, 600)
_SHAPES = [s for r in range(5) for s in itertools.product(_SIZES, repeat=r)]


@pytest.mark.parametrize("min_dim_size, max_aspect_ratio", [(4, 128.0), (2, 16.0), (8, 1000.0), (1, 1.0)])
def test_suitability_matches_timm(timm_muon, min_dim_size, max_aspect_ratio):
    mismatches = []
    for shape in _SHAPES:
        # meta tensors: timm only reads .shape/.ndim, and nothing is allocated
        theirs = timm_muon._is_suitable_for_muon(
            torch.empty(shape, device="meta"), min_dim_size=min_dim_size,
            max_aspect_ratio=max_aspect_ratio, return_reason=True)
        ours = core_muon.suitability(shape, min_dim_size=min_dim_size, max_aspect_ratio=max_aspect_ratio)
        if tuple(theirs) != tuple(ours):
            mismatches.append((shape, theirs, ours))
    assert len(_SHAPES) == 4681
    assert not mismatches, f"{len(mismatches)} shapes differ, first: {mismatches[:5]}"


def test_suitability_table_matches_timm_docstring_examples(timm_muon):
    # timm's own docstring examples, checked on both sides (guards the grid
    # test against comparing two functions that agree by both being trivial).
    table = {
        (64, 128): (True, "ok"),
        (96, 3, 4, 4): (True, "ok"),
        (4, 2048): (False, "extreme_aspect_ratio:512.0"),
        (64,): (False, "insufficient_dims"),
        (1, 196, 768): (False, "leading_unit_dims"),
    }
    for shape, want in table.items():
        assert tuple(timm_muon._is_suitable_for_muon(torch.empty(shape, device="meta"), return_reason=True)) == want
        assert core_muon.suitability(shape) == want


@pytest.mark.parametrize("fn", ["original", "match_rms_adamw", "rms_to_rms", None])
def test_lr_scale_matches_timm(timm_muon, fn):
    ours_fn = "none" if fn is None else fn
    for out, inn in itertools.product((1, 3, 4, 16, 27, 64, 257, 4096), repeat=2):
        # timm reads the last two dims of the orthogonalised update, so a
        # batched-conv stack (taps, out, in) must scale like (out, in).
        for shape in ((out, inn), (9, out, inn)):
            theirs = timm_muon.get_lr_scale(torch.Size(shape), fn) if fn is not None else 1.0
            ours = core_muon.lr_scale(out, inn, ours_fn)
            # same closed form; x ** 0.5 and math.sqrt may differ in the last ulp
            assert ours == pytest.approx(theirs, rel=1e-15, abs=0), (shape, fn)
    if fn is not None:
        # and the values are the documented formulas, not just equal to each other
        want = {"original": 2.0, "match_rms_adamw": 0.2 * 16, "rms_to_rms": 2.0}[fn]
        assert core_muon.lr_scale(256, 64, ours_fn) == pytest.approx(want, rel=1e-15)


# ------------------------------------------------------------ trajectories ---

def make_net(seed=0, nudge_seed=0):
    """A small conv net in float32: (name -> initial tensor (torch layout), batches).

    conv kernels (4-D, Muon), a depthwise kernel (16, 1, 3, 3) that both
    routers send to the fallback (``leading_unit_dims``), a linear layer
    (Muon) and biases (fallback).  ``nudge_seed``: params and batches moved
    by 1..4 float32 ulps (tests/_nudge.py; 0 = as drawn).
    """
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "conv1.weight": (8, 3, 3, 3), "conv1.bias": (8,),
        "conv2.weight": (16, 8, 3, 3), "conv2.bias": (16,),
        "dw.weight": (16, 1, 3, 3),
        "fc.weight": (10, 16), "fc.bias": (10,),
    }
    init = {}
    for name, s in shapes.items():
        fan_in = math.prod(s[1:]) if len(s) > 1 else 16
        init[name] = torch.randn(s, generator=g) / math.sqrt(fan_in)
    # Three fixed batches (images, regression targets), cycled.  Every
    # gradient is full rank (32*36 conv1 positions for a 27-wide kernel
    # matrix, 32 samples for fc's 16 columns), so NS never amplifies rounding
    # noise in a null space.  The head is a regression, not a softmax
    # classifier: cross-entropy's gradient w.r.t. fc.weight has rows summing
    # to zero (softmax ignores a shift of all logits), so it is rank 9 of 10,
    # and the NS polynomial's slope at 0 blew float32 noise in that null
    # direction up to 3.8e-5 of the displacement (Polar Express, nudged
    # starts), against 6e-6 with full-rank gradients.
    batches = [(torch.randn(32, 3, 10, 10, generator=g), torch.randn(32, 10, generator=g))
               for _ in range(3)]
    return nudge((init, batches), nudge_seed)


def net_loss(p, x, y):
    # Smooth (GELU with erf, squared error): no ReLU kink for a value near
    # zero to take different branches in the two runs (tests/_nudge.py,
    # issue 11).  Both GELUs were ReLUs until the nudge guard was added.
    F = torch.nn.functional
    h = F.gelu(F.conv2d(x, p["conv1.weight"], p["conv1.bias"]))             # (B, 8, 8, 8)
    h = F.gelu(F.conv2d(h, p["conv2.weight"], p["conv2.bias"], stride=2))   # (B, 16, 3, 3)
    h = F.conv2d(h, p["dw.weight"], padding=1, groups=16)                  # depthwise
    return ((h.mean(dim=(2, 3)) @ p["fc.weight"].T + p["fc.bias"] - y) ** 2).mean()


def run_net(make_opt, steps, seed=0, nudge_seed=0):
    init, batches = make_net(seed, nudge_seed)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
    opt = make_opt(params)
    traj = [{k: v.detach().clone() for k, v in params.items()}]
    for t in range(steps):
        for v in params.values():
            v.grad = None
        net_loss(params, *batches[t % len(batches)]).backward()
        opt.step()
        traj.append({k: v.detach().clone() for k, v in params.items()})
    return traj


def timm_kwargs(**over):
    kw = dict(lr=0.02, weight_decay=0.01, momentum=0.95, nesterov=False, ns_steps=5,
              ns_coefficients="quintic", eps=1e-7, safety_factor=1.0, adjust_lr_fn="match_rms_adamw",
              conv_mode="flatten", normalize_spatial=True, fallback_lr_scale=0.5, betas=(0.9, 0.95))
    kw.update(over)
    return kw


def ours_from_timm(kw):
    """xpopt.adapters.torch.Muon options expressing timm's Muon ``kw`` (read off timm's source)."""
    scale = kw.get("fallback_lr_scale", 1.0)
    if kw.get("adamw_lr") is not None:
        scale = kw["adamw_lr"] / kw["lr"]
    fn = kw["adjust_lr_fn"]
    return dict(
        lr=kw["lr"], weight_decay=kw["weight_decay"], momentum=kw["momentum"], nesterov=kw["nesterov"],
        momentum_form="ema",                          # timm: momentum_buf.lerp_(grad, 1 - momentum)
        ns_coefficients=kw["ns_coefficients"], ns_steps=kw["ns_steps"], eps=kw["eps"],
        safety_factor=kw["safety_factor"],
        adjust_lr_fn="none" if fn is None else fn,    # timm: falsy adjust_lr_fn -> scale 1.0
        conv_mode=kw["conv_mode"], normalize_spatial=kw["normalize_spatial"],
        # timm's fallback: nadamw iff nesterov, lr * fallback_lr_scale, Muon's
        # eps, the group's weight decay, betas
        fallback="nadamw" if kw["nesterov"] else "adamw",
        fallback_lr=kw["lr"] * scale, fallback_eps=kw["eps"], fallback_weight_decay=None,
        betas=kw["betas"],
    )


def _timm_opt(timm_muon, kw):
    def make(params):
        with warnings.catch_warnings():
            # adamw_lr is deprecated in timm (FutureWarning); one case uses it on purpose
            warnings.simplefilter("ignore", FutureWarning)
            return timm_muon.Muon(list(params.values()), **kw)
    return make


def _ours_opt(**kw):
    from xpopt.adapters.torch import Muon

    return lambda params: Muon(list(params.items()), **kw)


@pytest.fixture
def timm_float32_ns(timm_muon, monkeypatch):
    """timm's Muon with its Newton-Schulz computed in float32.

    ``zeropower_via_newtonschulz(..., dtype=torch.bfloat16)`` is timm's default
    and ``_single_tensor_muon`` never passes ``dtype``, so timm always
    orthogonalises in bf16 (8-bit mantissa, ~1% error after 5 steps).  A
    bf16 comparison can only check direction; to check the *rule* to float32
    tolerance we rebind the module-level name to the same function with
    ``dtype=torch.float32``.  Nothing else in timm changes.
    """
    monkeypatch.setattr(timm_muon, "zeropower_via_newtonschulz",
                        functools.partial(timm_muon.zeropower_via_newtonschulz, dtype=torch.float32))
    return timm_muon


TIMM_CASES = [
    # each NS preset (polar_express lists have 8 triples: run all 8, with
    # Polar Express's recommended 1.01 safety factor on one of them)
    pytest.param(timm_kwargs(ns_coefficients="original"), id="ns=original"),
    pytest.param(timm_kwargs(ns_coefficients="quintic"), id="ns=quintic"),
    pytest.param(timm_kwargs(ns_coefficients="polar_express", ns_steps=8), id="ns=polar_express"),
    pytest.param(timm_kwargs(ns_coefficients="polar_express_safer", ns_steps=8, safety_factor=1.01),
                 id="ns=polar_express_safer-sf1.01"),
    pytest.param(timm_kwargs(ns_coefficients="quintic", ns_steps=7), id="ns=quintic-7steps-repeat-last"),
    # each LR adjustment
    pytest.param(timm_kwargs(adjust_lr_fn="original"), id="adjust=original"),
    pytest.param(timm_kwargs(adjust_lr_fn="rms_to_rms"), id="adjust=rms_to_rms"),
    pytest.param(timm_kwargs(adjust_lr_fn=None, lr=0.005), id="adjust=None"),
    # conv modes
    pytest.param(timm_kwargs(conv_mode="batched", normalize_spatial=True), id="conv=batched-normalized"),
    pytest.param(timm_kwargs(conv_mode="batched", normalize_spatial=False, adjust_lr_fn="original"),
                 id="conv=batched-raw"),
    # nesterov: timm switches the fallback to NAdamW
    pytest.param(timm_kwargs(nesterov=True), id="nesterov-nadamw"),
    pytest.param(timm_kwargs(nesterov=True, fallback_lr_scale=1.0, adamw_lr=0.003, weight_decay=0.1,
                             eps=1e-3, conv_mode="batched"),
                 id="nesterov-adamw_lr-wd0.1-eps1e-3-batched"),
    # weight decay, momentum, betas
    pytest.param(timm_kwargs(weight_decay=0.1, momentum=0.9, betas=(0.8, 0.99)), id="wd0.1-mu0.9-betas"),
]


# By default one case per behaviour group (a per-step table with a safety factor, an LR rule,
# a conv mode, nesterov with every fallback option, weight decay / momentum / betas);
# tests/test_compat_torch.py also runs the drop-in against timm itself.  -m slow: all.
@pytest.mark.parametrize("kw", default_cases(TIMM_CASES, [
    "ns=polar_express_safer-sf1.01", "adjust=rms_to_rms", "conv=batched-normalized",
    "nesterov-adamw_lr-wd0.1-eps1e-3-batched", "wd0.1-mu0.9-betas"]))
def test_trajectory_matches_timm_float32(timm_float32_ns, kw, nudge_seed, torch_threads):
    steps = 6
    theirs = run_net(_timm_opt(timm_float32_ns, kw), steps, nudge_seed=nudge_seed)
    ours = run_net(_ours_opt(**ours_from_timm(kw)), steps, nudge_seed=nudge_seed)
    keys = sorted(theirs[0])
    err = trajectory_error([[s[k] for k in keys] for s in ours], [[s[k] for k in keys] for s in theirs])
    # Same rule in float32, different op order (timm: in-place addmm chain
    # with `out=`, prescale by the 2-norm of the flattened matrix, LR scale
    # applied after; core: one-pass norm with a power-of-two prescale, the LR
    # scale folded into the last NS GEMM; fallback: timm addcdiv vs core's
    # (m/bc1)/(sqrt(v)/sqrt(bc2)+eps)).  Measured over 6 steps, relative to
    # each tensor's displacement, nudge seeds 0..5, 1 and 2 torch threads
    # (torch 2.13.0+cpu, timm 1.0.31): <= 5.9e-6 for every NS preset (Polar
    # Express's 8 steps included) and LR rule "original"; 7.3e-6 .. 9.7e-6
    # for adjust_lr_fn=None, rms_to_rms, nesterov-adamw_lr-eps1e-3 and
    # batched-normalized (9.7e-6).  The worst are at step 1 on a conv
    # kernel, where the displacement is one small step and one float32
    # rounding of the param is the larger share.  F32_TRAJ_TOL (1e-4, argued
    # in tests/_peers.py) keeps a 10x margin; wrong mappings are >= 100x it
    # (test_wrong_mapping_is_caught).
    assert err < F32_TRAJ_TOL, err


def test_wrong_mapping_is_caught(timm_float32_ns):
    """The float32 comparison has teeth: each option mapped wrongly fails it.

    Measured after 2 steps: 4.7e-1 (AdamW for NAdamW), 1.9 (no sqrt(taps)),
    9.7e-1 (fallback eps), 6.5e-2 (fallback weight decay 0 for the group's
    0.1), 1.6 (LR rule), 1.0 (fallback LR).  Weight decay is 0.1 here: with
    0.01 a dropped fallback decay is only 6.6e-3 after 2 steps (each Adam step
    is ~lr, the decay lr*wd*|p|), still 66x F32_TRAJ_TOL but under the 100x
    bar.
    """
    kw = timm_kwargs(nesterov=True, conv_mode="batched", eps=1e-3, weight_decay=0.1)
    theirs = run_net(_timm_opt(timm_float32_ns, kw), 2)
    keys = sorted(theirs[0])
    for wrong in ({"fallback": "adamw"}, {"normalize_spatial": False}, {"fallback_eps": 1e-8},
                  {"fallback_weight_decay": 0.0}, {"adjust_lr_fn": "original"}, {"fallback_lr": 0.02}):
        mine = run_net(_ours_opt(**{**ours_from_timm(kw), **wrong}), 2)
        err = trajectory_error([[s[k] for k in keys] for s in mine], [[s[k] for k in keys] for s in theirs])
        assert err > 100 * F32_TRAJ_TOL, (wrong, err)


def test_routing_matches_timm_on_the_net(timm_muon):
    from xpopt.adapters.torch import Muon

    init, _ = make_net()
    ours = {r.name: r.route for r in Muon(list(init.items())).routes()}
    theirs = {k: "muon" if timm_muon._is_suitable_for_muon(v) else "fallback" for k, v in init.items()}
    assert ours == theirs
    assert ours["dw.weight"] == "fallback" and ours["conv1.weight"] == "muon"


def test_bf16_direction_matches_timm(timm_muon, nudge_seed, torch_threads):
    """timm as shipped (bf16 NS) vs ours with ns_dtype=bfloat16: per-step update direction."""
    kw = timm_kwargs(nesterov=True, conv_mode="batched")
    steps = 3
    theirs = run_net(_timm_opt(timm_muon, kw), steps, nudge_seed=nudge_seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # our "bf16 is emulated on this CPU" warning
        ours = run_net(_ours_opt(**ours_from_timm(kw), ns_dtype=torch.bfloat16), steps,
                       nudge_seed=nudge_seed)
    for t in range(steps):
        for k in ("conv1.weight", "conv2.weight", "fc.weight"):
            da = (ours[t + 1][k] - ours[t][k]).flatten()
            db = (theirs[t + 1][k] - theirs[t][k]).flatten()
            cos = float(torch.nn.functional.cosine_similarity(da, db, dim=0))
            # two bf16 NS loops (~1% elementwise each, rounding differently
            # once inputs differ in the last float32 bit): cos >= 0.99978 and
            # norm ratios within 2.9e-3 of 1, measured over nudge seeds 0..7
            # with 1 and 2 threads; 0.99 is the promised bar.  The norm ratio checks the
            # LR scale and sqrt(taps) normalisation survive bf16.
            assert cos > 0.99, (t, k, cos)
            assert abs(float(da.norm() / db.norm()) - 1) < 0.02, (t, k)
