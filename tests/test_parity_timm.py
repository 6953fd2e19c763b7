"""Parity with timm's Muon (``timm/optim/muon.py``, Ross Wightman).

timm is an optional test peer, installed with ``pip install --no-deps timm``
(a plain install pulls torchvision and a CUDA torch).  Its package
``__init__`` imports torchvision, so ``tests/_peers.load_timm_muon`` loads the
optimizer files on their own.

What is compared:

* routing: timm's ``_is_suitable_for_muon(p, return_reason=True)`` against
  ``core.muon.suitability`` on an exhaustive grid of shapes and thresholds;
* LR scale: timm's ``get_lr_scale`` against ``core.muon.lr_scale``;
* whole trajectories of a small conv net (4-D kernels, a linear layer,
  biases on the AdamW/NAdamW fallback) through timm's ``Muon`` and
  ``xpopt.adapters.torch.Muon`` for each NS preset, each ``adjust_lr_fn``,
  both conv modes, nesterov on/off (timm switches its fallback to NAdamW
  with nesterov) and weight decay, in float32;
* one bf16 run (timm's default NS dtype) by direction.
"""

from __future__ import annotations

import itertools
import math
import sys

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install xpopt[torch])")

from _peers import load_timm_muon  # noqa: E402

from xpopt.core import muon as core_muon  # noqa: E402


@pytest.fixture(scope="module")
def timm_muon():
    return load_timm_muon()


def test_timm_loaded_without_its_package_init(timm_muon):
    # The whole point of the loader: timm/__init__.py (-> torchvision) never ran.
    assert "timm" not in sys.modules
    assert timm_muon.Muon.__module__.endswith(".muon")


# ---------------------------------------------------------------- routing ---

# Every shape of rank 0..4 over these sizes: unit dims, dims around the
# min_dim_size threshold (3, 4, 5), and sizes whose flattened aspect ratio
# falls either side of 128 (e.g. 4 x 600 -> 150, 5 x 600 -> 120).
_SIZES = (1, 2, 3, 4, 5, 8, 64, 600)
_SHAPES = [s for r in range(5) for s in itertools.product(_SIZES, repeat=r)]


@pytest.mark.parametrize("min_dim_size, max_aspect_ratio", [(4, 128.0), (2, 16.0), (8, 1000.0), (1, 1.0)])
def test_suitability_matches_timm(timm_muon, min_dim_size, max_aspect_ratio):
    mismatches = []
    for shape in _SHAPES:
        # meta tensors: timm only reads .shape/.ndim, and nothing is allocated
        theirs = timm_muon._is_suitable_for_muon(
            torch.empty(shape, device="meta"), min_dim_size=min_dim_size,
            max_aspect_ratio=max_aspect_ratio, return_reason=True)
        ours = core_muon.suitability(shape, min_dim_size=min_dim_size, max_aspect_ratio=max_aspect_ratio)
        if tuple(theirs) != tuple(ours):
            mismatches.append((shape, theirs, ours))
    assert len(_SHAPES) == 4681
    assert not mismatches, f"{len(mismatches)} shapes differ, first: {mismatches[:5]}"


def test_suitability_table_matches_timm_docstring_examples(timm_muon):
    # timm's own docstring examples, checked on both sides (guards the grid
    # test against comparing two functions that agree by both being trivial).
    table = {
        (64, 128): (True, "ok"),
        (96, 3, 4, 4): (True, "ok"),
        (4, 2048): (False, "extreme_aspect_ratio:512.0"),
        (64,): (False, "insufficient_dims"),
        (1, 196, 768): (False, "leading_unit_dims"),
    }
    for shape, want in table.items():
        assert tuple(timm_muon._is_suitable_for_muon(torch.empty(shape, device="meta"), return_reason=True)) == want
        assert core_muon.suitability(shape) == want


@pytest.mark.parametrize("fn", ["original", "match_rms_adamw", "rms_to_rms", None])
def test_lr_scale_matches_timm(timm_muon, fn):
    ours_fn = "none" if fn is None else fn
    for out, inn in itertools.product((1, 3, 4, 16, 27, 64, 257, 4096), repeat=2):
        # timm reads the last two dims of the orthogonalised update, so a
        # batched-conv stack (taps, out, in) must scale like (out, in).
        for shape in ((out, inn), (9, out, inn)):
            theirs = timm_muon.get_lr_scale(torch.Size(shape), fn) if fn is not None else 1.0
            ours = core_muon.lr_scale(out, inn, ours_fn)
            # same closed form; x ** 0.5 and math.sqrt may differ in the last ulp
            assert ours == pytest.approx(theirs, rel=1e-15, abs=0), (shape, fn)
    if fn is not None:
        # and the values are the documented formulas, not just equal to each other
        want = {"original": 2.0, "match_rms_adamw": 0.2 * 16, "rms_to_rms": 2.0}[fn]
        assert core_muon.lr_scale(256, 64, ours_fn) == pytest.approx(want, rel=1e-15)
