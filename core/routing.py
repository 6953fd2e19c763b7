"""Muon's routing: which parameters are orthogonalised and which go to the fallback.

Automatic routing asks :func:`xpopt.core.muon.suitability` about the parameter's
shape in torch layout; labels force a route, and a missing or invalid layout is
an error naming the parameter.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import array_api_compat

from ._check import dtype_name, is_low_precision
from .layout import Layout, layout_for
from .muon import suitability

__all__ = ["LABELS", "LeafPlan", "check_label", "check_leaf_dtype", "plan_leaf", "muon_leaf_plan",
           "check_decay_flag"]

LABELS = ("muon", "fallback")
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


class LeafPlan(NamedTuple):
    """``layout`` is a :class:`Layout` for a Muon leaf, None for a fallback leaf."""

    layout: Optional[Layout]
    decay: bool


def check_label(label, where: str):
    if label is None or (isinstance(label, str) and label in LABELS):
        return label
    raise ValueError(f"labels for {where} is {label!r}; use 'muon', 'fallback' (or None: automatic)")


def check_leaf_dtype(x, where: str) -> None:
    """TypeError unless ``x`` has a floating dtype (float16/bfloat16/32/64, complex64/128)."""
    dtype = getattr(x, "dtype", None)
    ok = False
    if dtype is not None:
        if is_low_precision(dtype):
            ok = True
        else:
            try:
                ok = array_api_compat.array_namespace(x).isdtype(dtype, ("real floating", "complex floating"))
            except Exception:
                ok = dtype_name(dtype) in _FLOAT_NAMES + ("complex64", "complex128")
    if not ok:
        raise TypeError(
            f"{where} has dtype {dtype}; xpopt optimises floating parameters only "
            "(float16, bfloat16, float32, float64, complex64, complex128): cast it, or keep it "
            "out of the optimiser (integer counters are not trainable)"
        )


def plan_leaf(x, where: str, *, label, dims, decay, min_dim_size: int,
              max_aspect_ratio: float) -> LeafPlan:
    """Route one parameter: Muon (with its :class:`Layout`) or the fallback.

    ``label``: None (automatic), ``"muon"`` or ``"fallback"``.  ``dims``: the
    leaf's :class:`DimensionNumbers`, or None (from a user's dimension-numbers
    pytree) for "not a matrix": fallback.
    Automatic routing asks core ``suitability`` about the torch-layout shape.
    """
    check_leaf_dtype(x, where)
    label = check_label(label, where)
    shape = tuple(int(d) for d in x.shape)
    if label == "fallback":
        return LeafPlan(None, decay)
    if dims is None:
        if label == "muon":
            raise ValueError(
                f"labels marks {where} as 'muon' but dimension_numbers gives it None (not a matrix); "
                "give it MuonDimensionNumbers(...) or label it 'fallback'"
            )
        return LeafPlan(None, decay)
    if len(shape) < 2:
        if label == "muon":
            raise ValueError(
                f"labels marks {where} (shape {shape}) as 'muon', but Muon needs a parameter with "
                "at least 2 dimensions; label it 'fallback'"
            )
        return LeafPlan(None, decay)
    layout = layout_for(shape, dims, where)
    if label == "muon":
        return LeafPlan(layout, decay)
    ok, _ = suitability(layout.torch_shape, min_dim_size=min_dim_size, max_aspect_ratio=max_aspect_ratio)
    return LeafPlan(layout if ok else None, decay)


def muon_leaf_plan(x, where: str, dims) -> Layout:
    """For ``scale_by_muon``: every leaf is a Muon matrix (errors otherwise)."""
    check_leaf_dtype(x, where)
    if dims is None:
        raise ValueError(
            f"scale_by_muon orthogonalises every leaf it sees, but dimension_numbers gives {where} None; "
            "route non-matrix leaves elsewhere (optax.partition) or use muon(), which has a fallback"
        )
    shape = tuple(int(d) for d in x.shape)
    if len(shape) < 2:
        raise ValueError(
            f"scale_by_muon got {where} with shape {shape}; Muon needs at least 2 dimensions "
            "(use muon(), which sends vectors to its AdamW fallback, or optax.partition)"
        )
    return layout_for(shape, dims, where)


def check_decay_flag(flag, where: str) -> bool:
    if isinstance(flag, bool):
        return flag
    # numpy / jax boolean scalars (concrete: routing is decided outside jit's values)
    if getattr(flag, "shape", None) == () and dtype_name(getattr(flag, "dtype", "")) == "bool":
        return bool(flag)
    raise TypeError(f"weight_decay_mask for {where} is {flag!r}; use True or False")
