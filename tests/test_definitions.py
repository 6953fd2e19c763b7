"""One definition per optimizer: every adapter's options are its core dataclass's.

For each adapter of Muon and Kron, the signature's option names and defaults
equal ``MuonOptions`` / ``KronOptions`` field by field, except where
``adapters._common.SIGNATURES`` lists a framework convention (optax's
``learning_rate``, None for static options under ``inject_hyperparams``,
layout arguments).  A default changed in one adapter only, or an option added
to core but not to an adapter, fails here.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from xpopt.adapters import _common as C
from xpopt.core.kron import KronOptions
from xpopt.core.muon import MuonOptions


def _adapter(name):
    fw, fn = name.split(".")
    if fw == "torch":
        torch_adapter = pytest.importorskip("xpopt.adapters.torch")
        return getattr(torch_adapter, fn).__init__
    if fw == "optax":
        pytest.importorskip("optax")
        from xpopt.adapters import optax as xo
        return getattr(xo, fn)
    from xpopt.adapters import arrays
    return getattr(arrays, fn)


def _norm(v):
    """Dtype objects by name (torch.float32 == "float32"); everything else as is."""
    if v is inspect.Parameter.empty:
        return C.REQUIRED
    if not isinstance(v, (str, int, float, bool, tuple, type(None))):
        return C.dtype_name(v)
    return v


@pytest.mark.parametrize("name", sorted(C.SIGNATURES))
def test_adapter_signature_equals_the_definition(name):
    definition = MuonOptions if "muon" in name.lower() else KronOptions
    spec = C.SIGNATURES[name]
    renamed, omitted = spec.get("renamed", {}), spec.get("omitted", {})
    want = {}
    for f in dataclasses.fields(definition):
        if f.name in omitted:
            continue
        default = spec.get("defaults", {}).get(f.name, f.default)
        want[renamed.get(f.name, f.name)] = _norm(default)
    got = {k: _norm(p.default) for k, p in inspect.signature(_adapter(name)).parameters.items()
           if k != "self" and k not in spec.get("extra", ())}
    assert got == want, f"{name}: differs from {definition.__name__} (fix the adapter, or list the " \
                        f"framework convention in adapters._common.SIGNATURES)"


def test_every_adapter_is_listed():
    pytest.importorskip("optax")
    pytest.importorskip("torch")
    from xpopt.adapters import arrays, optax as xo, torch as xt
    listed = set(C.SIGNATURES)
    public = {"torch.Muon", "torch.Kron", "arrays.muon", "arrays.kron", "optax.muon", "optax.scale_by_muon",
              "optax.quad", "optax.skew", "optax.scale_by_kron"}
    assert public <= listed
    for n in public:
        assert callable(_adapter(n))
    assert xt and xo and arrays


def test_omitted_options_say_why():
    for name, spec in C.SIGNATURES.items():
        for opt, why in spec.get("omitted", {}).items():
            assert isinstance(why, str) and why, f"{name}: omitted {opt} without a reason"
