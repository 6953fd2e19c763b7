"""Runs the ```python blocks of README.md in order: the worker of tests/test_readme.py.

A fresh interpreter (not the pytest process) so that the blocks see what a user
sees: no pytest logging handlers on the root logger (``logging.basicConfig`` in a
block takes effect), no warning filters from ``pyproject.toml``, no state left by
other tests.  Usage::

    python tests/_readme_runner.py README.md WORKDIR   -> one JSON object on stdout

The JSON maps each block's key (``L<line of its fence>``) to ``status`` (``ok``,
``error``, ``skipped``), ``error`` (the traceback), ``reason`` (why skipped),
``stdout``/``stderr`` (what the block printed, logging included), ``warnings``
(every warning it raised: ``category``, ``message``, ``filename``), ``graphs``
(see below) and ``seconds``.

Which blocks run (the fence's info string decides; see ``parse``):

- ```python: run, in README order, all in one namespace, as a reader would type
  them into one session (a later block may use names an earlier one defined).
- ```python no-run: <reason>: not run; the reason is recorded (for blocks that
  need peers, a GPU or several processes).
- ```bash, ```text, bare ```: not run (installs, long benchmarks, program output).

``torch.compile`` runs with ``backend="eager"`` unless a block names a backend:
dynamo traces exactly as under inductor (graph breaks, ``fullgraph`` errors,
the LR scheduler's wrapper, recompiles), without inductor's code generation
(~40 s for the README's model on 2 loaded CPU cores).  Each block's ``graphs``
counts the graphs dynamo handed to the backend while it ran.

A block that needs a framework that is not installed (it mentions ``torch``,
``jax``/``jnp``/``optax``/``xo``) is skipped; a later block that then fails with a
``NameError`` is reported as skipped too (it builds on the skipped one).  The frameworks that are installed are imported before the first
block, so their import-time warnings are not charged to the README.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import sys
import time
import traceback
import warnings

FENCE = re.compile(r"^```(\S*)\s*(.*)$")

#: (module, pattern of the code that means the block needs it)
NEEDS = (
    ("torch", re.compile(r"\btorch\b|adapters\.torch|\bMuon\(|\bKron\(")),
    ("jax", re.compile(r"\bjax\b|\bjnp\b|\boptax\b|\bxo\b|adapters\.optax")),
    ("optax", re.compile(r"\boptax\b|\bxo\b|adapters\.optax")),
)


def parse(text: str) -> list[dict]:
    """Every fenced block: ``key``, ``line`` (1-based, the fence), ``lang``, ``info``, ``heading``, ``code``."""
    blocks, heading, cur = [], "", None
    for i, line in enumerate(text.splitlines(), start=1):
        if cur is None:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            m = FENCE.match(line)
            if m:
                cur = {"key": f"L{i}", "line": i, "lang": m.group(1), "info": m.group(2).strip(),
                       "heading": heading, "lines": []}
        elif line.startswith("```"):
            cur["code"] = "\n".join(cur.pop("lines")) + "\n"
            blocks.append(cur)
            cur = None
        else:
            cur["lines"].append(line)
    if cur is not None:
        raise ValueError(f"README block at line {cur['line']} is never closed")
    return blocks


def python_blocks(text: str) -> list[dict]:
    return [b for b in parse(text) if b["lang"] == "python"]


def needs(code: str) -> list[str]:
    return [mod for mod, pat in NEEDS if pat.search(code)]


class _Switch(io.TextIOBase):
    """A stream that writes to whichever buffer is current: handlers made during one
    block (``logging.basicConfig``) keep writing into the block that is running."""

    def __init__(self):
        self.target = io.StringIO()

    def writable(self):
        return True

    def write(self, s):
        return self.target.write(s)

    def flush(self):
        pass


_GRAPHS: list = []


def _eager_compile():
    """``torch.compile`` with a counting eager backend by default (see the module docstring)."""
    import torch

    compile_ = torch.compile

    def counting(gm, example_inputs):
        _GRAPHS.append(gm)
        return gm.forward

    def compile_eager(*args, **kwargs):
        kwargs.setdefault("backend", counting)
        return compile_(*args, **kwargs)

    torch.compile = compile_eager


def run(readme: str, workdir: str) -> dict:
    with open(readme, encoding="utf-8") as f:
        blocks = python_blocks(f.read())
    for mod in ("numpy", "torch", "jax", "jax.numpy", "optax"):   # import-time warnings are not the README's
        if importlib.util.find_spec(mod.split(".")[0]) is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                __import__(mod)
    if "torch" in sys.modules:
        _eager_compile()
    os.chdir(workdir)
    ns: dict = {"__name__": "__readme__"}
    out, err = _Switch(), _Switch()
    results, skipped = {}, []
    for b in blocks:
        r = {"line": b["line"], "heading": b["heading"], "status": "ok", "stdout": "", "stderr": "",
             "warnings": [], "seconds": 0.0}
        results[b["key"]] = r
        if b["info"].startswith("no-run"):
            r.update(status="skipped", reason=b["info"])
            continue
        absent = [m for m in needs(b["code"]) if importlib.util.find_spec(m) is None]
        if absent:
            r.update(status="skipped", reason=f"{absent[0]} is not installed")
            skipped.append(b["key"])
            continue
        out.target, err.target = io.StringIO(), io.StringIO()
        graphs = len(_GRAPHS)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught, \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.simplefilter("always")
            try:
                exec(compile(b["code"], f"README.md:{b['line']}", "exec"), ns)
            except NameError as e:
                if skipped:
                    r.update(status="skipped", reason=f"{e} (defined by skipped block {skipped[-1]}?)")
                else:
                    r.update(status="error", error=traceback.format_exc())
            except BaseException:  # noqa: BLE001  (reported, not raised: the next blocks still run)
                r.update(status="error", error=traceback.format_exc())
        r["seconds"] = time.perf_counter() - t0
        r["stdout"], r["stderr"] = out.target.getvalue(), err.target.getvalue()
        r["graphs"] = len(_GRAPHS) - graphs
        r["warnings"] = [{"category": w.category.__name__, "message": str(w.message),
                          "filename": w.filename, "lineno": w.lineno} for w in caught]
    return results


if __name__ == "__main__":
    results = run(sys.argv[1], sys.argv[2])
    sys.__stdout__.write(json.dumps(results))
