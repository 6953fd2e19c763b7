"""PSGD Kron through its adapters: torch.optim conventions, optax conventions, the same numbers.

Tolerances: the adapters call the same core function on the same float32
inputs (and draw the same noise from the same key), so open-loop comparisons
(a fixed gradient sequence) differ only by each framework's rounding of the
same ops.  Measured over 20 steps: 0 (bit-identical) for 14 steps on every
parameter, then up to 2.6e-5 of the update size on the 24x24 parameter (four
12x12 blocks: a one-ulp difference in a factor fit is amplified by the
block's conditioning, ~1e2 for a 12x12 random block).  SAME = 1e-4 keeps a 4x
margin and stays far below what a wrong option does (>= 1e-2, checked below).
"""

from __future__ import annotations

import copy
import io
import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install xpopt[torch])")

from xpopt.adapters import arrays  # noqa: E402
from xpopt.adapters.torch import Kron  # noqa: E402

SAME = 1e-4

# torch on one intra-op thread (tests/_peers.py): these matrices are tiny, and on a 2-core machine
# shared with other jobs torch's second thread stalls (see tests/test_mup_torch.py)
from _peers import torch_module_threads  # noqa: E402,F401  (fixture, used by pytestmark)

pytestmark = pytest.mark.usefixtures("torch_module_threads")
SHAPES = [(24, 24), (40, 12), (30,), (3, 4, 5), (300, 20), ()]


def _grads(steps, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(steps)]


def _start(seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


KW = dict(b1=0.9, block_size=16, max_size_dense=200, preconditioner_update_probability=0.6, noise_scale=1e-2, weight_decay=0.1,
          preconditioner_update_style="skew", seed=3)


def _torch_updates(grads, kw=KW, dtype=torch.float32, lr=0.1):
    ps = [torch.nn.Parameter(torch.tensor(p)) for p in _start()]
    opt = Kron(ps, lr=lr, dtype=dtype, **kw)
    out = []
    for gs in grads:
        before = [p.detach().clone() for p in ps]
        for p, g in zip(ps, gs):
            p.grad = torch.tensor(g)
        opt.step()
        out.append([(p.detach() - b).numpy() for p, b in zip(ps, before)])
    return out, opt, ps


def _rel(a, b, params=None):
    """Largest difference relative to each parameter's update size.

    With ``params``, a few float32 ulps of the parameter are allowed on top:
    torch's update is measured as ``p_after - p_before``, which carries the
    rounding of ``p`` itself (a scalar of size 1 moving by 2e-4 a step has
    3e-4 relative error in that difference without any bug).
    """
    worst = 0.0
    for i, (x, y) in enumerate(zip(a, b)):
        slack = 0.0 if params is None else 4 * np.finfo(np.float32).eps * float(np.abs(params[i]).max())
        worst = max(worst, max(float(np.abs(x - y).max()) - slack, 0.0) / max(float(np.abs(y).max()), 1e-30))
    return worst


def test_torch_and_arrays_adapters_give_the_same_updates():
    grads = _grads(20)
    t_out, _, _ = _torch_updates(grads)
    opt = arrays.kron(lr=0.1, dtype="float32", **KW)
    params = _start()
    state = opt.init(params)
    for step, gs in enumerate(grads):
        upd, state = opt.update(gs, state, params)
        assert _rel(upd, t_out[step], params) < SAME, step
        params = arrays.apply_updates(params, upd)


def test_optax_adapter_gives_the_same_updates_jitted():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from xpopt.adapters import optax as xo

    grads = _grads(20)
    t_out, _, _ = _torch_updates(grads)
    kw = {k: v for k, v in KW.items() if k not in ("weight_decay", "preconditioner_update_style")}
    tx = xo.skew(0.1, weight_decay=0.1, dtype="float32", **kw)
    params = [jnp.asarray(p) for p in _start()]
    state = tx.init(params)
    step = jax.jit(tx.update)
    for i, gs in enumerate(grads):
        upd, state = step([jnp.asarray(g) for g in gs], state, params)
        assert _rel([np.asarray(u) for u in upd], t_out[i], [np.asarray(p) for p in params]) < SAME, i
        params = [p + u for p, u in zip(params, upd)]
    assert int(state[0].count) == 20


def test_a_wrong_option_is_seen():
    """The comparison has teeth: another style, seed or update probability moves the updates."""
    grads = _grads(6)
    ref, _, _ = _torch_updates(grads)
    for change in (dict(preconditioner_update_style="QUAD"), dict(seed=4), dict(preconditioner_update_probability=1.0)):
        other, _, _ = _torch_updates(grads, dict(KW, **change))
        assert max(_rel(a, b) for a, b in zip(other, ref)) > 1e-2, change


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_bit_exactly(dtype):
    """Save after 5 steps, load into a fresh optimizer (through torch.save), continue: the same bits."""
    grads = _grads(10)
    _, opt, ps = _torch_updates(grads, dtype=dtype)        # the uninterrupted run
    ref = [p.detach().clone() for p in ps]

    _, opt5, ps5 = _torch_updates(grads[:5], dtype=dtype)
    buf = io.BytesIO()
    torch.save(opt5.state_dict(), buf)
    buf.seek(0)
    ps_new = [torch.nn.Parameter(p.detach().clone()) for p in ps5]
    new = Kron(ps_new, lr=0.1, dtype=dtype, **KW)
    new.load_state_dict(torch.load(buf))
    for p in ps_new:
        st = new.state[p]
        # dtype= stores the factors; the momentum of these float32 params is float32 (the state-dtype rule)
        assert st["Qr"].dtype == dtype and st["mu"].dtype == torch.float32 and st["Lr"].dtype == torch.float32
        assert st["step"] == 5 and st["key"].dtype == torch.int64
    for gs in grads[5:]:
        for p, g in zip(ps_new, gs):
            p.grad = torch.tensor(g)
        new.step()
    for a, b in zip(ps_new, ref):
        assert torch.equal(a.detach(), b), float((a - b).abs().max())


def test_param_groups_schedulers_and_closures():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    x, y = torch.randn(64, 8), torch.randn(64, 2)
    opt = Kron([{"params": model[0].parameters(), "preconditioner_update_style": "QUAD"},
                {"params": model[2].parameters(), "lr": 0.0}], lr=0.05, noise_scale=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    frozen = [p.detach().clone() for p in model[2].parameters()]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = float(opt.step(closure))
    for _ in range(5):
        opt.step(closure)
        sched.step()
    assert float(closure()) < first
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 ** 5)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model[2].parameters()))   # lr 0 group untouched


