"""The small models and embedded data of the muP tools (torch and JAX build the same thing).

A 4-layer tanh MLP (smooth: no kinks for a coordinate check to trip on):
``input`` Linear(d_in, w) -> ``hidden1`` Linear(w, w) -> ``hidden2`` Linear(w, w)
-> ``output`` Linear(w, d_out), trained on a fixed teacher's regression
targets.  The data are generated from a seed (NumPy), so nothing is downloaded.
"""

from __future__ import annotations

import numpy as np

D_IN, D_OUT, BATCH = 32, 16, 128
LAYERS = ("input", "hidden1", "hidden2", "output")


def data(seed: int = 0, batch: int = BATCH):
    """``(x, y)`` float32: Gaussian inputs and a fixed random teacher's smooth outputs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, D_IN)).astype(np.float32)
    t1 = rng.standard_normal((D_IN, 64)) / np.sqrt(D_IN)
    t2 = rng.standard_normal((64, D_OUT)) / np.sqrt(64)
    y = (np.tanh(x @ t1) @ t2).astype(np.float32)
    return x, y
