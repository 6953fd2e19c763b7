"""Parameter layout: which axes of a weight are fan-in and fan-out ("dimension numbers").

Core's maths works on torch's layout ``(out, in, *spatial)``; a :class:`Layout`
moves one parameter of any layout there and back.  :class:`DimensionNumbers`
and its two presets are the adapters' way of saying which layout a parameter has.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple, Optional, Sequence, Union

import array_api_compat

__all__ = ["DimensionNumbers", "FLAX", "TORCH", "is_dim_numbers", "resolve_dim_spec", "Layout", "layout_for"]


class DimensionNumbers(NamedTuple):
    """Which axes of a weight are its fan-in and fan-out (optax's convention).

    Same fields and defaults as ``optax.contrib.MuonDimensionNumbers`` (and any
    NamedTuple with these two fields is accepted in its place):
    ``reduction_axis`` are the axes summed over in ``y = x @ W`` (fan-in),
    ``output_axis`` the axes of ``y`` (fan-out).  Each is an int or a sequence
    of ints (merged into one matrix dimension, in the order given).  All other
    axes are *spatial* axes (conv taps), handled by ``conv_mode`` exactly as the
    trailing axes of a torch ``(out, in, kh, kw)`` kernel: merged into fan-in
    with ``"flatten"``, orthogonalised per tap with ``"batched"``.  (optax's own
    Muon vmaps over them instead; use ``conv_mode="batched",
    normalize_spatial=False`` for that behaviour, e.g. scanned layer stacks.)
    """

    reduction_axis: Union[int, Sequence[int]] = 0
    output_axis: Union[int, Sequence[int]] = 1


#: flax layout: Dense ``(in, out)``, Conv ``(kh, kw, in, out)``.
FLAX = DimensionNumbers(reduction_axis=-2, output_axis=-1)
#: torch layout: Linear ``(out, in)``, Conv ``(out, in, kh, kw)`` (core's layout).
TORCH = DimensionNumbers(reduction_axis=1, output_axis=0)


def is_dim_numbers(x) -> bool:
    """True for ours, optax's ``MuonDimensionNumbers`` or any look-alike NamedTuple."""
    return isinstance(x, tuple) and getattr(x, "_fields", None) == ("reduction_axis", "output_axis")


def resolve_dim_spec(spec, argname: str = "dimension_numbers"):
    """``"flax"``/``"torch"``/dimension numbers -> :class:`DimensionNumbers`; None stays None."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec in ("flax", "torch"):
            spec = FLAX if spec == "flax" else TORCH
        else:
            raise ValueError(
                f"{argname}={spec!r} is not valid; use 'flax', 'torch', a MuonDimensionNumbers"
                "(reduction_axis=..., output_axis=...), a pytree of those (None = fallback) or a callable"
            )
    if is_dim_numbers(spec):
        return DimensionNumbers(_axes(spec.reduction_axis, argname), _axes(spec.output_axis, argname))
    raise TypeError(
        f"{argname} leaf {spec!r} is not valid; use 'flax', 'torch', MuonDimensionNumbers(...) or None"
    )


def _axes(ax, argname) -> tuple[int, ...]:
    if isinstance(ax, numbers.Integral) and not isinstance(ax, bool):
        return (int(ax),)
    if isinstance(ax, Sequence) and not isinstance(ax, str) and len(ax) > 0 and all(
            isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in ax):
        return tuple(int(a) for a in ax)
    raise TypeError(f"{argname}: an axis spec must be an int or a non-empty sequence of ints, got {ax!r}")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Moves one parameter between its own layout and core's ``(out, in, *spatial)``."""

    shape: tuple[int, ...]
    perm: Optional[tuple[int, ...]]         # None: already in torch order
    permuted_shape: tuple[int, ...]
    torch_shape: tuple[int, ...]

    @property
    def native(self) -> bool:
        """True when the parameter is in torch layout already (nothing moved): torch's
        conventions apply to it, leading unit dims dropped included (``core.muon.matrix_shape``).
        A parameter moved from its own layout has an explicit fan-out axis, kept even at size 1."""
        return self.perm is None and self.torch_shape == self.shape

    def to_torch(self, x):
        xp = array_api_compat.array_namespace(x)
        if self.perm is not None:
            x = xp.permute_dims(x, self.perm)
        if self.torch_shape != self.permuted_shape:
            x = xp.reshape(x, self.torch_shape)
        return x

    def from_torch(self, y):
        xp = array_api_compat.array_namespace(y)
        if self.torch_shape != self.permuted_shape:
            y = xp.reshape(y, self.permuted_shape)
        if self.perm is not None:
            inv = tuple(sorted(range(len(self.perm)), key=lambda i: self.perm[i]))
            y = xp.permute_dims(y, inv)
        return y


def layout_for(shape, dims: DimensionNumbers, where: str) -> Layout:
    """Layout of a ``shape`` parameter whose fan-in/fan-out axes are ``dims``."""
    shape = tuple(int(d) for d in shape)
    nd = len(shape)
    norm = []
    for field in ("reduction_axis", "output_axis"):
        axes = getattr(dims, field)
        for a in axes:
            if not -nd <= a < nd:
                raise ValueError(
                    f"dimension_numbers for {where}: {field}={axes} is out of range for shape {shape}"
                )
        norm.append(tuple(a % nd for a in axes))
    red, out = norm
    if len(set(red)) != len(red) or len(set(out)) != len(out) or set(red) & set(out):
        raise ValueError(
            f"dimension_numbers for {where}: reduction_axis {red} and output_axis {out} must be "
            f"distinct axes of shape {shape}"
        )
    other = tuple(i for i in range(nd) if i not in red and i not in out)
    perm = out + red + other
    permuted = tuple(shape[i] for i in perm)
    torch_shape = (math.prod(shape[i] for i in out), math.prod(shape[i] for i in red)) + tuple(
        shape[i] for i in other)
    return Layout(shape, None if perm == tuple(range(nd)) else perm, permuted, torch_shape)