@pytest.mark.parametrize("pdtype, mu_dtype", [(torch.float32, torch.bfloat16), (torch.float32, None),
                                              (torch.bfloat16, None)])
def test_plan_matches_the_allocated_state(pdtype, mu_dtype):
    ps = [torch.nn.Parameter(torch.zeros(768, 3072, dtype=pdtype)), torch.nn.Parameter(torch.zeros(3072, dtype=pdtype))]
    opt = Kron(ps, lr=1e-3, dtype=torch.bfloat16, mu_dtype=mu_dtype)   # bf16 factors (the memory choice)
    plan = opt.plan()
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    for row, p in zip(plan, ps):
        got = sum(v.numel() * v.element_size() for k, v in opt.state[p].items() if torch.is_tensor(v) and k != "key")
        assert got == row["state_bytes"], (row, got)
        assert opt.state[p]["mu"].dtype == (mu_dtype or torch.float32)      # the state-dtype rule
    big = plan[0]
    if mu_dtype is torch.bfloat16:
        # the memory target: Kron's state within AdamW's on 768x3072 with bf16 factors and momentum
        assert big["state_bytes"] <= 0.76 * big["adamw_bytes"], big


@pytest.mark.parametrize("kw, match", [
    (dict(preconditioner_update_style="EQ"), "preconditioner_update_style"),
    (dict(dtype=torch.float16), "dtype"),
    (dict(block_size=0), "block_size"),
    (dict(b1=1.0), "b1"),
    (dict(max_size_dense=0), "max_size_dense"),
    (dict(preconditioner_update_probability=0.0), "preconditioner_update_probability"),
    (dict(preconditioner_update_probability=1.5), "preconditioner_update_probability"),
    (dict(lr=-1.0), "lr"),
])
def test_bad_options_name_themselves(kw, match):
    with pytest.raises(ValueError, match=match):
        Kron([torch.nn.Parameter(torch.zeros(4, 4))], **kw)


