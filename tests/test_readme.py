"""README.md says what the code does (issue 17, "Nothing silently wrong", items 6, 7, 10).

Every ```python block of README.md runs, in README order, in one namespace, in a
fresh interpreter (``tests/_readme_runner.py``; its docstring has the rules):

- ```python blocks run; a later block may use what an earlier one defined, as in
  one session typed from the top of the page.
- ```python no-run: <reason> blocks are not run (for peers, GPUs, several
  processes); the reason is in the fence and shows as the skip reason here.
- ```bash blocks (installs, benchmarks) and bare ``` blocks (program output) are
  not run; the output tables of ``xpopt validate`` are compared with the recorded
  run in ``docs/validate-*.json`` instead (``test_readme_validate_tables``).
- ``torch.compile`` runs with an eager backend (dynamo traces as usual, no
  inductor code generation), which keeps the whole run near 20-40 s on 2 CPU cores.

A block fails its test when it raises, or when it emits a warning other than a
third-party library's own deprecation notice (torch's dynamo emits
``torch.jit.script_method`` deprecations while tracing; those are not the README's).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _readme_runner as R  # noqa: E402

TEXT = README.read_text(encoding="utf-8")
BLOCKS = R.python_blocks(TEXT)

#: blocks known not to run as written, by heading: strict xfail, so the entry
#: must go once the block runs (XPASS fails).
KNOWN_BROKEN: dict = {}


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def _start_runner():
    work = tempfile.mkdtemp(prefix="xpopt-readme-")
    env = dict(os.environ, PYTHONWARNINGS="")
    return subprocess.Popen([sys.executable, str(Path(R.__file__)), str(README), work], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


_EARLY: dict = {}


def start_early(items):
    """Called by conftest once the selection is known: the README runner starts then and runs
    beside the tests that come before this module's."""
    if any("readme_run" in item.fixturenames for item in items):
        _EARLY["runner"] = _start_runner()


def stop_early():
    for proc in _EARLY.values():
        proc.kill()


@pytest.fixture(scope="module")
def readme_run():
    """Run every block once (one subprocess for the module); {key: result}."""
    proc = _EARLY.pop("runner", None) or _start_runner()
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, f"the README runner itself failed:\n{stderr[-4000:]}"
    return json.loads(stdout)


def _ids(b):
    slug = re.sub(r"[^a-z0-9]+", "-", b["heading"].lower()).strip("-")[:40]
    return f"{b['key']}-{slug}"


def _params():
    out = []
    for b in BLOCKS:
        marks = []
        if b["heading"] in KNOWN_BROKEN:
            marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_BROKEN[b["heading"]]))
        out.append(pytest.param(b, id=_ids(b), marks=marks))
    return out


def _result(readme_run, block):
    r = readme_run[block["key"]]
    if r["status"] == "skipped":
        pytest.skip(f"README.md:{block['line']}: {r['reason']}")
    return r


def _own_warnings(r) -> list:
    """Warnings that are the README's or xpopt's (not a third-party deprecation)."""
    bad = []
    for w in r["warnings"]:
        # a venv inside the checkout (CI's .venv) is still third-party code
        ours = w["filename"].startswith(str(ROOT)) or w["filename"].startswith("README.md")
        third_party = not ours or "site-packages" in w["filename"]
        if w["category"] in ("DeprecationWarning", "PendingDeprecationWarning") and third_party:
            continue
        bad.append(f"{w['category']}: {w['message']} ({w['filename']}:{w['lineno']})")
    return bad


# --------------------------------------------------------------------------- every block (item 7)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 8, [b["key"] for b in BLOCKS]
    fences = [line for line in TEXT.splitlines() if line.lstrip().startswith("```")]
    # every fence is seen by the parser: an indented one (inside a list) would escape the test
    assert all(not f.startswith(" ") for f in fences), [f for f in fences if f.startswith(" ")]


@pytest.mark.parametrize("block", _params())
def test_readme_block(readme_run, block):
    r = _result(readme_run, block)
    assert r["status"] == "ok", f"README.md:{block['line']} ({block['heading']}) raised:\n{r.get('error')}"
    bad = _own_warnings(r)
    assert not bad, f"README.md:{block['line']} ({block['heading']}) warns:\n" + "\n".join(bad)


# --------------------------------------------------------------------------- item 6: verbose=True


def _block_with(text: str, heading: str) -> dict:
    found = [b for b in BLOCKS if text in b["code"] and b["heading"] == heading]
    assert found, f"no README block under {heading!r} contains {text!r}"
    return found[0]


@pytest.mark.skipif(not _has("torch"), reason="torch is not installed")
def test_readme_verbose_prints_one_line_per_param(readme_run):
    """The PyTorch example promises one log line per param with ``verbose=True``: a
    user running it (fresh interpreter, no logging set-up of their own) sees them."""
    block = _block_with("verbose=True", "PyTorch")
    r = _result(readme_run, block)
    assert r["status"] == "ok", r.get("error")
    lines = [ln for ln in r["stderr"].splitlines() if "xpopt Muon:" in ln]
    names = [re.search(r"xpopt Muon: (\S+) ", ln).group(1) for ln in lines]
    assert names == ["0.weight", "2.weight", "2.bias", "4.weight", "4.bias"], r["stderr"]


