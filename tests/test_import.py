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

    for name in ("xpopt.core.kron", "xpopt.core.muon", "xpopt.adapters._signatures", "xpopt.core.routing", "xpopt.adapters.torch.distributed"):
        if ".torch" in name and importlib.util.find_spec("torch") is None:
            continue
        mod = importlib.import_module(name)
        assert [n for n in mod.__all__ if not hasattr(mod, n)] == [], name
        defined = [n for n, v in vars(mod).items() if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
                   and getattr(v, "__module__", None) == mod.__name__]
        assert [n for n in defined if n not in mod.__all__] == [], f"{name}: defined but not in __all__"
