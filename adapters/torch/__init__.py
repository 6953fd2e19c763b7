"""``xpopt.adapters.torch``: the torch optimizers and muP helpers (the public facade).

``Muon`` (with its AdamW / NAdamW fallback) and ``Kron`` (PSGD Kron) are
``torch.optim.Optimizer`` classes that translate torch conventions into
``xpopt.core`` calls; the muP helpers build param groups and rescale inits.
The modules behind them:

* ``muon.py``         ``Muon``, ``Route``, ``torch_optim_state_dict``
* ``kron.py``         ``Kron``
* ``mup.py``          ``mup_param_groups``, ``mup_init_``, ``mup_plan``, ...
* ``distributed.py``  FSDP2 / DTensor steps (owner-compute)
* ``groups.py``       param-group keys the optimizers do not use (a warning)
* ``checkpoint.py``   ``xpopt.checkpoint``'s torch side (export / import)
"""

from ._base import apply_update, torch_nonfinite_gate  # noqa: F401  (public names of the old torch.py)
from .muon import Muon, Route, torch_optim_state_dict
from .kron import Kron
from .mup import base_shapes, mup_init_, mup_param_groups, mup_plan, print_effective_hparams, save_base_shapes

__all__ = ["Muon", "Route", "torch_optim_state_dict", "Kron", "base_shapes", "mup_init_", "mup_param_groups",
           "mup_plan", "print_effective_hparams", "save_base_shapes"]