@pytest.mark.skipif(not _has("torch"), reason="torch is not installed")
def test_verbose_logs_at_info_on_the_xpopt_logger(caplog):
    """What the README documents: INFO records on the ``"xpopt"`` logger, one per param,
    and nothing printed (an unconfigured logging set-up shows none of them)."""
    import logging

    import torch

    from xpopt.adapters.torch import Kron, Muon

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    with caplog.at_level(logging.INFO, logger="xpopt"):
        Muon(model.named_parameters(), lr=0.02, verbose=True)
        Kron(model.parameters(), lr=1e-3, verbose=True)
        Muon(model.named_parameters(), lr=0.02)             # no records without verbose
    recs = [r for r in caplog.records if r.name == "xpopt"]
    assert [r.levelno for r in recs] == [logging.INFO] * 8, [r.getMessage() for r in recs]
    assert [r.getMessage().split(":")[0] for r in recs] == ["xpopt Muon"] * 4 + ["xpopt Kron"] * 4


# --------------------------------------------------------------------------- item 7: compile + scheduler


@pytest.mark.skipif(not _has("torch"), reason="torch is not installed")
def test_readme_compiled_step_with_scheduler(readme_run):
    """The README's compile advice runs without a warning (the runner records all of
    them; torch's "lr_scheduler.step() before optimizer.step()" is a UserWarning) and
    dynamo compiles the step as one graph over the steps (no recompiles)."""
    block = _block_with("torch.compile(opt.step", "PyTorch")
    r = _result(readme_run, block)
    assert r["status"] == "ok", r.get("error")
    assert not _own_warnings(r)
    assert r["graphs"] == 1, r["graphs"]


@pytest.mark.skipif(not _has("torch"), reason="torch is not installed")
def test_compile_before_scheduler_warns_as_the_readme_says():
    """The README's caveat, checked against torch: ``fullgraph=True`` compiled before the
    scheduler bypasses its wrapper, and torch warns at the first ``sched.step()``."""
    import warnings

    import torch

    from xpopt.adapters.torch import Muon

    model = torch.nn.Linear(8, 8)
    opt = Muon(model.named_parameters(), lr=torch.tensor(0.02))
    step = torch.compile(opt.step, fullgraph=True, backend="eager")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
    model(torch.ones(2, 8)).sum().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
        sched.step()
    assert any("before `optimizer.step()`" in str(w.message) for w in caught), [str(w.message) for w in caught]


# --------------------------------------------------------------------------- item 7: partial labels


def test_arrays_labels_may_name_some_keys():
    """``labels={"emb": "fallback"}`` (the README's NumPy example): unlisted keys are automatic."""
    from xpopt.adapters import arrays

    rng = np.random.default_rng(0)
    params = {"emb": rng.standard_normal((64, 16)), "w": rng.standard_normal((32, 16)), "b": np.zeros(32)}
    grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    partial = arrays.muon(lr=0.02, labels={"emb": "fallback"})
    full = arrays.muon(lr=0.02, labels={"emb": "fallback", "w": None, "b": None})
    s1, s2 = partial.init(params), full.init(params)
    assert s1.mu["emb"] is None and s1.exp_avg["emb"] is not None        # the label took effect
    assert s1.mu["w"] is not None and s1.exp_avg["b"] is not None        # the others: automatic
    u1, _ = partial.update(grads, s1, params)
    u2, _ = full.update(grads, s2, params)
    for k in params:
        np.testing.assert_array_equal(u1[k], u2[k])
    with pytest.raises(ValueError, match=r"labels has keys that params lacks: \['wq'\]"):
        arrays.muon(lr=0.02, labels={"wq": "fallback"}).init(params)
    with pytest.raises(ValueError, match="labels does not match params"):   # lists: entry for entry
        arrays.muon(lr=0.02, labels=["fallback"]).init(list(params.values()))


