"""The small models, embedded data and shared settings of the muP tools (torch and JAX build the same thing).

A 4-layer tanh MLP (smooth: no kinks for a coordinate check to trip on):
``input`` Linear(d_in, w) -> ``hidden1`` Linear(w, w) -> ``hidden2`` Linear(w, w)
-> ``output`` Linear(w, d_out), trained on a fixed teacher's regression
targets.  The data are generated from a seed (NumPy), so nothing is downloaded.
"""

from __future__ import annotations

import numpy as np

D_IN, D_OUT, BATCH = 32, 16, 128
LAYERS = ("input", "hidden1", "hidden2", "output")
DEFAULT_LR = {"sgd": 0.5, "adam": 3e-3, "muon": 0.02, "kron": 3e-3}
# The coordinate check's base LR: large enough that 3 steps move activations by O(1)
# (at DEFAULT_LR standard parametrisation's growth hides behind the init for a few steps).
# Muon's is set so its AdamW fallback runs at Adam's 3e-2 (0.2 x MUON_FALLBACK_RATIO): at 0.05
# the fallback's 7.5e-3 barely moves the readout in 3 steps and standard parametrisation's
# growth stays under 0.25 (measured), hiding what muP corrects.
COORD_LR = {"sgd": 0.5, "adam": 3e-2, "muon": 0.2, "kron": 3e-2}
# Kron under muP: "auto" makes the first preconditioned gradient unit-RMS (Adam's regime from
# step 1); with the identity start its first steps are SGD-like and the Adam column over-shrinks
# them (core/mup.py, "Kron").
KRON_INIT_SCALE = "auto"
# Muon's AdamW fallback (embeddings, readout, vectors) runs at this fraction of the Muon LR
# (the default LRs' ratio), so an LR sweep moves both together instead of pushing Adam to
# Muon's 10x larger LRs.
MUON_FALLBACK_RATIO = DEFAULT_LR["adam"] / DEFAULT_LR["muon"]


def data(seed: int = 0, batch: int = BATCH):
    """``(x, y)`` float32: Gaussian inputs and a fixed random teacher's smooth outputs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, D_IN)).astype(np.float32)
    t1 = rng.standard_normal((D_IN, 64)) / np.sqrt(D_IN)
    t2 = rng.standard_normal((64, D_OUT)) / np.sqrt(64)
    y = (np.tanh(x @ t1) @ t2).astype(np.float32)
    return x, y


def activation_stats(h0: dict, h: dict, mean_abs) -> dict:
    """Per layer: mean |h| after training and mean |h - h0| (the change since init)."""
    out = {name: mean_abs(h[name]) for name in LAYERS}
    out.update({f"d_{name}": mean_abs(h[name] - h0[name]) for name in LAYERS})
    return out
