"""Drop-in replacements with each peer's exact signature, defaults and routing.

Change one import and keep your arguments::

    from xpopt.compat.optax_contrib import muon      # was: from optax.contrib import muon
    from xpopt.compat.torch_optim import Muon        # was: from torch.optim import Muon

Each module here is a mapping table from one peer's public options to
xpopt's one definition of the optimizer (``core.muon.MuonOptions``,
``core.kron.KronOptions``) and a call into the matching adapter: no maths and
no second copy of option handling.  Every option, its peer default and our
mapping is listed in ``docs/compat.md``.  Modules load their framework on
import, so import the one you use, not this package's siblings.
"""

__all__: list = []