def test_optax_labels_may_name_some_keys():
    """The same rule in optax (one behaviour): a dict at any depth may leave keys out."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    from xpopt.adapters import optax as xo

    params = {"embed": jnp.ones((64, 16)), "block": {"w": jnp.ones((16, 32)) / 4, "b": jnp.zeros(32)}}

    def routes(labels):
        mu = xo.muon(0.02, labels=labels).init(params).mu
        return jax.tree.map(lambda m: "fallback" if isinstance(m, optax.MaskedNode) else "muon", mu,
                            is_leaf=lambda m: isinstance(m, optax.MaskedNode))

    expected = {"embed": "fallback", "block": {"w": "muon", "b": "fallback"}}
    assert routes(None)["embed"] == "muon"                                  # the label matters
    for labels in ({"embed": "fallback"}, {"embed": "fallback", "block": {"w": None}},
                   {"embed": "fallback", "block": {"w": None, "b": None}}, lambda p: {"embed": "fallback"}):
        assert routes(labels) == expected, labels
    with pytest.raises(ValueError, match=r"labels\['block'\] has keys that the params lack: \['k'\]"):
        xo.muon(0.02, labels={"block": {"k": "muon"}}).init(params)


# --------------------------------------------------------------------------- item 7: "*.pos_emb"


def test_star_dot_pattern_matches_top_level_names():
    from xpopt.core.mup_plan import name_matches

    assert name_matches("pos_emb", "*.pos_emb")
    assert name_matches("blocks.0.pos_emb", "*.pos_emb")
    assert name_matches("pos_emb", "*/pos_emb") and name_matches("Block_0/pos_emb", "*/pos_emb")
    assert name_matches("h.0.attn.weight", "*.attn.*")
    assert not name_matches("my_pos_emb", "*.pos_emb")
    assert not name_matches("pos_emb_2", "*.pos_emb")
    assert not name_matches("pos_emb", "x.pos_emb")


def test_mup_roles_star_dot_top_level_torch():
    torch = pytest.importorskip("torch")
    from xpopt.adapters.torch import mup_plan

    class Net(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.pos_emb = torch.nn.Parameter(torch.zeros(8, w))          # top level
            self.blocks = torch.nn.ModuleList([torch.nn.Module()])
            self.blocks[0].pos_emb = torch.nn.Parameter(torch.zeros(8, w))  # nested
            self.lin = torch.nn.Linear(w, w)

    rows = mup_plan(Net(64), Net(16), roles={"*.pos_emb": "input"})
    roles = {r["name"]: r["role"] for r in rows}
    assert roles["pos_emb"] == "input" and roles["blocks.0.pos_emb"] == "input", roles


def test_mup_roles_star_slash_top_level_jax():
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    import jax.numpy as jnp

    from xpopt.adapters import optax as xo

    def tree(w):
        return {"pos_emb": jnp.zeros((8, w)), "Dense_0": {"kernel": jnp.zeros((w, w))}}

    rows = xo.mup_plan(tree(64), tree(16), roles={"*/pos_emb": "output"})
    assert {r["name"]: r["role"] for r in rows}["pos_emb"] == "output"


# --------------------------------------------------------------------------- item 10: figures and claims


def _section(heading: str) -> str:
    start = TEXT.index(heading)
    nxt = re.search(r"^#{1,3} ", TEXT[start + len(heading):], flags=re.M)
    return TEXT[start: start + len(heading) + (nxt.start() if nxt else len(TEXT))]


def test_readme_intro_and_nonfinite_claims():
    """The intro does not call muP future work (it ships: core/mup.py, the muP
    section); the NumPy section does not deny the ``nonfinite=`` check every adapter has."""
    intro = TEXT.split("\n## ", 1)[0]
    assert "muP" in intro and "next" not in intro, intro
    numpy_section = _section("### NumPy / CuPy")
    assert "no implicit check" not in numpy_section
    assert "nonfinite=" in numpy_section


def test_readme_compile_benchmark_param_counts():
    """The README's torch.compile figures name the benchmark's models by their size: the
    counts in the README and in the benchmark's docstring are the models' own."""
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("_bench_torch_compile", ROOT / "benchmarks" / "torch_compile.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    counts = {name: sum(p.numel() for p in make().parameters()) / 1e6 for name, make in bench.MODELS.items()}
    small, medium = f"{counts['small']:.2f} M", f"{counts['medium']:.1f} M"
    assert small == "0.33 M" and medium == "3.7 M", counts
    assert f"({small} params)" in TEXT and f"({medium}," in TEXT
    assert f"~{small} params" in bench.__doc__ and f"~{medium} params" in bench.__doc__, bench.__doc__


def _validate_records():
    return sorted((ROOT / "docs").glob("validate-*.json"))


def test_readme_validate_tables():
    """The ``xpopt validate`` tables in the README are those of the run recorded in
    ``docs/validate-<optimizer>.json`` (the command writes it with ``--out docs``), and
    that run used today's model and hyperparameters: change either and this fails
    until the run is repeated and the README updated."""
    import dataclasses

    from xpopt.commands import validate as V

    records = _validate_records()
    assert "validate-kron.json" in [p.name for p in records], records
    for path in records:
        rec = json.loads(path.read_text(encoding="utf-8"))
        opt = rec["optimizer"]
        table = V.format_table(rec["rows"])
        assert table in TEXT, f"README.md lacks the {opt} table of docs/{path.name}:\n{table}"
        hp = json.loads(json.dumps(V._json_safe(
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in V.OPTIMIZERS[opt].hyperparameters.items()})))
        assert rec["hyperparameters"] == hp, f"docs/{path.name} was run with other {opt} hyperparameters"
        model = dataclasses.asdict(V.MODEL)
        assert {k: rec["model"][k] for k in model} == model, f"docs/{path.name} was run on another model"
        assert (rec["steps"], rec["seed"], rec["dtype"]) == (V.DEFAULT_STEPS, V.DEFAULT_SEED, "float32")
        assert rec["ok"]
