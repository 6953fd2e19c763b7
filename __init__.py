"""xpopt: Muon and PSGD Kron, with muP / spectral scaling, written once against the array API.

Importing ``xpopt`` imports no array framework; each backend loads on first
use, chosen by the type of the arrays you pass.

    >>> from xpopt import orthogonalize
    >>> from xpopt.adapters.torch import Muon, Kron    # torch.optim.Optimizer
    >>> from xpopt.adapters import optax as xo         # optax transforms
    >>> from xpopt.adapters import arrays              # NumPy / CuPy functional
"""

from . import checkpoint
from ._version import __version__
from .core.adam import adamw_step
from .core.blocking import layout as kron_layout
from .core.kron import KronOptions, kron_updates
from .core.muon import lr_scale, muon_step, orthogonalized_updates, suitability
from .core.newton_schulz import COEFFICIENTS, orthogonalize, resolve_coefficients

__all__ = [
    "__version__",
    "checkpoint",
    "COEFFICIENTS",
    "orthogonalize",
    "resolve_coefficients",
    "muon_step",
    "orthogonalized_updates",
    "lr_scale",
    "suitability",
    "adamw_step",
    "KronOptions",
    "kron_updates",
    "kron_layout",
]
