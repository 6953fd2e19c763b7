"""Importing xpopt must not import any array framework (fast CLI, no surprises)."""

import subprocess
import sys

FRAMEWORKS = ("torch", "jax", "jaxlib", "cupy", "numpy", "array_api_strict", "optax")


def test_import_xpopt_imports_no_framework():
    code = (
        "import sys, xpopt, xpopt.core.newton_schulz, xpopt.core.muon, xpopt.core.adam, xpopt.cli\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing xpopt pulled in: {out.stdout.strip()}"


def test_core_sources_import_no_framework():
    import pathlib
    import re

    import xpopt

    core = pathlib.Path(xpopt.__file__).parent / "core"
    pattern = re.compile(r"^\s*(import|from)\s+(torch|jax|jaxlib|cupy|numpy|optax)\b", re.M)
    offenders = [p.name for p in core.glob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_version_and_help():
    import xpopt

    out = subprocess.run([sys.executable, "-m", "xpopt", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"xpopt {xpopt.__version__}"
    out = subprocess.run([sys.executable, "-m", "xpopt", "--help"], capture_output=True, text=True, check=True)
    assert "usage: xpopt" in out.stdout


def test_all_lists_what_the_module_defines():
    """``__all__`` names only what exists and every public function / class the module defines."""
    import importlib
    import inspect

    import importlib.util

    for name in ("xpopt.core.kron", "xpopt.core.muon", "xpopt.adapters._signatures", "xpopt.core.routing", "xpopt.adapters.torch.distributed",
                 "xpopt.compat.torch_optim", "xpopt.compat.timm"):
        if (".torch" in name or ".compat." in name) and importlib.util.find_spec("torch") is None:
            continue
        mod = importlib.import_module(name)
        assert [n for n in mod.__all__ if not hasattr(mod, n)] == [], name
        defined = [n for n, v in vars(mod).items() if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
                   and getattr(v, "__module__", None) == mod.__name__]
        assert [n for n in defined if n not in mod.__all__] == [], f"{name}: defined but not in __all__"


def _package_imports():
    """``{module: modules of xpopt it imports}`` (relative imports anywhere in the file, by name)."""
    import ast
    import pathlib

    import xpopt

    root = pathlib.Path(xpopt.__file__).parent
    files = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(root).with_suffix("").parts
        if parts[0] in ("tests", "benchmarks", ".venv") or "site-packages" in parts:
            continue
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {}
    for mod, p in files.items():
        pkg = mod if p.name == "__init__.py" else mod.rpartition(".")[0]
        graph[mod] = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = [x for x in pkg.split(".") if x][:len(pkg.split(".")) - node.level + 1 if pkg else 0]
                target = ".".join(base + ([node.module] if node.module else []))
                for a in node.names:
                    sub = f"{target}.{a.name}".strip(".")
                    graph[mod].add(sub if sub in files else target)
        graph[mod].discard(mod)
    return graph


def test_import_graph_has_no_circles_and_no_upward_arrows():
    """No module imports one that imports it back (directly or around a circle), even inside a
    function; core imports only core and backends (DESIGN.md, "Layers")."""
    graph = _package_imports()
    assert "adapters.torch.muon" in graph and "core.muon" in graph["adapters.torch.muon"]  # the parser sees imports
    state, circles = {}, []

    def visit(m, path):
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                circles.append(path[path.index(t):] + [t])
            elif t in graph and t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert circles == []
    up = {m: sorted(t for t in ts if t.split(".")[0] not in ("core", "backends"))
          for m, ts in graph.items() if m.startswith("core")}
    assert {m: t for m, t in up.items() if t} == {}