def test_inject_hyperparams_learning_rate():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import optax

    from xpopt.adapters import optax as xo

    params = {"w": jnp.ones((6, 5)), "b": jnp.zeros((5,))}
    tx = optax.inject_hyperparams(xo.quad)(learning_rate=0.01)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    upd, state = jax.jit(tx.update)(grads, state, params)
    assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(upd))
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    upd0, _ = jax.jit(tx.update)(grads, state, params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(upd0))
    # a structural option injected and traced is a clear error
    bad = optax.inject_hyperparams(xo.quad)(learning_rate=0.01, block_size=4)
    st = bad.init(params)
    with pytest.raises(TypeError, match="block_size"):
        jax.jit(bad.update)(grads, st, params)
    # listed in static_args (xo.KRON_STATIC_ARGS) they stay Python values: the update equals the
    # uninjected transform's, jit vs eager (float32 op order only: rtol 1e-5 of one step's ~1e-2 update)
    for fn, static in ((xo.quad, xo.KRON_STATIC_ARGS), (xo.scale_by_kron, xo.SCALE_BY_KRON_STATIC_ARGS)):
        names = set(inspect.signature(fn).parameters)
        assert set(static) | set(xo.KRON_INJECTABLE) >= names and set(static) <= names
    structural = dict(block_size=4, max_size_dense=8, dtype="float32", mu_dtype="float32", seed=3, lr_style=None,
                      normalize_grads=True, preconditioner_update_probability=0.5, scanned_layers=None)
    ok = optax.inject_hyperparams(xo.quad, static_args=xo.KRON_STATIC_ARGS)(learning_rate=0.01, **structural)
    ref = xo.quad(0.01, **structural)
    got, _ = jax.jit(ok.update)(grads, ok.init(params), params)
    want, _ = ref.update(grads, ref.init(params), params)
    for k in params:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-5, atol=1e-9)


def test_options_are_validated_when_a_group_changes_not_every_step(monkeypatch):
    """Construction, add_param_group and load_state_dict validate (through core's KronOptions);
    step() reuses those options, a scheduler's lr included, and validates a group again only when
    one of its options changed: the new value is validated once, at the next step, and used."""
    from xpopt.core import kron as K

    calls, used = [], []
    real_options, real_updates = K.KronOptions, K.kron_updates

    def spy(**kw):
        calls.append(kw)
        return real_options(**kw)

    def spy_updates(*a, **kw):
        used.append(kw["opts"].b1)
        return real_updates(*a, **kw)

    monkeypatch.setattr(K, "KronOptions", spy)
    monkeypatch.setattr(K, "kron_updates", spy_updates)
    ps = [torch.nn.Parameter(torch.tensor(p)) for p in _start()]
    opt = Kron(ps[:3], lr=0.1, **KW)
    assert len(calls) >= 1
    n = len(calls)
    opt.add_param_group({"params": ps[3:], "b1": 0.5})
    assert len(calls) == n + 1 and calls[-1]["b1"] == 0.5
    grads = iter(_grads(12))

    def steps(k):
        for _ in range(k):
            for p, g in zip(ps, next(grads)):
                p.grad = torch.tensor(g)
            for group in opt.param_groups:
                group["lr"] *= 0.9                  # an LR scheduler
            opt.step()

    n = len(calls)
    steps(3)
    assert len(calls) == n                          # step() validates nothing
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert len(calls) > n                           # the loaded groups are validated
    n = len(calls)
    steps(3)
    assert len(calls) == n
    used.clear()
    opt.param_groups[1]["b1"] = 0.8                 # a user changes an option
    steps(1)
    assert len(calls) == n + 1 and calls[-1]["b1"] == 0.8   # validated once ...
    assert used == [0.9] * 3 + [0.8] * 3                     # ... and used
    steps(2)
    assert len(calls) == n + 1
    before = [p.detach().clone() for p in ps]
    opt.param_groups[1]["weight_decay"] = -1.0
    with pytest.raises(ValueError, match=r"weight_decay.*param group 1"):
        steps(1)
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))   # nothing was stepped


def test_optax_eager_update_matches_jit_and_takes_a_python_schedule():
    """An eager optax update runs compiled (adapters/optax/_kron.py), and a
    preconditioner_update_probability callable that branches in Python on the step,
    which cannot be traced, still runs (eagerly) and gives the traceable schedule's
    numbers.  Tolerance 1e-6 of the update size: the same float32 ops; the caller's jit
    also fuses the LR scale into them (measured 8.3e-8, one float32 ulp, for both
    eager runs; every-step fits instead of the schedule's draws: 5e-2)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from xpopt.adapters import optax as xo

    params = {"b": jnp.asarray(_start()[2])}      # one vector: eager op-by-op compiles are slow
    grads = [{"b": jnp.asarray(g[2])} for g in _grads(3)]

    def run(tx, step):
        state, out = tx.init(params), []
        for g in grads:
            u, state = step(g, state, params)
            out.append(u)
        return out

    kw = dict(b1=0.9, noise_scale=0.0, seed=3)
    branching = xo.skew(0.1, preconditioner_update_probability=lambda t: 1.0 if t < 2 else 0.3, **kw)
    traced = xo.skew(0.1, preconditioner_update_probability=lambda t: jnp.where(t < 2, 1.0, 0.3), **kw)
    want = run(traced, jax.jit(traced.update))
    for got in (run(traced, traced.update), run(branching, branching.update)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6 * float(jnp.abs(b).max()))
