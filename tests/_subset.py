"""Which cases of a sweep run by default (the rest under ``-m slow``).

The default suite checks each behaviour once (CI budget: 8 minutes of pytest
on 2 cores); a sweep over option combinations, adapter copies or shapes keeps
the cases that cover what no other default case covers and marks the rest
``slow`` (``pytest -m slow`` runs them).
"""

from __future__ import annotations

import pytest


def default_cases(params, keep):
    """``params`` (``pytest.param`` objects) with every case whose id is not in ``keep`` marked slow."""
    ids = [p.id for p in params]
    missing = set(keep) - set(ids)
    assert not missing, f"default_cases: no case with id {sorted(missing)}"
    return [p if p.id in keep else pytest.param(*p.values, id=p.id, marks=[*p.marks, pytest.mark.slow])
            for p in params]
