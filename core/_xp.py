"""One namespace lookup per call tree, with errors that name the argument."""

from __future__ import annotations

import array_api_compat

from ..backends import get_backend


def namespace(*arrays, names: tuple[str, ...]):
    """``(xp, backend)`` for ``arrays``; TypeError naming arguments on a mix."""
    backend = get_backend(*arrays, names=names)
    return array_api_compat.array_namespace(*arrays), backend


def check_floating(xp, x, name: str) -> None:
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"{name} has dtype {x.dtype}; xpopt needs a real floating dtype "
            "(float32, float64, bfloat16, float16): cast it first"
        )
